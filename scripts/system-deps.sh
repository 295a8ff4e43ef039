#!/usr/bin/env bash
# Debian packages the test suite drives for real: headless Chromium (web chat), Prometheus (dashboard queries),
# nginx (session-affine routing). Installed only when missing and when we may (root + apt-get).
set -euo pipefail
packages=(chromium chromium-driver prometheus nginx)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: missing ${missing[*]} (need root + apt-get); the tests that drive them will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian prometheus/nginx packages start system services where an init system runs; the tests start their own.

"""The local stack for load runs and ops tests: the h2o-serve server and a real Prometheus, both on loopback.

Each runs in its own process group and is stopped (SIGTERM, then SIGKILL after a grace period) when its context
exits, whatever happened inside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, n_chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-n_chars:] if path.is_file() else ""


@contextmanager
def process(
    cmd: list[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path = REPO, stop_timeout_s: float = 10.0
) -> Iterator[subprocess.Popen]:
    """Run `cmd` with stdout+stderr to `log_path`; stop its whole process group on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env) if env else None, cwd=cwd, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_ok(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early with the log's tail if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s:\n{log_tail(log_path)}")


def save_tiny_llama(path: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer saved in `path`, loadable as ``H2O_MODEL``: a real server process
    whose decoding is fast and whose load has the real model's shape of text (h2o_cache.loading.tiny_llama)."""
    from h2o_cache.loading import tiny_llama

    model, tokenizer = tiny_llama()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@contextmanager
def serve(log_path: Path, env: Mapping[str, str] | None = None, ready_timeout_s: float = 180.0) -> Iterator[str]:
    """Start ``python -m app`` on a free loopback port with `env` added to ours; yield its base URL once
    ``/ready`` answers."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}), "H2O_HOST": LOOPBACK, "H2O_PORT": str(port)}
    with process([sys.executable, "-m", "app"], log_path, full_env) as proc:
        base_url = f"http://{LOOPBACK}:{port}"
        wait_ok(f"{base_url}/ready", proc, log_path, ready_timeout_s)
        yield base_url


def prometheus_config(target: str, scrape_interval: str) -> dict:
    """The repo's Prometheus config with its one scrape target replaced by `target` (``host:port``) and both
    intervals set to `scrape_interval`."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    static["targets"] = [target]
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    return config


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


@contextmanager
def run_prometheus(target: str, workdir: Path, scrape_interval: str = "1s") -> Iterator[str]:
    """Start the real Prometheus on a free loopback port, scraping `target`; yield its base URL once ready."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian package `prometheus`: scripts/system-deps.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(target, scrape_interval), sort_keys=False))
    port = free_port()
    cmd = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--log.level=warn",
    ]
    log_path = workdir / "prometheus.log"
    with process(cmd, log_path) as proc:
        base_url = f"http://{LOOPBACK}:{port}"
        wait_ok(f"{base_url}/-/ready", proc, log_path, timeout_s=30)
        yield base_url

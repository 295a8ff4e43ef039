"""Keep the web chat one self-contained file: copy the vendored libraries into app/static/index.html's
`<script data-vendor="NAME">` blocks and write the sha256 of every inline script into the page's
Content-Security-Policy (`script-src`), so that no other script (an injected `<script>` or `onerror=`) can run.

The server serves index.html only (GET /), so the libraries travel inside it; the files here are the source.
Run after changing index.html's script or a vendored file:

    python app/static/vendor/inline.py          # rewrite index.html
    python app/static/vendor/inline.py --check  # exit 1 if index.html is out of date (tests/app/test_webchat.py)
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
from pathlib import Path

VENDOR = Path(__file__).resolve().parent
PAGE = VENDOR.parent / "index.html"
SCRIPT = re.compile(r'(<script(?: data-vendor="([^"]+)")?>)(.*?)(</script>)', re.S)
SCRIPT_SRC = re.compile(r"script-src[^;\"]*")


def build(html: str) -> str:
    def vendored(match: re.Match) -> str:
        if match.group(2) is None:
            return match.group(0)
        code = (VENDOR / match.group(2)).read_text(encoding="utf-8")
        if re.search(r"</script|<!--\s*<script", code, re.I):
            raise SystemExit(f"{match.group(2)} cannot be inlined: it contains </script or <!-- <script")
        return match.group(1) + code + match.group(4)

    html = SCRIPT.sub(vendored, html)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(m.group(3).encode()).digest()).decode()}'"
        for m in SCRIPT.finditer(html)
    )
    html, count = SCRIPT_SRC.subn(f"script-src {hashes}", html, count=1)
    if not count:
        raise SystemExit("index.html has no Content-Security-Policy script-src to fill in")
    return html


def main() -> int:
    html = PAGE.read_text(encoding="utf-8")
    built = build(html)
    if "--check" in sys.argv[1:]:
        if built != html:
            print(f"{PAGE} is out of date: run python {Path(__file__)}", file=sys.stderr)
            return 1
        return 0
    if built != html:
        PAGE.write_text(built, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Docker HEALTHCHECK: exit 0 when the server answers GET /ready with 200 (model loaded, accepting requests)."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('H2O_PORT', '8000')}/ready"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"{url}: {exc}", file=sys.stderr)
    sys.exit(1)

"""Schemathesis fuzzes every operation of the OpenAPI schema against a live server process: no 5xx, no request
that hangs, and the server still answers a normal request afterwards."""

import re
import subprocess
import sys
from pathlib import Path

from tests.app.conftest import generate
from tests.reliability.conftest import KEY_A

FUZZ_TIMEOUT_S = 150


def test_schemathesis_finds_no_server_error_and_no_hang(launch, tmp_path):
    server = launch(tmp_path / "snapshots", max_new_tokens=16, default_max_new_tokens=8, max_body_bytes=65536)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "20",
        "--seed",
        "7",
        "--no-shrink",
        # One worker: with two, hypothesis builds filters in two threads at once and CPython 3.11.7's AST
        # constructor trips over itself ("AST constructor recursion depth mismatch", a tool crash, not a 5xx).
        "--request-timeout",
        "20",
        "--max-time",
        "60",
        "--workers",
        "1",
        "--header",
        f"Authorization: Bearer {KEY_A}",
        "--phases",
        "examples,coverage,fuzzing",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:] + server.log()
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts[1]) == int(counts[2]) > 100, result.stdout[-2000:]
    with server.client() as client:
        assert client.get("/ready").status_code == 200
        tokens, done = generate(client, "after-fuzz", "Hello", max_new_tokens=3, temperature=0)
        assert done["usage"]["completion_tokens"] == 3

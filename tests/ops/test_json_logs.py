"""`H2O_LOG_FORMAT=json` in a real `python -m app` process (a tiny random Llama with SmolLM2's tokenizer): every line
it writes, uvicorn's and the shutdown's included, is one JSON object, and each request has its line with the request
id, the session's hash, status, tokens and timings. ~15 s on two CPU cores."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from loadtest.stack import save_tiny_llama, serve
from tests.app.conftest import sse_events

pytestmark = pytest.mark.process  # a `python -m app` process (tests/conftest.py's tiers)


@pytest.fixture(scope="module")
def json_log(tmp_path_factory) -> tuple[list[dict], dict]:
    """(every line of the server's log, parsed; what the client saw)."""
    model = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {"H2O_MODEL": model, "H2O_DEVICE": "cpu", "H2O_LOG_FORMAT": "json", "H2O_REPLICA_NAME": "json-test"}
    seen = {}
    with serve(log_path, env) as url, httpx.Client(base_url=url, timeout=60) as client:
        with client.stream(
            "POST",
            "/sessions/json-session/generate",
            headers={"X-Request-Id": "json-stream-1"},
            json={"message": "hello", "max_new_tokens": 5, "temperature": 0},
        ) as response:
            seen["stream_id"] = response.headers["x-request-id"]
            seen["done"] = [data for event, data in sse_events(response) if event == "done"][0]
        plain = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        )
        seen["plain_id"], seen["plain"] = plain.headers["x-request-id"], plain.json()
    lines = log_path.read_text().split("\n")
    assert lines.pop() == "" and lines, "the server wrote no log, or not whole lines"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    return parsed, seen


def test_every_line_is_a_json_object_with_time_level_logger_and_message(json_log):
    lines, _ = json_log
    assert all(isinstance(line, dict) and {"time", "level", "logger", "message"} <= set(line) for line in lines)
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "app.engine", "app.requests", "__main__"} <= loggers, loggers  # __main__: SIGTERM


def test_each_request_has_its_line_with_id_session_hash_tokens_and_timings(json_log):
    lines, seen = json_log
    requests = {line["request_id"]: line for line in lines if line["logger"] == "app.requests"}
    assert seen["stream_id"] == "json-stream-1"
    stream = requests["json-stream-1"]
    assert stream["level"] == "INFO" and stream["message"] == "POST /sessions/{session_id}/generate 200"
    assert stream["session"] == hashlib.sha256(b"json-session").hexdigest()[:16]
    assert stream["stream"] is True and stream["status"] == 200
    assert stream["completion_tokens"] == seen["done"]["usage"]["completion_tokens"] == 5
    assert stream["prompt_tokens"] == seen["done"]["usage"]["prompt_tokens"]
    assert stream["ttft_ms"] == pytest.approx(seen["done"]["ttft_s"] * 1000, abs=1e-3)
    assert stream["finish"] == "length" and stream["duration_ms"] > 0
    plain = requests[seen["plain_id"]]
    assert plain["route"] == "/v1/chat/completions"
    assert plain["completion_tokens"] == seen["plain"]["usage"]["completion_tokens"]
    assert not any("json-session" in json.dumps(line) for line in lines)
    # The readiness probes of the test harness are DEBUG: not in an INFO log.
    assert not any(line.get("route") == "/ready" for line in requests.values())

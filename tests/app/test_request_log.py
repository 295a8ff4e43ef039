"""The request log (app.request_log.RequestLog): one line per request on `app.requests`, captured with caplog from real
uvicorn servers over HTTP; X-Request-Id; JSON lines (app.__main__.JsonFormatter); a stream that ends in an error
event at ERROR with its cause. The JSON lines of a real `python -m app` process: tests/ops/test_json_logs.py."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time

import pytest

import app.output_processor
from app.__main__ import JsonFormatter
from tests.app.conftest import generate, sse_events

KEY = "sk-request-log-test-key"


@pytest.fixture
def request_log(caplog):
    """(records) -> the app.requests records so far; `wait(request_id)` polls for one: the line is written after the
    response's last byte, so it may come a moment after the client has read it."""
    caplog.set_level(logging.DEBUG, logger="app.requests")

    class Log:
        @staticmethod
        def records() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "app.requests"]

        @staticmethod
        def wait(request_id: str, timeout_s: float = 10) -> logging.LogRecord:
            deadline = time.monotonic() + timeout_s
            while True:
                found = [r for r in Log.records() if r.h2o_fields["request_id"] == request_id]
                if found:
                    assert len(found) == 1, [r.getMessage() for r in found]
                    return found[0]
                assert time.monotonic() < deadline, f"no log line for {request_id}"
                time.sleep(0.02)

    return Log


def sha(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:16]


def test_a_turn_logs_its_request_id_session_hash_status_tokens_and_timings(serve, request_log):
    server = serve(api_keys=KEY)
    headers = {"X-Request-Id": "client-req-42", "Authorization": f"Bearer {KEY}"}
    with server.client(headers=headers) as client:
        with client.stream(
            "POST", "/sessions/alice-secret/generate", json={"message": "hello", "max_new_tokens": 6, "temperature": 0}
        ) as response:
            assert response.headers["x-request-id"] == "client-req-42"
            events = list(sse_events(response))
        done = events[-1][1]
        assert events[-1][0] == "done"
        record = request_log.wait("client-req-42")
        plain = client.post(
            "/sessions/alice-secret/generate",
            headers={"X-Request-Id": "client-req-43"},
            json={"message": "again", "max_new_tokens": 4, "stream": False},
        )
        assert plain.status_code == 200 and plain.headers["x-request-id"] == "client-req-43"
        plain_record = request_log.wait("client-req-43")

    fields = record.h2o_fields
    assert record.levelno == logging.INFO
    assert fields["request_id"] == "client-req-42"
    assert fields["route"] == "/sessions/{session_id}/generate" and fields["method"] == "POST"
    assert fields["status"] == 200 and fields["stream"] is True
    assert fields["session"] == sha("alice-secret")
    assert fields["prompt_tokens"] == done["usage"]["prompt_tokens"] > 0
    assert fields["completion_tokens"] == done["usage"]["completion_tokens"] == 6
    assert fields["finish"] == "length"
    assert fields["ttft_ms"] == pytest.approx(done["ttft_s"] * 1000, abs=1e-3)
    assert fields["tpot_ms"] == pytest.approx(done["tpot_s"] * 1000, abs=1e-3)
    assert fields["duration_ms"] >= fields["ttft_ms"] > 0
    text = record.getMessage()
    assert text.startswith("POST /sessions/{session_id}/generate 200 request_id=client-req-42 ")
    for part in (
        f"session={sha('alice-secret')}",
        "prompt_tokens=",
        "completion_tokens=6",
        "ttft_ms=",
        "tpot_ms=",
        "duration_ms=",
    ):
        assert part in text, text
    assert plain_record.h2o_fields["completion_tokens"] == plain.json()["usage"]["completion_tokens"]
    assert "stream" not in plain_record.h2o_fields
    # Neither the raw session id nor the key is in any line, text or JSON.
    for r in request_log.records():
        for line in (r.getMessage(), JsonFormatter().format(r)):
            assert "alice-secret" not in line and KEY not in line


def test_a_missing_or_insane_request_id_is_replaced_by_a_generated_one(serve, request_log):
    server = serve()
    with server.client() as client:
        ids = [
            client.get("/health", headers=headers).headers["x-request-id"]
            for headers in ({}, {"X-Request-Id": "has space"}, {"X-Request-Id": "x" * 129}, {"X-Request-Id": 'quote"d'})
        ]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 4
    # Probes are logged at DEBUG, so they stay out of an INFO log.
    assert all(request_log.wait(i).levelno == logging.DEBUG for i in ids)


def test_json_lines_parse_and_hold_the_fields(serve, request_log):
    server = serve()
    with server.client() as client:
        _, done = generate(client, "json-log", "hi", max_new_tokens=3)
        assert client.get("/no/such/route", headers={"X-Request-Id": "r404"}).status_code == 404
        response = client.post(
            "/v1/chat/completions",
            headers={"X-Request-Id": "openai-1"},
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
    lines = [JsonFormatter().format(r) for r in (request_log.wait("openai-1"), request_log.wait("r404"))]
    assert all("\n" not in line for line in lines)
    chat, missing = map(json.loads, lines)
    assert chat["level"] == "INFO" and chat["logger"] == "app.requests"
    assert chat["message"] == "POST /v1/chat/completions 200"
    assert chat["route"] == "/v1/chat/completions" and chat["status"] == 200
    assert chat["completion_tokens"] == response.json()["usage"]["completion_tokens"]
    assert chat["cached_tokens"] == 0 and len(chat["session"]) == 16
    assert isinstance(chat["ttft_ms"], float) and isinstance(chat["duration_ms"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", chat["time"])
    # An unmatched path is not logged as such (a path can hold a session id).
    assert missing["route"] == "(unmatched)" and missing["status"] == 404 and "session" not in missing


def test_a_stream_that_ends_in_an_error_event_is_logged_at_error_with_its_cause(serve, request_log, monkeypatch):
    server = serve()
    real_sample, calls = app.output_processor.sample, []

    def failing_sample(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_sample(*args)

    with server.client() as client:
        monkeypatch.setattr(app.output_processor, "sample", failing_sample)
        with client.stream(
            "POST",
            "/sessions/failing/generate",
            headers={"X-Request-Id": "broken-stream"},
            json={"message": "boom", "max_new_tokens": 4},
        ) as response:
            assert response.status_code == 200
            events = list(sse_events(response))
        monkeypatch.setattr(app.output_processor, "sample", real_sample)
    assert [e for e, _ in events] == ["token", "error"]
    record = request_log.wait("broken-stream")
    fields = record.h2o_fields
    assert record.levelno == logging.ERROR
    assert fields["status"] == 200 and fields["stream"] is True
    assert fields["finish"] == "error" and fields["error"] == "generation_error"
    assert "injected failure" in fields["cause"]
    assert fields["completion_tokens"] == 1 and fields["ttft_ms"] > 0
    assert 'cause="generation failed: injected failure"' in record.getMessage()


def test_rejections_are_logged_at_warning_and_counted_by_reason(serve, request_log):
    from tests.app.conftest import scrape

    server = serve(max_sessions=1)
    with server.client() as client:
        generate(client, "only", "hi", max_new_tokens=2)
        refused = client.post(
            "/sessions/another/generate",
            headers={"X-Request-Id": "refused"},
            json={"message": "hi", "max_new_tokens": 2},
        )
        server.app.state.server.draining = True
        draining = client.post(
            "/sessions/only/generate", headers={"X-Request-Id": "draining"}, json={"message": "hi", "max_new_tokens": 2}
        )
        server.app.state.server.draining = False
        metrics = scrape(client)
    assert refused.status_code == 429 and draining.status_code == 503
    for request_id, reason, status in (("refused", "too_many_sessions", 429), ("draining", "shutting_down", 503)):
        record = request_log.wait(request_id)
        assert record.levelno == logging.WARNING
        assert record.h2o_fields["status"] == status and record.h2o_fields["error"] == reason
        assert "cause" not in record.h2o_fields  # error messages may name sessions: only the type is logged
        assert metrics[f'h2o_requests_rejected_total{{reason="{reason}"}}'] == 1
    assert request_log.wait("refused").h2o_fields["session"] == sha("another")
    assert metrics['h2o_requests_rejected_total{reason="queue_full"}'] == 0
    assert metrics['h2o_requests_total{outcome="rejected"}'] == 2

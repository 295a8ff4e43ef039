"""The load-test tooling on its own: SSE parsing and stream checks, the locust CSV summary, the loopback guard, the
dashboard query extraction and the generated Prometheus config."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from loadtest import dashboard
from loadtest.run import check_loopback, percentile_ms, summarize
from loadtest.stack import prometheus_config
from loadtest.streams import StreamError, read_native, read_openai, sse_events


class FakeResponse:
    def __init__(self, body: bytes, chunk: int = 7):
        self.chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]

    def iter_content(self, chunk_size=None):
        return iter(self.chunks)


def native(tokens: list[str], completion: int | None = None, done: bool = True) -> bytes:
    events = [f"event: token\r\ndata: {json.dumps({'text': t, 'token_id': i})}\r\n\r\n" for i, t in enumerate(tokens)]
    events.insert(1, ": ping\r\n\r\n")
    if done:
        usage = {"prompt_tokens": 5, "completion_tokens": len(tokens) if completion is None else completion}
        events.append(f"event: done\r\ndata: {json.dumps({'finish_reason': 'length', 'usage': usage})}\r\n\r\n")
    return "".join(events).encode()


def test_sse_events_do_not_depend_on_chunk_boundaries():
    body = 'event: token\r\ndata: {"text": "é€"}\r\n\r\n: ping\r\n\r\nevent: done\r\ndata: {"x": 1}\r\n\r\n'.encode()
    expected = [("token", '{"text": "é€"}'), ("done", '{"x": 1}')]
    assert list(sse_events([body])) == expected
    for i in range(len(body)):
        for j in range(i, len(body)):
            assert list(sse_events([body[:i], body[i:j], body[j:]])) == expected


def test_sse_events_accept_lf_and_multiline_data():
    assert list(sse_events([b"data: a\ndata: b\n\ndata: [DONE]\n\n"])) == [("message", "a\nb"), ("message", "[DONE]")]


def test_read_native_times_every_token_and_checks_done():
    assert len(read_native(FakeResponse(native(["a", "b", "c"])))) == 3
    # The end-of-turn token is counted as completion but may have no event.
    assert len(read_native(FakeResponse(native(["a", "b"], completion=3)))) == 2
    with pytest.raises(StreamError, match="completion tokens"):
        read_native(FakeResponse(native(["a", "b"], completion=5)))
    with pytest.raises(StreamError, match="without a done event"):
        read_native(FakeResponse(native(["a"], done=False)))
    with pytest.raises(StreamError, match="error event"):
        read_native(FakeResponse(b'event: error\r\ndata: {"detail": "boom"}\r\n\r\n'))


def openai_chunk(content: str | None, finish_reason: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish_reason}]})}\n\n"


def test_read_openai_needs_finish_reason_and_done():
    body = openai_chunk("") + openai_chunk("Hel") + openai_chunk("lo") + openai_chunk(None, "stop") + "data: [DONE]\n\n"
    assert len(read_openai(FakeResponse(body.encode()))) == 2
    with pytest.raises(StreamError, match="finish_reason"):
        read_openai(FakeResponse((openai_chunk("a") + "data: [DONE]\n\n").encode()))
    with pytest.raises(StreamError, match="without \\[DONE\\]"):
        read_openai(FakeResponse((openai_chunk("a") + openai_chunk(None, "stop")).encode()))


def test_percentile_matches_the_sorted_samples():
    rng = random.Random(0)
    for _ in range(200):
        samples = [rng.choice([10, 20, 30, 40, 100, 250, 1000]) for _ in range(rng.randint(1, 60))]
        histogram = Counter(samples)
        for fraction in (0.5, 0.95, 0.99):
            expected = sorted(samples)[min(int(len(samples) * fraction), len(samples) - 1)]
            assert percentile_ms(histogram, fraction) == expected
    assert percentile_ms({}, 0.5) is None


def test_summarize_reads_locust_final_stats(tmp_path):
    def entry(method, name, times, failures=0):
        return {
            "method": method,
            "name": name,
            "num_requests": sum(times.values()),
            "num_failures": failures,
            "response_times": {str(t): n for t, n in times.items()},
        }

    final = tmp_path / "locust_final.json"
    final.write_text(
        json.dumps(
            [
                entry("POST", "/sessions/[id]/generate", {900: 8, 2000: 2}, failures=1),
                entry("TTFT", "/sessions/[id]/generate", {100: 5, 300: 4}),
                entry("TPOT", "/sessions/[id]/generate", {40: 9}),
                entry("POST", "/v1/chat/completions", {800: 4}),
                entry("TTFT", "/v1/chat/completions", {200: 4}),
                entry("DELETE", "/sessions/[id]", {5: 3}),
            ]
        )
    )
    summary = summarize(final)
    assert (summary["requests"], summary["replies"], summary["failures"]) == (17, 14, 1)
    native = summary["endpoints"]["/sessions/[id]/generate"]
    assert native["ttft_ms"] == {"p50": 100.0, "p95": 300.0, "p99": 300.0, "samples": 9}
    assert native["latency_ms"]["p50"] == 900.0
    assert summary["ttft_ms"]["samples"] == 13 and summary["ttft_ms"]["p50"] == 200.0
    assert "tpot_ms" not in summary["endpoints"]["/v1/chat/completions"]


@pytest.mark.parametrize("host", ["http://127.0.0.1:8000", "http://localhost:1234", "http://[::1]:80"])
def test_loopback_hosts_pass(host):
    check_loopback(host)


@pytest.mark.parametrize("host", ["http://10.0.0.5:8000", "https://example.com", "http://0.0.0.0:8000"])
def test_other_hosts_are_refused(host):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(host)


def test_dashboard_queries_substitute_only_the_rate_interval():
    queries = dashboard.panel_queries()
    assert len(queries) >= 14
    assert all("$" not in dashboard.substitute(q.expr, "15s") for q in queries)
    assert any("[15s]" in dashboard.substitute(q.expr, "15s") for q in queries)
    with pytest.raises(ValueError, match="unsupported Grafana variable"):
        dashboard.substitute("rate(x[$__interval])", "15s")


def test_prometheus_config_keeps_the_job_and_replaces_target_and_interval():
    config = prometheus_config("127.0.0.1:12345", "1s")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "h2o-serve"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:12345"]}]
    assert config["global"]["scrape_interval"] == "1s"

"""/metrics, scraped over HTTP and parsed with prometheus_client, against what the requests reported."""

import pytest

from tests.app.conftest import generate, scrape


def test_metrics_match_what_was_generated(serve):
    server = serve()
    with server.client() as client:
        dones = [generate(client, sid, f"hello {i}", max_new_tokens=12, temperature=0)[1]
                 for i in range(2) for sid in ("m1", "m2")]
        assert client.post("/sessions/m1/generate", json={"message": ""}).status_code == 422
        sessions = client.get("/sessions").json()["sessions"]
        metrics = scrape(client)
        assert client.delete("/sessions/m2").status_code == 204
        after_delete = scrape(client)

    assert metrics["h2o_prompt_tokens_total"] == sum(d["usage"]["prompt_tokens"] for d in dones)
    assert metrics["h2o_generation_tokens_total"] == sum(d["usage"]["completion_tokens"] for d in dones)
    assert metrics["h2o_time_to_first_token_seconds_count"] == len(dones)
    assert metrics["h2o_time_to_first_token_seconds_sum"] == pytest.approx(sum(d["ttft_s"] for d in dones))
    assert metrics["h2o_time_per_output_token_seconds_count"] == len(dones)
    assert metrics["h2o_time_per_output_token_seconds_sum"] == pytest.approx(sum(d["tpot_s"] for d in dones))
    assert metrics['h2o_time_to_first_token_seconds_bucket{le="+Inf"}'] == len(dones)
    for reason in ("stop", "length"):
        expected = sum(d["finish_reason"] == reason for d in dones)
        assert metrics[f'h2o_requests_total{{outcome="{reason}"}}'] == expected
    assert metrics['h2o_requests_total{outcome="invalid"}'] == 1
    assert metrics['h2o_requests_total{outcome="cancelled"}'] == 0
    assert metrics["h2o_requests_running"] == metrics["h2o_requests_waiting"] == 0

    assert metrics["h2o_sessions_active"] == 2
    assert metrics["h2o_kv_cache_tokens"] == sum(s["cache_tokens"] for s in sessions) == \
        sum(d["cache_tokens"] for d in dones[2:])
    assert metrics["h2o_kv_cache_bytes"] == sum(s["cache_bytes"] for s in sessions) > 0
    assert metrics["h2o_cache_evictions_total"] == sum(s["evicted_tokens"] for s in sessions) > 0
    assert metrics["h2o_gpu_memory_allocated_bytes"] == metrics["h2o_gpu_memory_reserved_bytes"] == 0
    assert metrics["process_resident_memory_bytes"] > 0

    m1 = next(s for s in sessions if s["id"] == "m1")
    assert after_delete["h2o_sessions_active"] == 1
    assert after_delete["h2o_kv_cache_tokens"] == m1["cache_tokens"]
    assert after_delete["h2o_cache_evictions_total"] == metrics["h2o_cache_evictions_total"]  # a counter


def test_metric_names_follow_prometheus_conventions(server):
    with server.client() as client:
        names = {name.split("{")[0] for name in scrape(client)}
    expected = {"h2o_kv_cache_tokens", "h2o_kv_cache_bytes", "h2o_sessions_active", "h2o_gpu_memory_allocated_bytes",
                "h2o_gpu_memory_reserved_bytes", "process_resident_memory_bytes",
                "h2o_time_to_first_token_seconds_bucket", "h2o_time_per_output_token_seconds_bucket",
                "h2o_prompt_tokens_total", "h2o_generation_tokens_total", "h2o_requests_total",
                "h2o_requests_running", "h2o_requests_waiting", "h2o_cache_evictions_total"}
    assert expected <= names

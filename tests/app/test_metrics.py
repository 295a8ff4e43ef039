"""/metrics, scraped over HTTP and parsed with prometheus_client, against what the requests reported."""

import pytest

from tests.app.conftest import SMALL_POLICY, SMALL_SLACK, generate, scrape


def test_metrics_match_what_was_generated(serve):
    server = serve()
    with server.client() as client:
        dones = [
            generate(client, sid, f"hello {i}", max_new_tokens=12, temperature=0)[1]
            for i in range(2)
            for sid in ("m1", "m2")
        ]
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
    assert (
        metrics["h2o_kv_cache_tokens"]
        == sum(s["cache_tokens"] for s in sessions)
        == sum(d["cache_tokens"] for d in dones[2:])
    )
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
    expected = {
        "h2o_kv_cache_tokens",
        "h2o_kv_cache_bytes",
        "h2o_sessions_active",
        "h2o_gpu_memory_allocated_bytes",
        "h2o_gpu_memory_reserved_bytes",
        "process_resident_memory_bytes",
        "h2o_time_to_first_token_seconds_bucket",
        "h2o_time_per_output_token_seconds_bucket",
        "h2o_prompt_tokens_total",
        "h2o_generation_tokens_total",
        "h2o_requests_total",
        "h2o_requests_running",
        "h2o_requests_waiting",
        "h2o_cache_evictions_total",
        "h2o_e2e_request_latency_seconds_bucket",
        "h2o_request_queue_time_seconds_bucket",
        "h2o_request_prefill_time_seconds_bucket",
        "h2o_request_decode_time_seconds_bucket",
        "h2o_inter_token_latency_seconds_bucket",
        "h2o_decode_batch_size_bucket",
        "h2o_kv_cache_usage_ratio",
        "h2o_kv_cache_capacity_bytes",
        "h2o_requests_rejected_total",
        "h2o_build_info",
    }
    assert expected <= names


def test_request_latency_metrics_after_vllms_set(serve):
    """Queue, prefill, decode and end-to-end times once per turn; inter-token latency once per token after the
    first; the decode batch per step; KV usage over the configured capacity; build info."""
    import threading

    from h2o_cache import CachePolicy
    from h2o_cache.budget import session_nbytes

    server = serve(max_sessions=8)
    with server.client() as client:
        dones = [
            generate(client, "v1", "hello", max_new_tokens=7, temperature=0)[1],
            generate(client, "v2", "hi there", max_new_tokens=1)[1],
        ]
        plain = client.post("/sessions/v1/generate", json={"message": "more", "max_new_tokens": 5, "stream": False})
        dones.append(plain.json())
        # Three long streams at once share decode steps.
        threads = [
            threading.Thread(
                target=lambda sid=sid: dones.append(
                    generate(client, sid, "go", max_new_tokens=48, min_new_tokens=48)[1]
                )
            )
            for sid in ("b1", "b2", "b3")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = scrape(client)
        sessions = client.get("/sessions").json()["sessions"]

    turns = len(dones)
    tokens = [d["usage"]["completion_tokens"] for d in dones]
    assert turns == 6 and sum(tokens) == metrics["h2o_generation_tokens_total"]
    for name in (
        "h2o_request_queue_time_seconds",
        "h2o_request_prefill_time_seconds",
        "h2o_request_decode_time_seconds",
        "h2o_e2e_request_latency_seconds",
    ):
        assert metrics[f"{name}_count"] == turns, name
        assert metrics[f'{name}_bucket{{le="+Inf"}}'] == turns, name
    # Every token after a turn's first is one observation; together they span first to last token of each turn.
    assert metrics["h2o_inter_token_latency_seconds_count"] == sum(n - 1 for n in tokens)
    decode_s = sum(d["tpot_s"] * (d["usage"]["completion_tokens"] - 1) for d in dones)
    assert metrics["h2o_inter_token_latency_seconds_sum"] == pytest.approx(decode_s, rel=1e-6)
    assert metrics["h2o_request_decode_time_seconds_sum"] == pytest.approx(decode_s, rel=1e-6)
    assert metrics["h2o_time_to_first_token_seconds_sum"] == pytest.approx(
        metrics["h2o_request_queue_time_seconds_sum"] + metrics["h2o_request_prefill_time_seconds_sum"], rel=1e-6
    )
    assert metrics["h2o_e2e_request_latency_seconds_sum"] >= metrics["h2o_time_to_first_token_seconds_sum"] + decode_s
    # One observation per step that sampled: their sum is every token; the concurrent streams batched.
    assert metrics["h2o_decode_batch_size_sum"] == sum(tokens)
    assert metrics['h2o_decode_batch_size_bucket{le="1.0"}'] < metrics["h2o_decode_batch_size_count"]

    model = server.app.state.server.engine.model
    per_session = session_nbytes(
        model.config, CachePolicy.parse(SMALL_POLICY, slack=SMALL_SLACK, default_kv_dtype="k8v4"), model.dtype
    )
    assert metrics["h2o_kv_cache_capacity_bytes"] == 8 * per_session
    held = sum(s["cache_bytes"] for s in sessions)
    assert metrics["h2o_kv_cache_usage_ratio"] == pytest.approx(held / (8 * per_session)) and 0 < held

    (build,) = [k for k in metrics if k.startswith("h2o_build_info{")]
    assert metrics[build] == 1
    assert f'kv_dtype="k8v4",model="smollm2",policy="{SMALL_POLICY}",version="0.1.0"' in build
    assert build.startswith('h2o_build_info{device="cpu",')


def test_kv_capacity_follows_the_session_limits(serve, tmp_path):
    server = serve(max_sessions=100, max_resident_sessions=3, max_session_bytes=50_000, snapshot_dir=str(tmp_path))
    with server.client() as client:
        metrics = scrape(client)
    assert metrics["h2o_kv_cache_capacity_bytes"] == 3 * 50_000
    assert metrics["h2o_kv_cache_usage_ratio"] == 0

"""The whole monitoring path for real: the server (a tiny random Llama with SmolLM2's tokenizer, so decoding is fast
and load is deterministic in shape), the Debian Prometheus scraping it every second with the repo's config, a short
headless locust load, then every PromQL query of the Grafana dashboard through Prometheus' HTTP API.

Grafana's ``$__rate_interval`` is replaced by ``15s``: with 1 s scrapes that spans 15 samples, and the load (20 s)
fills the window. ~45 s on two CPU cores.
"""

from __future__ import annotations

import pytest

from loadtest.run import load_run
from loadtest.stack import prometheus_binary, save_tiny_llama

USERS = 3
RUN_TIME_S = 20

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        prometheus_binary() is None, reason="prometheus not installed (Debian package; scripts/system-deps.sh)"
    ),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def summary(tiny_model, tmp_path_factory) -> dict:
    env = {
        "H2O_MODEL": tiny_model,
        "H2O_DEVICE": "cpu",
        # A small cache and slack, so multi-turn chats evict within seconds and the evictions panel has data.
        "H2O_POLICY": "h2o_4_16_48",
        "H2O_POLICY_SLACK": "8",
        "H2O_SNAPSHOT_DIR": str(tmp_path_factory.mktemp("snapshots")),
    }
    return load_run(
        tmp_path_factory.mktemp("load"),
        serve_env=env,
        prometheus=True,
        users=USERS,
        run_time_s=RUN_TIME_S,
        max_new_tokens=16,
        turns=4,
        rate_interval="15s",
    )


def test_load_has_no_failures_and_reports_ttft_and_tpot(summary):
    assert summary["replies"] > 0
    assert summary["failures"] == 0 and summary["locust_exit_code"] == 0
    for name in ("/sessions/[id]/generate", "/v1/chat/completions"):
        endpoint = summary["endpoints"][name]
        assert endpoint["requests"] > 0, name
        assert endpoint["ttft_ms"]["p50"] > 0 and endpoint["tpot_ms"]["p50"] > 0, name
    # Users delete their sessions when they stop.
    assert summary["endpoints"]["/sessions/[id]"]["requests"] >= 1


def test_every_dashboard_query_returns_data(summary):
    empty = [(d["panel"], d["promql"]) for d in summary["dashboard"] if not d["has_data"]]
    assert not empty, f"dashboard queries without data: {empty}"


def test_prometheus_counted_every_request_locust_made(summary):
    assert summary["server_requests_total"] == summary["replies"]


def test_the_load_generated_tokens_and_evicted(summary):
    def last(promql_start: str) -> float:
        query = next(d for d in summary["dashboard"] if d["promql"].startswith(promql_start))
        return max(query["last"].values())

    assert last("sum(rate(h2o_generation_tokens_total") > 0
    assert last("sum(rate(h2o_cache_evictions_total") > 0

"""Bytes per conversation: a session reports (and the metrics add up) the bytes its cache holds, a short session
holds only its pages, each session may choose how its keys and values are stored (kept through snapshots), and the
server refuses what is over its limits before anything is created."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import ValidationError

from app.engine import Engine
from app.main import create_app
from app.metrics import Metrics
from app.sampling import SamplingParams
from app.sessions import Session
from app.settings import DEFAULT_KV_DTYPE, Settings
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes
from tests.app.conftest import SMALL_POLICY, SMALL_SLACK, generate, run_server, scrape

GREEDY = {"temperature": 0}
LARGE_POLICY = "h2o_4_64_1024"
"""Large enough that a ~100-token session is a small part of a full one."""


def resident(server, session_id: str) -> Session:
    return server.app.state.server.sessions.get(session_id)


def full_bytes(server, policy: CachePolicy) -> int:
    model = server.app.state.server.engine.model
    return session_nbytes(model.config, policy, model.dtype)


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "alone"])
def test_a_short_session_holds_its_pages_and_reports_them(serve, batching):
    """~100 tokens: the prompt fits one page and the reply crosses into the second, so a batched turn's bytes
    change after it left the prefill cache; at rest the session keeps no decoded working copy."""
    server = serve(policy=LARGE_POLICY, policy_slack=64, batching=batching)
    with server.client() as client:
        _, done = generate(client, "short", "Tell me about the sea.", max_new_tokens=40, min_new_tokens=40, **GREEDY)
        info = client.get("/sessions/short").json()
    model = server.app.state.server.engine.model
    policy = CachePolicy.parse(info["policy"], slack=64)
    assert done["usage"]["prompt_tokens"] <= 64 < done["cache_tokens"] == info["cache_tokens"] <= 128
    expected = session_nbytes(model.config, policy, model.dtype, n_tokens=info["cache_tokens"])
    assert info["cache_bytes"] == expected == 2 * session_nbytes(model.config, policy, model.dtype, n_tokens=1)
    assert info["cache_bytes"] * 8 < full_bytes(server, policy)
    cache = resident(server, "short").cache
    assert cache.nbytes() == info["cache_bytes"] and cache.working_nbytes() == 0


def test_batched_turns_update_cache_bytes(serve):
    server = serve(policy=LARGE_POLICY, policy_slack=64)
    with server.client() as client:
        sizes = []
        for i in range(3):
            generate(client, "growing", f"turn {i}: tell me more", max_new_tokens=48, min_new_tokens=48, **GREEDY)
            sizes.append(client.get("/sessions/growing").json()["cache_bytes"])
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[-1] == resident(server, "growing").cache.nbytes()


def test_kv_dtype_round_trips_through_the_api_and_a_restart(tiny_model, tmp_path):
    """Chosen by field, by name suffix or by default; a restarted server continues each session with the tokens
    an uninterrupted one gives."""
    settings = Settings(policy=SMALL_POLICY, policy_slack=SMALL_SLACK, snapshot_dir=str(tmp_path))
    chosen = {
        "field": ({"kv_dtype": "int8"}, "int8"),
        "suffix": ({"policy": "h2o_4_8_32_int4"}, "int4"),
        "both": ({"policy": "h2o_4_8_32_fp16", "kv_dtype": "fp16"}, "fp16"),
        "default": ({}, DEFAULT_KV_DTYPE),
    }
    first = run_server(create_app(settings, preloaded=tiny_model))
    server = next(first)
    try:
        with server.client() as client:
            reference = {}
            for sid, (body, _) in chosen.items():
                generate(client, sid, "Hello there", max_new_tokens=8, **GREEDY, **body)
                generate(client, f"{sid}-ref", "Hello there", max_new_tokens=8, **GREEDY, **body)
                reference[sid] = generate(client, f"{sid}-ref", "And then?", max_new_tokens=8, **GREEDY)[0]
            before = {sid: client.get(f"/sessions/{sid}").json() for sid in chosen}
    finally:
        first.close()
    stored = sorted(json.loads(p.read_text())["body"]["session"]["policy"]["kv_dtype"] for p in tmp_path.glob("*.json"))
    assert stored == sorted(kv_dtype for _, kv_dtype in chosen.values() for _ in ("session", "reference"))

    second = run_server(create_app(settings, preloaded=tiny_model))
    server = next(second)
    try:
        with server.client() as client:
            after = {sid: client.get(f"/sessions/{sid}").json() for sid in chosen}
            continued = {sid: generate(client, sid, "And then?", max_new_tokens=8, **GREEDY)[0] for sid in chosen}
    finally:
        second.close()
    for sid, (_, kv_dtype) in chosen.items():
        assert (before[sid]["kv_dtype"], after[sid]["kv_dtype"]) == (kv_dtype, kv_dtype)
        assert before[sid]["policy"] == after[sid]["policy"] == CachePolicy.parse(SMALL_POLICY, kv_dtype=kv_dtype).name
        assert continued[sid] == reference[sid]


def bad_bodies(tiny_limit: int) -> list:
    return [
        ({"kv_dtype": "int3"}, "unknown kv_dtype 'int3'"),
        ({"policy": "h2o_4_8_32_int3"}, "unknown cache policy"),
        ({"policy": "h2o_4_8_32_int8", "kv_dtype": "int4"}, "names kv_dtype 'int8'"),
        ({"kv_dtype": "bf16"}, "H2O_ALLOWED_KV_DTYPES"),
        ({"kv_dtype": "fp32"}, f"this server allows {tiny_limit:,} (H2O_MAX_SESSION_BYTES)"),
        ({"policy": "h2o_4_8_48"}, f"this server allows {tiny_limit:,} (H2O_MAX_SESSION_BYTES)"),
    ]


def test_over_the_limits_or_unknown_kv_dtype_gets_422_and_creates_nothing(serve, tiny_model):
    """The byte limit lets the default policy through in k8v4 (and int8) but not in fp32, nor a larger policy."""
    model, _ = tiny_model
    small = CachePolicy.parse(SMALL_POLICY, slack=SMALL_SLACK)
    limit = session_nbytes(model.config, small.replace(kv_dtype="int8"), model.dtype)
    over = session_nbytes(model.config, small.replace(kv_dtype="fp32"), model.dtype)
    server = serve(max_session_bytes=limit, allowed_kv_dtypes="fp32,int8,k8v4", kv_dtype="k8v4")
    with server.client() as client:
        for body, message in bad_bodies(limit):
            response = client.post("/sessions/refused/generate", json={"message": "hi", **body})
            assert response.status_code == 422, body
            assert message in response.json()["error"]["message"], response.json()
            if body == {"kv_dtype": "fp32"}:
                assert f"{over:,} bytes" in response.json()["error"]["message"]
            assert client.get("/sessions/refused").status_code == 404
        openai = client.post(
            "/v1/chat/completions",
            headers={"X-Session-Id": "refused", "X-H2O-KV-Dtype": "int3"},
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert openai.status_code == 422 and client.get("/sessions/refused").status_code == 404
        assert client.get("/sessions").json()["sessions"] == []

        generate(client, "kept", "hi", kv_dtype="int8", max_new_tokens=4, **GREEDY)
        before = client.get("/sessions/kept").json()
        other = client.post("/sessions/kept/generate", json={"message": "x", "kv_dtype": "k8v4"})
        same = client.post(
            "/sessions/kept/generate",
            json={"message": "x", "kv_dtype": "int8", "stream": False, "max_new_tokens": 4, **GREEDY},
        )
        by_name = client.post(
            "/sessions/kept/generate",
            json={"message": "x", "policy": SMALL_POLICY, "stream": False, "max_new_tokens": 4, **GREEDY},
        )
    assert other.status_code == 422 and "kv_dtype int8" in other.json()["error"]["message"]
    assert same.status_code == by_name.status_code == 200  # unsaid parts of a policy are the session's own
    assert before["kv_dtype"] == "int8"


def test_settings_check_kv_dtypes_at_startup(monkeypatch):
    monkeypatch.setenv("H2O_ALLOWED_KV_DTYPES", "int8, k8v4")
    assert Settings().allowed_kv_dtypes == ["int8", "k8v4"] and Settings().kv_dtype == DEFAULT_KV_DTYPE
    with pytest.raises(ValidationError, match="not among allowed_kv_dtypes"):
        Settings(kv_dtype="int4")
    with pytest.raises(ValidationError, match="unknown kv_dtype"):
        Settings(allowed_kv_dtypes="int8,int3")


def test_the_cache_gauge_is_the_sum_of_what_sessions_hold(serve):
    server = serve()
    with server.client() as client:
        for sid, body in (("g1", {}), ("g2", {"kv_dtype": "int8"}), ("g3", {"kv_dtype": "auto"})):
            for turn in range(2):
                generate(client, sid, f"turn {turn}", max_new_tokens=12, **body, **GREEDY)
        sessions = client.get("/sessions").json()["sessions"]
        metrics = scrape(client)
    held = [resident(server, s["id"]).cache.nbytes() for s in sessions]
    assert metrics["h2o_kv_cache_bytes"] == sum(s["cache_bytes"] for s in sessions) == sum(held) > 0
    assert len({s["cache_bytes"] for s in sessions}) == 3  # one storage each
    assert metrics["h2o_kv_pool_bytes"] == 0  # no turn running: the pool is gone


def test_the_pool_gauge_follows_the_pool(tiny_model, monkeypatch):
    """After every batched round the gauge is what the pool holds, its decoded working copy included."""
    seen: list[tuple[float, int, int]] = []
    real = Engine._execute

    def recording(self, plan):
        real(self, plan)
        pool = self.runner.pool
        gauge = self.metrics.registry.get_sample_value("h2o_kv_pool_bytes")
        working = pool.cache.working_nbytes() if pool.cache is not None else 0
        seen.append((gauge, pool.nbytes(), working))

    monkeypatch.setattr(Engine, "_execute", recording)
    engine = Engine(Settings(policy=SMALL_POLICY, policy_slack=SMALL_SLACK), Metrics(), preloaded=tiny_model)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    policy = CachePolicy.parse(SMALL_POLICY, slack=SMALL_SLACK, kv_dtype="k8v4")
    sessions = [Session(id=f"p{i}", policy=policy) for i in range(3)]

    async def turn(session: Session, n: int) -> None:
        generation = engine.submit(
            session, [{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=n, min_new_tokens=n)
        )
        async for _ in generation:
            pass

    async def everyone() -> None:
        await asyncio.gather(*(turn(s, 6 + 4 * i) for i, s in enumerate(sessions)))

    try:
        asyncio.run(everyone())
    finally:
        engine.stop()
    assert all(gauge == nbytes for gauge, nbytes, _ in seen)
    assert any(working > 0 for _, _, working in seen)
    assert seen[-1][0] == 0

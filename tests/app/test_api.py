"""The native API over real HTTP: multi-turn caching, SSE, errors, concurrency, disconnects, back-pressure."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.main import create_app
from app.protocol import (
    MAX_API_KEY_CHARS,
    MAX_CHAT_MESSAGES,
    MAX_CONTENT_PARTS,
    MAX_KV_DTYPE_CHARS,
    MAX_MODEL_CHARS,
    MAX_NAME_CHARS,
    MAX_POLICY_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_USER_CHARS,
)
from app.settings import DEFAULT_KV_DTYPE, Settings
from h2o_cache import CachePolicy
from tests.app.conftest import SMALL_SLACK, generate, run_server, scrape, sse_events, wait_for_metric, wait_until

GREEDY = {"temperature": 0, "max_new_tokens": 6}


def test_multi_turn_feeds_only_the_delta_and_the_cache_stays_within_its_budget(server):
    policy, capacity = "h2o_4_16_64", 64
    with server.client() as client:
        turns = [generate(client, "multi", f"turn {i}", policy=policy, **GREEDY)[1] for i in range(6)]
        session = client.get("/sessions/multi").json()
    fed = [t["usage"]["prompt_tokens"] + t["usage"]["completion_tokens"] for t in turns]
    # Every sampled token but the last of a turn is fed during the turn; the last opens the next turn's prompt
    # (so it counts in one turn's completion and the next one's prompt).
    assert [t["cache_tokens_seen"] for t in turns] == [sum(fed[: i + 1]) - (i + 1) for i in range(len(fed))]
    later_prompts = {t["usage"]["prompt_tokens"] for t in turns[1:]}
    assert len(later_prompts) == 1 and later_prompts.pop() < turns[0]["usage"]["prompt_tokens"]
    kept = [t["cache_tokens"] for t in turns]
    assert kept[0] == turns[0]["cache_tokens_seen"] < kept[1]  # grows while under budget
    assert turns[-1]["cache_tokens_seen"] > capacity + SMALL_SLACK
    assert all(k <= capacity + SMALL_SLACK for k in kept) and kept[-1] >= capacity
    assert session["policy"] == CachePolicy.parse(policy, kv_dtype=DEFAULT_KV_DTYPE).name  # the server's storage
    assert session["kv_dtype"] == DEFAULT_KV_DTYPE and session["cache_budget"] == capacity + SMALL_SLACK
    assert session["turns"] == 6 and len(session["messages"]) == 12
    assert session["evicted_tokens"] == session["cache_tokens_seen"] - session["cache_tokens"] > 0
    assert session["cache_bytes"] > 0 and not session["busy"]


def test_sse_tokens_match_the_non_streaming_reply(server, tokenizer):
    body = {"message": "Say something", "max_new_tokens": 10, "temperature": 0.9, "seed": 1234}
    with server.client() as client:
        tokens, done = generate(client, "sse-a", **body)
        response = client.post("/sessions/sse-b/generate", json={**body, "stream": False})
    assert response.status_code == 200
    whole = response.json()
    text = "".join(t["text"] for t in tokens)
    assert text == whole["text"] == tokenizer.decode([t["token_id"] for t in tokens], skip_special_tokens=True)
    assert len(tokens) == done["usage"]["completion_tokens"] - (done["finish_reason"] == "stop")
    assert {k: v for k, v in whole.items() if k not in ("text", "ttft_s", "tpot_s")} == {
        k: v for k, v in done.items() if k not in ("ttft_s", "tpot_s")
    }
    assert done["ttft_s"] > 0 and done["tpot_s"] > 0


def test_sse_sends_keep_alive_pings(serve, gate):
    """A stream that stalls (the gate holds the model after the first token) carries comment pings meanwhile."""
    server = serve(sse_ping_s=0.05)
    lines = []
    with (
        server.client() as client,
        client.stream("POST", "/sessions/ping/generate", json={"message": "hi", "max_new_tokens": 12}) as response,
    ):
        for line in response.iter_lines():
            lines.append(line)
            if line == "event: token":
                gate.close()
            elif line.startswith(":"):
                gate.open()
    assert any(line.startswith(":") for line in lines)
    assert "event: done" in lines


def test_a_second_generate_on_a_busy_session_gets_409_and_the_first_completes(server, gate):
    with server.client() as first, server.client() as second:
        with first.stream("POST", "/sessions/busy/generate", json={"message": "long", "max_new_tokens": 30}) as r:
            events = sse_events(r)
            assert next(events)[0] == "token"
            gate.close()  # the first turn cannot end meanwhile: the 409 does not wait for it
            conflict = second.post("/sessions/busy/generate", json={"message": "again"})
            gate.open()
            rest = list(events)
        session = second.get("/sessions/busy").json()
    assert conflict.status_code == 409
    assert "generating" in conflict.json()["error"]["message"]
    assert rest[-1][0] == "done" and rest[-1][1]["finish_reason"] == "length"
    assert session["turns"] == 1 and len(session["messages"]) == 2


def test_disconnect_mid_stream_keeps_the_partial_reply_and_the_next_turn_works(server):
    with server.client() as client:
        # Reference: a turn that ran to its length limit, then a second turn.
        first = generate(client, "ref", "hello", max_new_tokens=20)[1]
        reference = generate(client, "ref", "again", **GREEDY)[1]
        with client.stream("POST", "/sessions/gone/generate", json={"message": "hello", "max_new_tokens": 200}) as r:
            events = sse_events(r)
            received = [next(events) for _ in range(3)]
        assert all(event == "token" for event, _ in received)
        deadline = time.monotonic() + 5
        while client.get("/sessions/gone").json()["busy"]:
            assert time.monotonic() < deadline, "the cancelled generation kept running"
            time.sleep(0.02)
        cut = client.get("/sessions/gone").json()
        _, after = generate(client, "gone", "again", **GREEDY)
        session = client.get("/sessions/gone").json()
    # At least the 3 tokens received were sampled; all but the last were fed.
    assert cut["turns"] == 1 and 2 <= cut["cache_tokens_seen"] - first["usage"]["prompt_tokens"] < 199
    assert session["turns"] == 2 and session["messages"][2] == {"role": "user", "content": "again"}
    # Same delta as after a complete (length-limited) reply: the pending token plus the closed turn, no re-prefill.
    assert after["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert after["cache_tokens_seen"] == cut["cache_tokens_seen"] + after["usage"]["prompt_tokens"] + 5


@pytest.mark.parametrize("path", ["/sessions/quiet/generate", "/v1/chat/completions"])
def test_a_non_streaming_client_that_disconnects_cancels_its_generation(server, gate, path):
    def body(n: int) -> dict:
        if path.startswith("/sessions"):
            return {"message": "hello", "max_new_tokens": n, "min_new_tokens": n, "stream": False}
        return {"messages": [{"role": "user", "content": "hello"}], "max_tokens": n, "min_new_tokens": n}

    headers = {"X-Session-Id": "quiet"}
    engine = server.app.state.server.engine
    with server.client() as client:
        cancelled = scrape(client).get('h2o_requests_total{outcome="cancelled"}', 0)
        gate.close()  # the turn cannot get anywhere before the client leaves, however fast the machine
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            client.post(path, json=body(2000), headers=headers, timeout=0.5)
        wait_until(lambda: all(g.cancelled for g in engine.in_flight()))
        gate.open()
        wait_for_metric(client, 'h2o_requests_total{outcome="cancelled"}', cancelled + 1, timeout_s=5)
        session = client.get("/sessions/quiet").json()
        assert not session["busy"] and session["cache_tokens_seen"] < 1500  # stopped long before 2000 tokens
        assert client.post(path, json=body(2), headers=headers).status_code == 200  # no 409: the session is free
    with server.client() as client:
        client.delete("/sessions/quiet")


def test_a_full_queue_answers_429_with_retry_after(serve):
    server = serve(max_running=1, max_waiting=1, retry_after_s=3)
    body = {"message": "hi", "max_new_tokens": 40, "stream": False}
    with server.client() as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/sessions/q1/generate", json=body)
        wait_for_metric(client, "h2o_requests_running", 1)
        waiting = pool.submit(client.post, "/sessions/q2/generate", json=body)
        wait_for_metric(client, "h2o_requests_waiting", 1)
        rejected = client.post("/sessions/q3/generate", json=body)
        assert client.get("/sessions/q3").status_code == 404  # the rejected turn created nothing
        assert running.result().status_code == waiting.result().status_code == 200
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "3"
    assert rejected.json()["error"]["type"] == "queue_full"


BAD_BODIES = [
    ({"message": ""}, 422),
    ({"message": "x" * 32_001}, 413),
    ({"message": "hi", "temperature": -0.1}, 422),
    ({"message": "hi", "temperature": 2.5}, 422),
    ({"message": "hi", "top_p": 0}, 422),
    ({"message": "hi", "top_k": -1}, 422),
    ({"message": "hi", "max_new_tokens": 0}, 422),
    ({"message": "hi", "max_new_tokens": 100_000}, 422),
    ({"message": "hi", "max_new_tokens": 5, "min_new_tokens": 6}, 422),
    ({"message": "hi", "stop": [""]}, 422),
    ({"message": "hi", "stop": [f"s{i}" for i in range(9)]}, 422),
    ({"message": "hi", "policy": "lru_8"}, 422),
    ({"message": "hi", "policy": "h2o_8_64_100000"}, 422),
    ({"message": "hi", "policy": "full"}, 422),
    ({"message": "hi", "unknown": 1}, 422),
    ({"text": "hi"}, 422),
]


@pytest.mark.parametrize(("body", "status"), BAD_BODIES)
def test_bad_input_gets_a_json_error_and_creates_nothing(server, body, status):
    with server.client() as client:
        response = client.post("/sessions/bad-input/generate", json=body)
        assert client.get("/sessions/bad-input").status_code == 404
    assert response.status_code == status
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("session_id", ["has space", "x" * 129, "semi;colon", "ünïcode"])
def test_invalid_session_ids_are_rejected(server, session_id):
    with server.client() as client:
        response = client.post(f"/sessions/{session_id}/generate", json={"message": "hi"})
    assert response.status_code == 422
    assert "session_id" in response.json()["error"]["message"]


NATIVE, CHAT = "/sessions/{id}/generate", "/v1/chat/completions"
ONE_NATIVE = {"message": "hi", "stream": False, "max_new_tokens": 1}
ONE_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
CHARS = Settings.model_fields["max_message_chars"].default  # the test server's (H2O_MAX_MESSAGE_CHARS)


def _policy(chars: int) -> str:
    """A valid policy name (h2o_4_8_32) padded to `chars` with leading zeros, which its regex allows."""
    return "h2o_4_8_" + "32".rjust(chars - len("h2o_4_8_"), "0")


def _user(content: object, **fields) -> dict:
    return {"role": "user", "content": content, **fields}


# Each body is valid but for one field just over its cap, so without the cap it would be served (200) and create
# the session (the kv_dtype, which no valid name is this long, would get a different error: `unknown kv_dtype`);
# (route, body, status, what the error message must say).
OVER_CAP = {
    "stop string chars": (
        NATIVE,
        {**ONE_NATIVE, "stop": ["s" * (MAX_STOP_CHARS + 1)]},
        422,
        f"at most {MAX_STOP_CHARS} characters",
    ),
    "stop strings": (
        NATIVE,
        {**ONE_NATIVE, "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]},
        422,
        f"at most {MAX_STOP_STRINGS} items",
    ),
    "policy chars": (
        NATIVE,
        {**ONE_NATIVE, "policy": _policy(MAX_POLICY_CHARS + 1)},
        422,
        f"at most {MAX_POLICY_CHARS} characters",
    ),
    "kv_dtype chars": (
        NATIVE,
        {**ONE_NATIVE, "kv_dtype": "int8".ljust(MAX_KV_DTYPE_CHARS + 1)},
        422,
        f"at most {MAX_KV_DTYPE_CHARS} characters",
    ),
    "message chars": (NATIVE, {**ONE_NATIVE, "message": "x" * (CHARS + 1)}, 413, f"the limit is {CHARS}"),
    "system chars": (NATIVE, {**ONE_NATIVE, "system": "x" * (CHARS + 1)}, 413, f"the limit is {CHARS}"),
    "chat messages": (
        CHAT,
        {**ONE_CHAT, "messages": [_user("hi")] * (MAX_CHAT_MESSAGES + 1)},
        422,
        f"at most {MAX_CHAT_MESSAGES} items",
    ),
    "chat content chars": (CHAT, {**ONE_CHAT, "messages": [_user("x" * (CHARS + 1))]}, 413, f"the limit is {CHARS}"),
    "chat system chars": (
        CHAT,
        {**ONE_CHAT, "messages": [{"role": "system", "content": "x" * (CHARS + 1)}, _user("hi")]},
        413,
        f"the limit is {CHARS}",
    ),
    "chat content parts": (
        CHAT,
        {**ONE_CHAT, "messages": [_user([{"type": "text", "text": "h"}] * (MAX_CONTENT_PARTS + 1))]},
        422,
        f"at most {MAX_CONTENT_PARTS}",
    ),
    "chat name chars": (
        CHAT,
        {**ONE_CHAT, "messages": [_user("hi", name="n" * (MAX_NAME_CHARS + 1))]},
        422,
        f"at most {MAX_NAME_CHARS} characters",
    ),
    "chat model chars": (
        CHAT,
        {**ONE_CHAT, "model": "m" * (MAX_MODEL_CHARS + 1)},
        422,
        f"at most {MAX_MODEL_CHARS} characters",
    ),
    "chat user chars": (
        CHAT,
        {**ONE_CHAT, "user": "u" * (MAX_USER_CHARS + 1)},
        422,
        f"at most {MAX_USER_CHARS} characters",
    ),
    "chat stop string chars": (
        CHAT,
        {**ONE_CHAT, "stop": "s" * (MAX_STOP_CHARS + 1)},
        422,
        f"at most {MAX_STOP_CHARS} characters",
    ),
    "chat stop list string chars": (
        CHAT,
        {**ONE_CHAT, "stop": ["s" * (MAX_STOP_CHARS + 1)]},
        422,
        f"at most {MAX_STOP_CHARS} characters",
    ),
    "chat stop strings": (
        CHAT,
        {**ONE_CHAT, "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]},
        422,
        f"at most {MAX_STOP_STRINGS} items",
    ),
}


@pytest.mark.parametrize("case", OVER_CAP)
def test_a_field_just_over_its_cap_gets_a_json_error_and_creates_nothing(server, case):
    path, body, status, says = OVER_CAP[case]
    session_id = "capped-" + case.replace(" ", "-")
    with server.client(headers={"X-Session-Id": session_id}) as client:
        before = client.get("/sessions").json()
        response = client.post(path.format(id=session_id), json=body)
        after = client.get("/sessions").json()
        assert client.get(f"/sessions/{session_id}").status_code == 404
    assert (response.status_code, response.headers["content-type"]) == (status, "application/json")
    error = response.json()["error"]
    assert error["code"] == status and says in error["message"], error
    assert after == before


def test_every_field_at_its_cap_is_accepted(server):
    """The caps are not off by one: a request with every capped field at its cap is served (on both routes)."""
    stop = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]  # never generated by the tiny model
    native = {**ONE_NATIVE, "stop": stop, "policy": _policy(MAX_POLICY_CHARS)}
    parts = [{"type": "text", "text": "h"}] * MAX_CONTENT_PARTS
    chat = {
        **ONE_CHAT,
        "stop": stop,
        "model": "m" * MAX_MODEL_CHARS,
        "user": "u" * MAX_USER_CHARS,
        "messages": [*[_user("hi")] * (MAX_CHAT_MESSAGES - 1), _user(parts, name="n" * MAX_NAME_CHARS)],
    }
    with server.client() as client:
        served = client.post("/sessions/at-cap/generate", json=native)
        completion = client.post(CHAT, json=chat, headers={"X-Session-Id": "at-cap-chat"})
        sessions = {s["id"]: s for s in client.get("/sessions").json()["sessions"]}
    assert served.status_code == 200, served.text
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == "m" * MAX_MODEL_CHARS
    assert sessions["at-cap"]["policy"] == CachePolicy.parse("h2o_4_8_32", kv_dtype=DEFAULT_KV_DTYPE).name
    assert "at-cap-chat" in sessions


def test_policy_and_system_are_fixed_at_creation(server):
    with server.client() as client:
        generate(client, "fixed", "hi", system="You are terse.", policy="streaming_4_60", **GREEDY)
        same = client.post(
            "/sessions/fixed/generate",
            json={"message": "ok", "system": "You are terse.", "policy": "streaming_4_60", "stream": False, **GREEDY},
        )
        before = client.get("/sessions/fixed").json()
        new_policy = client.post("/sessions/fixed/generate", json={"message": "x", "policy": "h2o_4_16_64"})
        new_system = client.post("/sessions/fixed/generate", json={"message": "x", "system": "Be verbose."})
        after = client.get("/sessions/fixed").json()
    assert same.status_code == 200
    assert before["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (new_policy.status_code, new_system.status_code) == (422, 422)
    assert "policy" in new_policy.json()["error"]["message"]
    assert "system prompt" in new_system.json()["error"]["message"]
    assert after == before


def test_list_get_delete_and_404(server):
    with server.client() as client:
        generate(client, "listed", "hi", **GREEDY)
        assert "listed" in [s["id"] for s in client.get("/sessions").json()["sessions"]]
        assert client.delete("/sessions/listed").status_code == 204
        assert "listed" not in [s["id"] for s in client.get("/sessions").json()["sessions"]]
        for method in ("GET", "DELETE"):
            missing = client.request(method, "/sessions/listed")
            assert missing.status_code == 404
            assert missing.json()["error"]["type"] == "session_not_found"


def test_api_keys_guard_the_api_but_not_health_or_metrics(serve):
    server = serve(api_keys="key-one, key-two")
    with server.client() as client:
        assert client.get("/sessions").status_code == 401
        wrong = client.post("/sessions/k/generate", json={"message": "hi"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
        assert client.get("/sessions/k", headers={"X-API-Key": "key-one"}).status_code == 404  # nothing created
        ok = client.post(
            "/sessions/k/generate",
            json={"message": "hi", "stream": False, **GREEDY},
            headers={"Authorization": "Bearer key-two"},
        )
        assert ok.status_code == 200
        assert client.get("/sessions", headers={"X-API-Key": "key-one"}).status_code == 200
        assert client.get("/health").status_code == client.get("/metrics").status_code == 200
        for header in (
            {"X-API-Key": "k" * (MAX_API_KEY_CHARS + 1)},
            {"Authorization": "Bearer " + "k" * (MAX_API_KEY_CHARS + 1)},
        ):
            too_long = client.get("/sessions", headers=header)
            assert too_long.status_code == 422 and "at most" in too_long.json()["error"]["message"]


def test_one_key_cannot_take_every_session(serve, tmp_path):
    """H2O_MAX_SESSIONS_PER_KEY counts a key's sessions in memory and on disk; the other key still gets its own,
    a refused request creates nothing, and deleting one makes room again."""
    server = serve(
        api_keys="key-a,key-b",
        max_sessions=10,
        max_sessions_per_key=2,
        max_resident_sessions=1,
        snapshot_dir=str(tmp_path),
    )
    body = {"message": "hi", "stream": False, **GREEDY}

    def post(key: str, sid: str) -> httpx.Response:
        return client.post(f"/sessions/{sid}/generate", json=body, headers={"X-API-Key": key})

    with server.client() as client:
        assert post("key-a", "a1").status_code == post("key-a", "a2").status_code == 200  # a1 now only on disk
        refused = post("key-a", "a3")
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "too_many_sessions"
        assert "H2O_MAX_SESSIONS_PER_KEY" in refused.json()["error"]["message"]
        assert client.get("/sessions/a3", headers={"X-API-Key": "key-a"}).status_code == 404
        assert post("key-a", "a1").status_code == 200  # its own sessions go on
        assert post("key-b", "b1").status_code == 200
        assert client.delete("/sessions/a2", headers={"X-API-Key": "key-a"}).status_code == 204
        assert post("key-a", "a3").status_code == 200


def test_health_ready_and_the_replica_header(server):
    with server.client() as client:
        health, ready = client.get("/health"), client.get("/ready")
        _, done = generate(client, "replica", "hi", **GREEDY)
        with client.stream("POST", "/sessions/replica/generate", json={"message": "x", **GREEDY}) as streamed:
            streamed.read()
    assert health.json() == {"status": "ok"} and ready.status_code == 200
    assert {health.headers["x-h2o-replica"], ready.headers["x-h2o-replica"], streamed.headers["x-h2o-replica"]} == {
        "test-replica"
    }


def test_a_model_that_fails_to_load_is_reported_not_ready(tmp_path):
    app = create_app(Settings(model=str(tmp_path / "missing-model")))
    gen = run_server(app)
    server = next(gen)
    try:
        with server.client() as client:
            deadline = time.monotonic() + 30
            while (ready := client.get("/ready")).json()["status"] == "loading":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            generating = client.post("/sessions/s/generate", json={"message": "hi"})
    finally:
        gen.close()
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert generating.status_code == 503 and "failed to load" in generating.json()["error"]["message"]
    assert isinstance(generating.headers.get("retry-after"), str)


def test_httpx_sees_json_errors_for_unknown_routes(server):
    response = httpx.get(server.url + "/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


@pytest.mark.process
def test_a_misspelled_or_empty_setting_refuses_to_start(tmp_path):
    """`H2O_API_KEY` (singular) or `H2O_API_KEYS=" , "` would start an open server: the process exits first, naming
    the variable, before it loads anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("H2O_")}
    for extra, message in (
        ({"H2O_API_KEY": "secret"}, "H2O_API_KEY"),
        ({"H2O_API_KEYS": " , "}, "names nothing"),
        ({"H2O_API_KEYS": "k" * (MAX_API_KEY_CHARS + 1)}, "longer than"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "app"], env={**env, **extra}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert Settings.unknown_variables(
        {"H2O_POLICY": "full", "h2o_port": "1", "H2O_POLCY": "x", "HOME": "/", "H2O_MODEL_CACHE": "/tmp"}
    ) == ["H2O_POLCY"]


def test_without_keys_a_listing_shows_the_sessions_of_its_client_id(server):
    with server.client() as http:
        for client_id, session_id in (("browser-a", "page-a"), ("browser-b", "page-b")):
            http.headers["X-H2O-Client"] = client_id
            generate(http, session_id, "hi", max_new_tokens=1)
        listed = {
            c: {s["id"] for s in http.get("/sessions", headers={"X-H2O-Client": c}).json()["sessions"]}
            for c in ("browser-a", "browser-b")
        }
        del http.headers["X-H2O-Client"]
        anonymous = {s["id"] for s in http.get("/sessions").json()["sessions"]}
        assert listed == {"browser-a": {"page-a"}, "browser-b": {"page-b"}}
        assert not anonymous & {"page-a", "page-b"}
        assert http.get("/sessions/page-a").status_code == 200  # without keys every caller is trusted
        assert http.get("/sessions", headers={"X-H2O-Client": "x" * 65}).status_code == 422

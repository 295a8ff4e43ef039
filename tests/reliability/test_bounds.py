"""A public server holds: bounded memory with many sessions, API keys that isolate sessions, request limits,
and session ids that can never name a path. One real server process for the module."""

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.api import key_id
from app.snapshots import file_stem
from tests.app.conftest import generate, scrape
from tests.reliability.conftest import KEY_A, KEY_B

RESIDENT = 50
PER_KEY = 4
N_SESSIONS = 1000
ONE_TOKEN = {"message": "hi", "stream": False, "temperature": 0, "max_new_tokens": 1}
FILLING = {**ONE_TOKEN, "message": "the tide came in " * 80}
"""A first turn of ~330 tokens: six pages of cache (pages hold only what a session uses)."""
SNAPSHOT_NAME = re.compile(
    r"[0-9a-f]{64}(\.json|\.[0-9a-f]{16}\.safetensors|\.transcript\.jsonl"
    r"|\.([0-9a-f]{32}|anyone)\.owner)"
)


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bounded") / "snapshots"


@pytest.fixture(scope="module")
def server(launch_for_module, snapshot_dir):
    # Sessions stored in the model's dtype, filled to several pages by a long first message (FILLING), cost ~0.2 MB
    # each, so keeping sessions in memory would stand far above the allocator's noise.
    return launch_for_module(
        snapshot_dir,
        policy="h2o_4_64_1024",
        kv_dtype="auto",
        max_resident_sessions=RESIDENT,
        max_sessions=2000,
        max_requests_per_key=PER_KEY,
        max_body_bytes=65536,
        max_message_chars=2000,
        max_new_tokens=4000,
    )


def _turns(server, ids: list[str], body: dict = ONE_TOKEN) -> list[dict]:
    """One turn (default: short) on each session, 4 clients at a time; returns the responses' JSON."""
    local = threading.local()

    def turn(session_id: str) -> dict:
        if not hasattr(local, "client"):
            local.client = server.client()
        response = local.client.post(f"/sessions/{session_id}/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(PER_KEY) as pool:
        return list(pool.map(turn, ids))


def test_a_thousand_sessions_with_fifty_resident_stay_bounded_and_all_answer(server, snapshot_dir):
    ids = [f"many-{i:04d}" for i in range(N_SESSIONS)]
    _turns(server, ids[:100], FILLING)  # past the resident limit: memory is at its steady state
    with server.client() as client:
        per_session_bytes = client.get("/sessions/many-0000").json()["cache_bytes"]
    rss_before = server.rss_bytes()
    started = time.monotonic()
    _turns(server, ids[100:], FILLING)
    created_s = time.monotonic() - started
    rss_after = server.rss_bytes()
    with server.client() as client:
        metrics = scrape(client)
        assert metrics["h2o_sessions_active"] <= RESIDENT
        assert metrics["h2o_sessions_stored"] >= N_SESSIONS
        assert metrics["h2o_sessions_evicted_total"] >= N_SESSIONS - RESIDENT
    # Keeping the 900 new sessions in memory would take 900 caches; the resident limit keeps it to a small part.
    unbounded = (N_SESSIONS - 100) * per_session_bytes
    growth = rss_after - rss_before
    print(
        f"\n{N_SESSIONS} sessions: {created_s:.1f} s for 900; RSS {rss_before / 2**20:.0f} -> "
        f"{rss_after / 2**20:.0f} MiB (+{growth / 2**20:.1f}; unbounded would add {unbounded / 2**20:.0f})"
    )
    assert growth < unbounded / 5

    # Every session still answers: its second turn restores it from disk and continues from its first.
    started = time.monotonic()
    second = _turns(server, ids)
    print(
        f"second turn on all {N_SESSIONS}: {time.monotonic() - started:.1f} s; RSS {server.rss_bytes() / 2**20:.0f} MiB"
    )
    assert all(r["cache_tokens_seen"] > r["usage"]["prompt_tokens"] for r in second)
    with server.client() as client:
        assert client.get(f"/sessions/{ids[0]}").json()["turns"] == 2
        assert scrape(client)["h2o_sessions_active"] <= RESIDENT
    assert server.rss_bytes() - rss_before < unbounded / 5


def test_two_keys_are_isolated(server, snapshot_dir):
    with server.client(KEY_A) as a, server.client(KEY_B) as b, server.client(None) as anonymous:
        generate(a, "private", "hi", max_new_tokens=2)
        assert anonymous.get("/sessions/private").status_code == 401
        assert anonymous.post("/sessions/private/generate", json=ONE_TOKEN).status_code == 401
        assert b.get("/sessions/private").status_code == 404
        assert b.post("/sessions/private/generate", json=ONE_TOKEN).status_code == 404
        assert (
            b.post(
                "/v1/chat/completions",
                headers={"X-Session-Id": "private"},
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            ).status_code
            == 404
        )
        assert b.delete("/sessions/private").status_code == 404
        assert "private" not in {s["id"] for s in b.get("/sessions").json()["sessions"]}
        generate(b, "theirs", "hi", max_new_tokens=2)
        assert a.get("/sessions/private").json()["turns"] == 1
        assert "theirs" not in {s["id"] for s in a.get("/sessions").json()["sessions"]}
        files = [p for sid in ("private", "theirs") for p in snapshot_dir.glob(f"{file_stem(sid)}.*")]
        assert sorted(p.suffix for p in files) == [
            ".json",
            ".json",
            ".jsonl",
            ".jsonl",
            ".owner",
            ".owner",
            ".safetensors",
            ".safetensors",
        ]
        assert not any(key.encode() in p.read_bytes() or key in p.name for p in files for key in (KEY_A, KEY_B))
        assert (snapshot_dir / f"{file_stem('private')}.{key_id(KEY_A)}.owner").exists()  # owners hashed
        assert a.delete("/sessions/private").status_code == 204


def raw_request(server, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A request whose path is sent byte for byte (httpx would resolve `..` segments before sending)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(
            method,
            path,
            body=json.dumps(body) if body else None,
            headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def test_session_ids_never_reach_the_filesystem(server, snapshot_dir):
    outside = set(snapshot_dir.parent.iterdir())
    hostile = [
        "..",
        ".",
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "a%2F..%2F..%2Fb",
        "a%00b",
        "x" * 129,
        "%C3%A9t%C3%A9",
        "a%5Cb",
        "a\\..\\b",
        "~root",
    ]
    for session_id in hostile:
        for method, path, body in (
            ("POST", f"/sessions/{session_id}/generate", ONE_TOKEN),
            ("GET", f"/sessions/{session_id}", None),
            ("DELETE", f"/sessions/{session_id}", None),
        ):
            status, answer = raw_request(server, method, path, body)
            assert status in (404, 405, 422), (method, path, status)
            assert "error" in answer or "detail" in answer, answer
    with server.client() as client:
        for session_id in ["../../etc/passwd", "..", "a/b", "a\\b", "é"]:
            response = client.post(
                "/v1/chat/completions",
                headers={"X-Session-Id": session_id.encode().hex()},
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": session_id},
            )
            assert response.status_code == 200  # a valid id; `user` is an end-user id, never a session
            if session_id.isascii():
                response = client.post(
                    "/v1/chat/completions",
                    headers={"X-Session-Id": session_id},
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                )
                assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_session_id"
        for odd_but_valid in ("a..b", "...", ".hidden", "-rf"):  # the issue's [A-Za-z0-9_.-]{1,128}
            assert client.post(f"/sessions/{odd_but_valid}/generate", json=ONE_TOKEN).status_code == 200
            assert client.get(f"/sessions/{odd_but_valid}").json()["id"] == odd_but_valid
    assert set(snapshot_dir.parent.iterdir()) == outside
    names = [p.name for p in snapshot_dir.iterdir()]
    assert names and all(SNAPSHOT_NAME.fullmatch(name) for name in names), [
        n for n in names if not SNAPSHOT_NAME.fullmatch(n)
    ]


def test_limits_answer_clear_json_errors(server):
    with server.client() as client, server.client(KEY_B) as other:
        big = client.post(
            "/sessions/limits/generate",
            content=b'{"message": "' + b"a" * 70000 + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["type"] == "body_too_large"
        chunked = client.post(
            "/sessions/limits/generate",
            content=iter([b'{"message": "', b"a" * 70000, b'"}']),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "body_too_large"
        long_message = client.post("/sessions/limits/generate", json={"message": "a" * 2001})
        assert long_message.status_code == 413 and long_message.json()["error"]["type"] == "message_too_large"
        too_many = client.post("/sessions/limits/generate", json={"message": "hi", "max_new_tokens": 4001})
        assert too_many.status_code == 422 and "max_new_tokens" in too_many.json()["error"]["message"]
        assert client.get("/sessions/limits").status_code == 404  # nothing was created

        # PER_KEY generations in flight per key: one more gets 429, another key is unaffected.
        long = {"message": "go", "max_new_tokens": 4000, "min_new_tokens": 4000, "temperature": 0}
        streams = [client.stream("POST", f"/sessions/busy-{i}/generate", json=long) for i in range(PER_KEY)]
        lines = []  # referenced: a dropped httpx line iterator closes its response, which cancels the turn
        try:
            for stream in streams:
                response = stream.__enter__()
                assert response.status_code == 200
                lines.append(response.iter_lines())
                next(lines[-1])
            extra = client.post("/sessions/busy-extra/generate", json=ONE_TOKEN)
            assert extra.status_code == 429 and extra.json()["error"]["type"] == "too_many_requests"
            assert int(extra.headers["Retry-After"]) >= 0
            assert other.post("/sessions/other-key/generate", json=ONE_TOKEN).status_code == 200
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        # Closing the streams cancels their generations; the key's budget comes back.
        deadline = time.monotonic() + 10
        while (response := client.post("/sessions/busy-extra/generate", json=ONE_TOKEN)).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert response.status_code == 200


def test_the_server_still_serves_after_all_this(server):
    with server.client() as client:
        assert client.get("/ready").status_code == 200
        assert generate(client, "after", "hello", max_new_tokens=3, temperature=0)[1]["usage"]["completion_tokens"] == 3
    assert isinstance(httpx.get(f"{server.url}/health").json(), dict)

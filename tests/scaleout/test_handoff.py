"""Scale-out on loopback: two server processes sharing one snapshot directory behind a real nginx that hashes the
session id (deploy/nginx/h2o-router.conf.template). Sessions stick to one replica; when it is SIGKILLed between
turns, its sessions continue on the survivor from their snapshots; when a replica comes back and leaves again, the
survivor does not serve the copy it kept in memory over the newer one on disk."""

from __future__ import annotations

import signal
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from tests.app.conftest import sse_events
from tests.reliability.conftest import KEY_A

N_SESSIONS = 20
TURN = {"temperature": 0, "max_new_tokens": 4, "min_new_tokens": 4}
SESSIONS = [f"user-{i:02d}" for i in range(N_SESSIONS)]


@dataclass
class Turn:
    replica: str
    session_key: str
    first_token_at: float
    finish_reason: str


def turn(client: httpx.Client, session_id: str, message: str, openai: bool = False) -> Turn:
    """One streamed turn through the router; returns which replica answered and when the first token arrived."""
    if openai:
        request = client.stream(
            "POST",
            "/v1/chat/completions",
            headers={"X-Session-Id": session_id},
            json={
                "model": "tiny",
                "stream": True,
                "max_tokens": TURN["max_new_tokens"],
                "temperature": 0,
                "messages": [{"role": "user", "content": message}],
            },
        )
    else:
        request = client.stream("POST", f"/sessions/{session_id}/generate", json={"message": message, **TURN})
    first_token_at, finish = None, None
    with request as response:
        assert response.status_code == 200, response.read()
        for event, data in sse_events(response):
            assert event != "error", data
            if first_token_at is None and (
                event == "token" or (openai and data != "[DONE]" and data["choices"][0]["delta"].get("content"))
            ):
                first_token_at = time.monotonic()
            if event == "done":
                finish = data["finish_reason"]
            elif openai and data != "[DONE]" and data["choices"][0]["finish_reason"]:
                finish = data["choices"][0]["finish_reason"]
        headers = response.headers
    assert finish == "length", (session_id, finish)
    return Turn(headers["x-h2o-replica"], headers["x-h2o-session-key"], first_token_at or time.monotonic(), finish)


def all_turns(client: httpx.Client, message: str, openai_for=frozenset()) -> dict[str, Turn]:
    """A turn for every session at once (20 concurrent streams)."""
    with ThreadPoolExecutor(N_SESSIONS) as pool:
        futures = {s: pool.submit(turn, client, s, f"{message} ({s})", s in openai_for) for s in SESSIONS}
        return {s: f.result() for s, f in futures.items()}


def histories(client: httpx.Client) -> dict[str, dict]:
    return {s: client.get(f"/sessions/{s}").json() for s in SESSIONS}


def test_sessions_stick_to_a_replica_and_move_when_it_dies(launch, start_router, tmp_path, capsys):
    snapshots = tmp_path / "snapshots"
    # 20 concurrent turns on one replica: above the default per-key limit (16).
    replicas = {
        name: launch(snapshots, replica_name=name, max_requests_per_key=N_SESSIONS)
        for name in ("replica-a", "replica-b")
    }
    router = start_router([f"127.0.0.1:{r.port}" for r in replicas.values()])

    # Two turns per session: the second through the OpenAI route (X-Session-Id) for half of them.
    with router.client(KEY_A) as client:
        first = all_turns(client, "Hello")
        second = all_turns(client, "Tell me more", openai_for=frozenset(SESSIONS[::2]))
        before = histories(client)
    home = {s: first[s].replica for s in SESSIONS}
    assert all(first[s].session_key == second[s].session_key == s for s in SESSIONS)  # path and header agree
    assert all(second[s].replica == home[s] for s in SESSIONS), "a session's turns landed on two replicas"
    spread = Counter(home.values())
    assert set(spread) == set(replicas), f"20 sessions all hashed to one replica: {spread}"
    for s in SESSIONS:
        assert before[s]["turns"] == 2 and len(before[s]["messages"]) == 4
        with replicas[home[s]].client() as direct:  # the session is live on its home replica only
            assert direct.get(f"/sessions/{s}").json()["messages"] == before[s]["messages"]

    # SIGKILL the replica holding more sessions, between turns; every session's next turn lands on the survivor.
    victim = max(spread, key=spread.get)
    (survivor,) = set(replicas) - {victim}
    killed_at = time.monotonic()
    replicas[victim].signal(signal.SIGKILL)
    with router.client(KEY_A) as client:
        third = all_turns(client, "And then?")
        after = histories(client)
    assert {t.replica for t in third.values()} == {survivor}
    for s in SESSIONS:
        assert after[s]["turns"] == 3, after[s]
        assert after[s]["messages"][:4] == before[s]["messages"], f"{s} lost its history"
        assert after[s]["messages"][4] == {"role": "user", "content": f"And then? ({s})"}
    moved = [s for s in SESSIONS if home[s] == victim]
    handoff_s = sorted(third[s].first_token_at - killed_at for s in moved)

    # The victim comes back (a new process, a new port) and nginx reloads: part of the sessions hash to it and
    # continue there from disk. Then it dies again: those sessions return to the survivor, which still holds them
    # from turn 3 in memory; it must load turn 4 from the disk instead.
    back = launch(snapshots, replica_name=back_name(victim), max_requests_per_key=N_SESSIONS)
    router.reload([f"127.0.0.1:{replicas[survivor].port}", f"127.0.0.1:{back.port}"])
    with router.client(KEY_A) as client:
        fourth = all_turns(client, "Back again")
    returned = [s for s in SESSIONS if fourth[s].replica == back_name(victim)]
    assert returned, "no session hashed to the replica that came back"
    back.signal(signal.SIGKILL)
    with router.client(KEY_A) as client:
        fifth = all_turns(client, "Still there?")
        final = histories(client)
    assert {t.replica for t in fifth.values()} == {survivor}
    for s in SESSIONS:
        assert final[s]["turns"] == 5, (s, s in returned, final[s]["turns"])
        assert final[s]["messages"][:6] == after[s]["messages"]
        assert final[s]["messages"][6] == {"role": "user", "content": f"Back again ({s})"}

    with capsys.disabled():
        print(
            f"\nspread before the kill: {dict(spread)}; {victim} killed, {len(moved)} sessions moved to {survivor}; "
            f"hand-off (SIGKILL -> first token on the survivor, 20 concurrent turns) min / median / max "
            f"{handoff_s[0]:.2f} / {statistics.median(handoff_s):.2f} / {handoff_s[-1]:.2f} s; "
            f"{len(returned)} sessions went to the returning replica and came back with their turn 4"
        )


def back_name(victim: str) -> str:
    return f"{victim}-back"

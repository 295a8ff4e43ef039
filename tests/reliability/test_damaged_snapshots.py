"""A snapshot this version cannot use never stops the server: damaged ones are quarantined and reported to their
owner only, one a newer version wrote stays where it is, and no other key can learn of, delete or claim the id."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable
from pathlib import Path

from app.snapshots import QUARANTINE, _canonical, file_stem
from tests.app.conftest import generate, scrape
from tests.reliability.conftest import KEY_B

GREEDY = {"temperature": 0, "max_new_tokens": 4}


def rewrite(snapshots: Path, session_id: str, change: Callable[[dict], object]) -> None:
    """Change a snapshot's body and give it a valid checksum again: damage no checksum can catch (a bug, or a
    rollback to a version that reads the files of a newer one)."""
    path = snapshots / f"{file_stem(session_id)}.json"
    document = json.loads(path.read_text())
    change(document["body"])
    document["sha256"] = hashlib.sha256(_canonical(document["body"])).hexdigest()
    path.write_text(json.dumps(document))


DAMAGE: dict[str, Callable[[dict], object]] = {
    "unknown-policy-field": lambda body: body["session"]["policy"].update(attention_window=7),
    "missing-turns": lambda body: body["session"].pop("turns"),
    "session-not-an-object": lambda body: body.update(session=["not", "an", "object"]),
    "history-a-string": lambda body: body["session"].update(history="hello"),
    "negative-count": lambda body: body["session"].update(message_count=-1),
}


def test_damaged_snapshots_are_quarantined_and_the_server_starts(launch, tmp_path):
    snapshots = tmp_path / "snapshots"
    first = launch(snapshots)
    with first.client() as client:
        for session_id in ["healthy", "newer-format", *DAMAGE]:
            generate(client, session_id, "hello", **GREEDY)
        healthy = client.get("/sessions/healthy").json()
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    for session_id, change in DAMAGE.items():
        rewrite(snapshots, session_id, change)
    rewrite(snapshots, "newer-format", lambda body: body.update(format=99))

    second = launch(snapshots)  # would exit with code 3 on the first damaged snapshot
    with second.client() as client:
        assert client.get("/ready").status_code == 200
        assert client.get("/sessions/healthy").json() == healthy
        assert generate(client, "healthy", "still here", **GREEDY)[1]["finish_reason"] == "length"
        for session_id in DAMAGE:
            response = client.get(f"/sessions/{session_id}")
            assert response.status_code == 500 and response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert error["type"] == "snapshot_corrupt" and QUARANTINE in error["message"], error
        newer = client.get("/sessions/newer-format").json()["error"]
        assert newer["type"] == "snapshot_corrupt" and "format 99" in newer["message"]
        assert {s["id"] for s in client.get("/sessions").json()["sessions"]} == {"healthy"}
        assert scrape(client)['h2o_snapshot_errors_total{kind="corrupt"}'] == len(DAMAGE) + 1
    moved = sorted(p.name.split(".")[0] for p in (snapshots / QUARANTINE).iterdir())
    assert moved == sorted(file_stem(s) for s in DAMAGE)
    assert all(len(list((snapshots / QUARANTINE).glob(f"{file_stem(s)}.*/*.json"))) == 1 for s in DAMAGE)
    assert (snapshots / f"{file_stem('newer-format')}.json").exists()  # a newer version can still read it


def test_another_key_can_never_see_delete_or_claim_a_damaged_session(launch, tmp_path):
    snapshots = tmp_path / "snapshots"
    server = launch(snapshots)
    with server.client() as owner, server.client(KEY_B) as other:
        generate(owner, "mine", "hello", **GREEDY)
        generate(owner, "cut", "hello", **GREEDY)
        rewrite(snapshots, "mine", lambda body: body["session"].pop("owner"))  # the record no longer says whose
        tensors = next(snapshots.glob(f"{file_stem('cut')}.*.safetensors"))
        tensors.write_bytes(tensors.read_bytes()[:100])  # found only when the session loads
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    for restarted in range(2):  # the second start finds the quarantined files and the owner marker only
        server = launch(snapshots)
        with server.client() as owner, server.client(KEY_B) as other:
            for session_id in ("mine", "cut"):
                assert other.get(f"/sessions/{session_id}").status_code == 404
                assert (
                    other.post(f"/sessions/{session_id}/generate", json={"message": "mine now", **GREEDY}).status_code
                    == 404
                )
                assert (
                    other.post(
                        "/v1/chat/completions",
                        headers={"X-Session-Id": session_id},
                        json={"messages": [{"role": "user", "content": "mine now"}], "max_tokens": 1},
                    ).status_code
                    == 404
                )
                assert other.delete(f"/sessions/{session_id}").status_code == 404
                assert owner.get(f"/sessions/{session_id}").json()["error"]["type"] == "snapshot_corrupt"
            assert other.get("/sessions").json()["sessions"] == []
            if restarted:
                assert owner.delete("/sessions/mine").status_code == 204  # the owner can start over
                assert owner.get("/sessions/mine").status_code == 404
                assert generate(owner, "mine", "again", **GREEDY)[1]["finish_reason"] == "length"
                assert other.get("/sessions/mine").status_code == 404
            server.signal(signal.SIGTERM)
            assert server.wait(30) == 0

"""Sessions survive SIGTERM and SIGKILL of real server processes, and a damaged snapshot only loses its session."""

import http.client
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from app.snapshots import LEFTOVER_AGE_S, file_stem
from tests.app.conftest import generate, sse_events
from tests.reliability.conftest import KEY_A, KEY_B

# min_new_tokens keeps the random tiny model from ending a turn early, so every turn has the same length.
GREEDY = {"temperature": 0, "max_new_tokens": 8, "min_new_tokens": 8}
LONG = {"temperature": 0, "max_new_tokens": 2000, "min_new_tokens": 2000}
MESSAGES = ["Hello there", "Tell me more about that", "And then what happened?"]


def token_ids(tokens: list[dict]) -> list[int]:
    return [t["token_id"] for t in tokens]


def stream_until(client: httpx.Client, session_id: str, n_tokens: int, then) -> tuple[list[dict], list[tuple]]:
    """Stream a long turn; after `n_tokens` tokens call `then()` (send a signal) and read on to the end.
    Returns (token events, every event after the signal)."""
    tokens, after = [], []
    with client.stream("POST", f"/sessions/{session_id}/generate", json={"message": "Go on", **LONG}) as response:
        assert response.status_code == 200
        try:
            for event, data in sse_events(response):
                if after or len(tokens) >= n_tokens:
                    after.append((event, data))
                elif event == "token":
                    tokens.append(data)
                    if len(tokens) == n_tokens:
                        then()
        except httpx.TransportError:  # the process died mid-stream
            after.append(("disconnected", None))
    return tokens, after


def test_sigterm_mid_conversation_then_restart_continues_identically(launch, tmp_path):
    snapshots = tmp_path / "snapshots"
    first = launch(snapshots, shutdown_grace_s=1)
    with first.client() as client:
        reference = [generate(client, "reference", m, **GREEDY)[0] for m in MESSAGES]
        before = [generate(client, "conversation", m, **GREEDY)[0] for m in MESSAGES[:2]]
        assert [token_ids(t) for t in before] == [token_ids(t) for t in reference[:2]]
        history = client.get("/sessions/conversation").json()["messages"]
        # A stream is running when SIGTERM arrives: it is cancelled after the grace period, its partial turn kept.
        streamed, after = stream_until(client, "streaming", 5, lambda: first.signal(signal.SIGTERM))
    assert after[-1][0] == "done" and after[-1][1]["finish_reason"] == "cancelled", after[-3:]
    assert first.wait(20) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{first.url}/health", timeout=2)

    second = launch(snapshots)
    with second.client() as client:
        restored = client.get("/sessions/conversation").json()
        assert restored["turns"] == 2 and restored["messages"] == history
        continued, _ = generate(client, "conversation", MESSAGES[2], **GREEDY)
        partial = client.get("/sessions/streaming").json()
    assert token_ids(continued) == token_ids(reference[2])
    streamed_text = "".join(t["text"] for t in streamed + [d for e, d in after if e == "token"])
    assert partial["turns"] == 1 and partial["messages"][-1] == {"role": "assistant", "content": streamed_text}


def test_sigterm_answers_503_on_an_open_keep_alive_connection_while_draining(launch, tmp_path):
    """A request on a keep-alive connection that was idle when SIGTERM came gets the documented 503 shutting_down
    while a stream drains (uvicorn alone closes idle connections at once: the client saw a dropped connection)."""
    server = launch(tmp_path / "snapshots", shutdown_grace_s=3)
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    seen = {}

    def during_drain() -> None:
        server.signal(signal.SIGTERM)
        time.sleep(0.5)  # uvicorn checks for exit every 0.1 s: long enough for it to have closed idle connections
        try:
            idle.request("POST", "/sessions/late/generate", json.dumps({"message": "hi", "stream": False}), headers)
            response = idle.getresponse()
            seen["late"] = response.status, response.getheader("Retry-After"), json.loads(response.read())
        except OSError as exc:  # http.client.RemoteDisconnected is a ConnectionResetError
            seen["late"] = exc
        try:
            seen["new connection"] = httpx.get(f"{server.url}/health", timeout=2).status_code
        except httpx.TransportError as exc:
            seen["new connection"] = exc

    with server.client() as client:
        idle.request("GET", "/health")
        assert idle.getresponse().read() and idle.sock is not None  # kept alive
        streamed, after = stream_until(client, "streaming", 5, during_drain)
    idle.close()
    assert not isinstance(seen["late"], Exception), f"the idle keep-alive connection failed: {seen['late']!r}"
    status, retry_after, body = seen["late"]
    assert status == 503 and body["error"]["type"] == "shutting_down" and retry_after, seen["late"]
    assert isinstance(seen["new connection"], httpx.ConnectError), seen  # no new connections while draining
    # The running stream still drains as before: cancelled after the grace period, saved, exit code 0.
    assert streamed and after[-1][0] == "done" and after[-1][1]["finish_reason"] == "cancelled", after[-3:]
    assert server.wait(30) == 0


def test_sigkill_mid_stream_keeps_the_last_complete_turn_and_damage_stays_local(launch, tmp_path):
    snapshots = tmp_path / "snapshots"
    first = launch(snapshots)
    with first.client() as client:
        reference = [generate(client, "reference", m, **GREEDY)[0] for m in MESSAGES[:2]]
        generate(client, "killed", MESSAGES[0], **GREEDY)
        for damaged in ("tensors-cut", "json-cut"):
            generate(client, damaged, "hi", **GREEDY)
        history = client.get("/sessions/killed").json()["messages"]
        streamed, after = stream_until(client, "killed", 3, lambda: first.signal(signal.SIGKILL))
    assert streamed and after[-1][0] == "disconnected"
    assert first.wait(10) == -signal.SIGKILL

    tensor_file = next(snapshots.glob(f"{file_stem('tensors-cut')}.*.safetensors"))
    tensor_file.write_bytes(tensor_file.read_bytes()[: tensor_file.stat().st_size // 2])
    json_file = snapshots / f"{file_stem('json-cut')}.json"
    json_file.write_bytes(json_file.read_bytes()[:100])

    second = launch(snapshots)
    with second.client() as client:
        restored = client.get("/sessions/killed").json()
        assert restored["turns"] == 1 and restored["messages"] == history
        again, _ = generate(client, "killed", MESSAGES[1], **GREEDY)
        assert token_ids(again) == token_ids(reference[1])
        for damaged in ("tensors-cut", "json-cut"):
            for response in (
                client.get(f"/sessions/{damaged}"),
                client.post(f"/sessions/{damaged}/generate", json={"message": "hi", "stream": False}),
            ):
                assert response.status_code == 500, response.text
                error = response.json()["error"]
                assert error["type"] == "snapshot_corrupt" and damaged in error["message"]
        assert client.get("/ready").status_code == 200
        assert client.get("/sessions/reference").json()["turns"] == 2
        assert {s["id"] for s in client.get("/sessions").json()["sessions"]} == {"reference", "killed"}
        metrics = client.get("/metrics").text
        assert 'h2o_snapshot_errors_total{kind="corrupt"} 2.0' in metrics
        # Deleting a damaged session removes its files; the id can then start over.
        assert client.delete("/sessions/tensors-cut").status_code == 204
        assert client.get("/sessions/tensors-cut").status_code == 404
        assert generate(client, "tensors-cut", "hi again", **GREEDY)[1]["finish_reason"] == "length"
        # Ownership survives the restart.
        with second.client(KEY_B) as other:
            assert other.get("/sessions/killed").status_code == 404


# Loaded by every Python process started with its directory on PYTHONPATH (a fault hook, off unless armed): once
# the file named by RELIABILITY_STALL_ARM exists, the fsync of a snapshot JSON's temp file (the commit point of a
# save, after the new tensor file is in place) notes the temp file's path in <arm>.stalled and hangs, so the test
# can SIGKILL the server while that write is in flight.
STALL_HOOK = """
import os, time
_arm = os.environ.get("RELIABILITY_STALL_ARM")
if _arm:
    _fsync = os.fsync
    def _stalling_fsync(fd):
        if os.path.exists(_arm):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.endswith(".tmp") and ".json." in os.path.basename(target):
                with open(_arm + ".stalled", "w") as f:
                    f.write(target)
                time.sleep(3600)
        return _fsync(fd)
    os.fsync = _stalling_fsync
"""


def test_sigkill_during_a_snapshot_write_leaves_leftovers_that_startup_cleans_once_old(launch, tmp_path, monkeypatch):
    snapshots, hook = tmp_path / "snapshots", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL_HOOK)
    arm = tmp_path / "stall-armed"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RELIABILITY_STALL_ARM", str(arm))
    first = launch(snapshots)
    with first.client() as client:
        generate(client, "crashed", MESSAGES[0], **GREEDY)
        history = client.get("/sessions/crashed").json()["messages"]
        before = set(os.listdir(snapshots))
        arm.touch()
        # The second turn is generated; its save hangs in the fsync of the JSON's temp file: SIGKILL now.
        with client.stream("POST", "/sessions/crashed/generate", json={"message": MESSAGES[1], **GREEDY}) as response:
            assert response.status_code == 200
            stalled = Path(f"{arm}.stalled")
            deadline = time.monotonic() + 60
            while not stalled.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stalled.exists(), "no snapshot write stalled"
            first.signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
    temp = Path(stalled.read_text())
    assert temp.parent == snapshots and temp.name.endswith(".tmp")
    crash_left = {name for name in set(os.listdir(snapshots)) - before if name.endswith((".tmp", ".safetensors"))}
    # What the crash left: the JSON's temp file and the new tensor file that no JSON refers to.
    assert temp.name in crash_left and len(crash_left) == 2, crash_left
    (orphan,) = crash_left - {temp.name}
    # Files as young as a write in progress (another replica may share the directory) must stay; the crash's
    # leftovers are made older than LEFTOVER_AGE_S.
    young_temp = f".{file_stem('elsewhere')}.json.other-replica.1.tmp"
    young_tensors = f"{file_stem('elsewhere')}.0123456789abcdef.safetensors"
    (snapshots / young_temp).write_bytes(temp.read_bytes())
    (snapshots / young_tensors).write_bytes((snapshots / orphan).read_bytes())
    old = time.time() - LEFTOVER_AGE_S - 60
    for name in crash_left:
        os.utime(snapshots / name, (old, old))

    monkeypatch.delenv("RELIABILITY_STALL_ARM")
    second = launch(snapshots)
    remaining = set(os.listdir(snapshots))
    assert not crash_left & remaining, f"startup left the crash's leftovers: {crash_left & remaining}"
    assert {young_temp, young_tensors} <= remaining, "startup removed files young enough to be a write in progress"
    with second.client() as client:
        restored = client.get("/sessions/crashed").json()
        assert restored["turns"] == 1 and restored["messages"] == history  # the unsaved turn is not kept
        assert generate(client, "crashed", MESSAGES[1], **GREEDY)[1]["finish_reason"] == "length"

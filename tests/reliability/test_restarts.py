"""Sessions survive SIGTERM and SIGKILL of real server processes, and a damaged snapshot only loses its session."""

import signal

import httpx
import pytest

from app.snapshots import file_stem
from tests.app.conftest import generate, sse_events
from tests.reliability.conftest import KEY_B

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
            for response in (client.get(f"/sessions/{damaged}"),
                             client.post(f"/sessions/{damaged}/generate", json={"message": "hi", "stream": False})):
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
    leftovers = [p.name for p in snapshots.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []

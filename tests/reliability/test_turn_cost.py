"""A turn costs the same at turn 10,000 as at turn 10: what it renders and writes depends on the turn, not on the
history (the transcript grows by the new messages only, the snapshot JSON stays the same size)."""

from __future__ import annotations

import signal
import time

from app.snapshots import SnapshotStore, TranscriptRef, encode_transcript, file_stem
from tests.app.conftest import generate

GREEDY = {"temperature": 0, "max_new_tokens": 4, "min_new_tokens": 4}
LONG_HISTORY_TURNS = 10_000
FILLER = "lorem ipsum dolor sit amet " * 40  # ~1 kB a message: 20 MB of transcript at 10,000 turns


def grow_history(snapshots, session_id: str, turns: int) -> None:
    """Give a stored session `turns` more exchanges of history, written as the server writes them."""
    store = SnapshotStore(snapshots)
    record = store.read_record(session_id)
    tensors = next(snapshots.glob(f"{file_stem(session_id)}.*.safetensors")).read_bytes()
    extra = [{"role": role, "content": f"{role} {i} {FILLER}"} for i in range(turns) for role in ("user", "assistant")]
    lines = encode_transcript(extra)
    store.save(
        record.model_copy(
            update={
                "message_count": record.message_count + len(extra),
                "turns": record.turns + turns,
                "transcript": TranscriptRef(
                    messages=record.transcript.messages + len(extra), bytes=record.transcript.bytes + len(lines)
                ),
            }
        ),
        tensors,
        lines,
    )


def test_a_turn_renders_and_writes_the_same_at_ten_and_at_ten_thousand_turns(launch, tmp_path):
    snapshots = tmp_path / "snapshots"
    server = launch(snapshots)
    with server.client() as client:
        for session_id in ("short", "long"):
            for turn in range(10):
                generate(client, session_id, f"turn {turn}: {FILLER}", **GREEDY)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    grow_history(snapshots, "long", LONG_HISTORY_TURNS - 10)

    server = launch(snapshots)
    files = {
        s: (snapshots / f"{file_stem(s)}.json", snapshots / f"{file_stem(s)}.transcript.jsonl")
        for s in ("short", "long")
    }
    seconds: dict[str, list[float]] = {"short": [], "long": []}
    written: dict[str, list[tuple[int, int]]] = {"short": [], "long": []}
    with server.client() as client:
        assert client.get("/sessions/long").json()["turns"] == LONG_HISTORY_TURNS
        for turn in range(4):
            for session_id, (json_file, transcript) in files.items():
                before = transcript.stat().st_size
                started = time.perf_counter()
                generate(client, session_id, f"next {turn}: {FILLER}", **GREEDY)
                seconds[session_id].append(time.perf_counter() - started)
                written[session_id].append((json_file.stat().st_size, transcript.stat().st_size - before))
        messages = client.get("/sessions/long").json()["messages"]
    assert len(messages) == 2 * (LONG_HISTORY_TURNS + 4) and messages[-2]["content"] == f"next 3: {FILLER}"
    print(
        f"turn wall time (median of 4), 10 turns: {sorted(seconds['short'])[2] * 1e3:.0f} ms, "
        f"{LONG_HISTORY_TURNS} turns: {sorted(seconds['long'])[2] * 1e3:.0f} ms"
    )
    assert files["long"][1].stat().st_size > 20e6
    for (short_json, short_appended), (long_json, long_appended) in zip(written["short"], written["long"]):
        assert abs(long_json - short_json) < 512, "the snapshot JSON must not grow with the history"
        assert abs(long_appended - short_appended) < 64 and short_appended < 4 * len(FILLER)

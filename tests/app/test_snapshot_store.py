"""SnapshotStore on its own: what a snapshot document may point at."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.sessions import Session
from app.snapshots import SnapshotCorruptError, SnapshotStore, _canonical, file_stem
from h2o_cache import CachePolicy


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "/etc/passwd",
        "{stem}.0123456789abcdef.safetensors/..",
        "{other}.0123456789abcdef.safetensors",
        None,
    ],
)
def test_a_snapshot_cannot_point_outside_its_own_tensor_files(tmp_path, name):
    """A document with a valid checksum whose tensor file is not `<its stem>.<16 hex>.safetensors` in the snapshot
    directory is corrupt: nothing outside is read."""
    store = SnapshotStore(tmp_path / "snapshots")
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    store.save(Session(id="s1", policy=CachePolicy()).to_record()[0], b"tensor bytes")
    path = store.directory / f"{file_stem('s1')}.json"
    document = json.loads(path.read_text())
    name = name and name.format(stem=file_stem("s1"), other=file_stem("s2"))
    document["body"]["tensors"]["file"] = name
    document["sha256"] = hashlib.sha256(_canonical(document["body"])).hexdigest()
    path.write_text(json.dumps(document))
    with pytest.raises(SnapshotCorruptError, match="not one of its own"):
        store.load("s1")


def save_turn(store: SnapshotStore, session: Session, messages: list[dict]) -> None:
    """What the server does at the end of a turn."""
    session.append(messages)
    record, tensor_bytes, lines = session.to_record()
    store.save(record, tensor_bytes, lines)
    session.saved(record)


def test_a_half_appended_transcript_is_cut_back_by_the_next_save(tmp_path):
    store = SnapshotStore(tmp_path)
    session = Session(id="s", policy=CachePolicy())
    first = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    save_turn(store, session, first)
    transcript = tmp_path / f"{file_stem('s')}.transcript.jsonl"
    with open(transcript, "ab") as f:
        f.write(b'{"message": {"role": "user", "con')  # a crash in the middle of the next append
    assert store.read_transcript("s", store.read_record("s").transcript) == first
    second = [{"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]
    save_turn(store, session, second)
    assert store.read_transcript("s", store.read_record("s").transcript) == first + second
    assert len(session.history) == 4 and session.unsaved == []


def test_a_format_1_snapshot_is_read_and_upgraded_by_its_next_save(tmp_path):
    """Snapshots of the previous version (whole transcript and fed text inside the JSON) keep working."""
    store = SnapshotStore(tmp_path)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    state = Session(id="old", policy=CachePolicy()).to_record()[0].model_dump(mode="json")
    for name in ("history", "message_count", "transcript", "fed_prompt", "fed_reply"):
        del state[name]
    state.update(messages=messages, fed_text="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>")
    body = {"format": 1, "session": state, "tensors": None}
    document = {"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}
    (tmp_path / f"{file_stem('old')}.json").write_text(json.dumps(document))
    session = Session.from_snapshot(store.load("old"))
    assert session.unsaved == messages and session.message_count == 2
    assert (session.fed_prompt, session.fed_reply) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "hello<|im_end|>",
    )
    save_turn(store, session, [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}])
    record = store.read_record("old")
    assert record.transcript.messages == record.message_count == 4
    assert [m["content"] for m in store.read_transcript("old", record.transcript)] == ["hi", "hello", "more", "ok"]

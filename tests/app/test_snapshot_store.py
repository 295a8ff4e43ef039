"""SnapshotStore on its own: what a snapshot document may point at."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.snapshots import SnapshotCorruptError, SnapshotStore, _canonical, file_stem


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "{stem}.0123456789abcdef.safetensors/..",
                                  "{other}.0123456789abcdef.safetensors", None])
def test_a_snapshot_cannot_point_outside_its_own_tensor_files(tmp_path, name):
    """A document with a valid checksum whose tensor file is not `<its stem>.<16 hex>.safetensors` in the snapshot
    directory is corrupt: nothing outside is read."""
    store = SnapshotStore(tmp_path / "snapshots")
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    store.save({"id": "s1", "turns": 1}, b"tensor bytes")
    path = store.directory / f"{file_stem('s1')}.json"
    document = json.loads(path.read_text())
    name = name and name.format(stem=file_stem("s1"), other=file_stem("s2"))
    document["body"]["tensors"]["file"] = name
    document["sha256"] = hashlib.sha256(_canonical(document["body"])).hexdigest()
    path.write_text(json.dumps(document))
    with pytest.raises(SnapshotCorruptError, match="not one of its own"):
        store.load("s1")

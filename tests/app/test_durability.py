"""Acknowledged means durable: a turn whose snapshot cannot be written ends in an error, is not kept, and the
server says it is not ready until a write succeeds again."""

from __future__ import annotations

import os

import pytest

from app.sessions import Session
from app.snapshots import SnapshotStore
from h2o_cache import CachePolicy
from tests.app.conftest import generate, scrape, sse_events

GREEDY = {"temperature": 0, "max_new_tokens": 4}


def test_a_turn_that_cannot_be_saved_is_an_error_and_is_not_kept(serve, tmp_path, monkeypatch):
    server = serve(snapshot_dir=str(tmp_path))
    real_save = SnapshotStore.save

    def full_disk(self, *args):
        raise OSError(28, "No space left on device")

    with server.client() as client:
        generate(client, "durable", "first", **GREEDY)
        monkeypatch.setattr(SnapshotStore, "save", full_disk)
        with client.stream("POST", "/sessions/durable/generate", json={"message": "second", **GREEDY}) as stream:
            events = list(sse_events(stream))
        assert events[-1][0] == "error" and "token" in [e for e, _ in events]
        assert events[-1][1]["error"]["type"] == "storage_error"
        assert "No space left on device" in events[-1][1]["error"]["message"]
        refused = client.post("/sessions/durable/generate", json={"message": "third", "stream": False, **GREEDY})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "storage_error"
        new = client.post("/sessions/never-saved/generate", json={"message": "hi", "stream": False, **GREEDY})
        assert new.status_code == 503
        ready = client.get("/ready")
        assert ready.status_code == 503 and "No space left on device" in ready.json()["detail"]
        kept = client.get("/sessions/durable").json()
        assert kept["turns"] == 1 and [m["content"] for m in kept["messages"] if m["role"] == "user"] == ["first"]
        assert client.get("/sessions/never-saved").status_code == 404
        assert scrape(client)['h2o_snapshot_errors_total{kind="write"}'] >= 3

        monkeypatch.setattr(SnapshotStore, "save", real_save)
        generate(client, "durable", "fourth", **GREEDY)
        assert client.get("/ready").status_code == 200
        assert client.get("/sessions/durable").json()["turns"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        store.save(Session(id="s", policy=CachePolicy()).to_record()[0], b"tensors")
    assert list(tmp_path.iterdir()) == []


def test_a_delete_that_cannot_remove_the_files_fails_and_the_session_stays(serve, tmp_path, monkeypatch):
    server = serve(snapshot_dir=str(tmp_path))
    real_delete = SnapshotStore.delete

    def read_only(self, session_id):
        raise PermissionError(13, "Read-only file system")

    with server.client() as client:
        generate(client, "kept", "hello", **GREEDY)
        monkeypatch.setattr(SnapshotStore, "delete", read_only)
        failed = client.delete("/sessions/kept")
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "storage_error"
        assert "Read-only file system" in failed.json()["error"]["message"]
        assert client.get("/sessions/kept").json()["turns"] == 1  # still there, as it would be after a restart
        generate(client, "kept", "again", **GREEDY)
        monkeypatch.setattr(SnapshotStore, "delete", real_delete)
        assert client.delete("/sessions/kept").status_code == 204
        assert client.get("/sessions/kept").status_code == 404
    assert list(tmp_path.glob("*.json")) == []

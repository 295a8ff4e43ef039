"""Session snapshots on disk: one JSON file (the session's state) and one safetensors file (its cache tensors) per
session, written atomically and verified by checksums when read. No pickle anywhere.

Layout of a snapshot directory, for a session whose id hashes to `<h>` (sha256 hex; ids never reach the
filesystem, so no id can name a path):

    <h>.json                     {"sha256": <of the canonical body>, "body": {"format", "session", "tensors"}}
    <h>.<t>.safetensors          the cache tensors; <t> = the first 16 hex digits of their sha256

The JSON is the commit point. A new snapshot writes its tensor file under a new name first, then replaces the
JSON (temp file + fsync + rename + fsync of the directory), then removes the older tensor file: a crash at any
moment leaves the previous or the new snapshot whole.

Several replicas may share a directory (scale-out behind a session-affine router): each session is live on one
replica at a time, the others learn of changes through `signature` (see app.sessions.SessionStore.refresh), and
startup only cleans up leftovers older than `LEFTOVER_AGE_S`, so a replica that starts never removes the files
another replica is writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LEFTOVER_AGE_S = 300.0
"""Temp files and unreferenced tensor files older than this are a crash's leftovers; younger ones may be a write
in progress on another replica that shares the directory."""

Signature = tuple[int, int, int]
"""(inode, mtime ns, size) of a snapshot's JSON: every save replaces the file, so a save changes it."""


class SnapshotCorruptError(Exception):
    """A snapshot failed verification (checksum, truncation, wrong session); it is reported, never loaded."""


@dataclass
class Snapshot:
    state: dict[str, Any]
    """The session's JSON state (see app.sessions.Session.to_state)."""
    tensors: dict[str, torch.Tensor]
    """Cache tensors on the CPU (empty for a session without a cache)."""


def file_stem(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


class SnapshotStore:
    """Synchronous reads and writes of snapshots in `directory` (writes come from one thread, see SnapshotWriter)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, state: dict[str, Any], tensor_bytes: bytes) -> None:
        """Atomically replace the snapshot of session `state["id"]`; `tensor_bytes` is a safetensors file's
        content (b"" when the session has no cache)."""
        stem = file_stem(state["id"])
        tensors = None
        if tensor_bytes:
            digest = hashlib.sha256(tensor_bytes).hexdigest()
            tensors = {"file": f"{stem}.{digest[:16]}.safetensors", "sha256": digest, "bytes": len(tensor_bytes)}
            self._write_atomic(self.directory / tensors["file"], tensor_bytes)
        body = {"format": FORMAT_VERSION, "session": state, "tensors": tensors}
        document = {"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}
        self._write_atomic(self.directory / f"{stem}.json", json.dumps(document, ensure_ascii=False).encode())
        self._fsync_directory()
        keep = tensors["file"] if tensors else None
        for old in self.directory.glob(f"{stem}.*.safetensors"):
            if old.name != keep:
                old.unlink(missing_ok=True)

    def signature(self, stem: str) -> Signature | None:
        """Identifies the current snapshot with file stem `stem` (see `file_stem`) without reading it; None if
        there is none."""
        try:
            st = os.stat(self.directory / f"{stem}.json")
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read_state(self, session_id: str) -> dict[str, Any]:
        """The verified JSON state of `session_id` (tensors not read); errors as `load`."""
        return self._read_session_body(session_id)["session"]

    def load(self, session_id: str) -> Snapshot:
        """The verified snapshot of `session_id`; FileNotFoundError if there is none, SnapshotCorruptError if it
        fails verification."""
        body = self._read_session_body(session_id)
        tensors: dict[str, torch.Tensor] = {}
        ref = body["tensors"]
        if ref is not None:
            if not re.fullmatch(rf"{file_stem(session_id)}\.[0-9a-f]{{16}}\.safetensors", str(ref.get("file"))):
                raise SnapshotCorruptError(f"snapshot of {session_id!r} names tensor file {ref.get('file')!r}, not "
                                           "one of its own in the snapshot directory")
            path = self.directory / ref["file"]
            try:
                data = path.read_bytes()
            except FileNotFoundError as exc:
                raise SnapshotCorruptError(f"snapshot tensor file {ref['file']} is missing") from exc
            if len(data) != ref["bytes"] or hashlib.sha256(data).hexdigest() != ref["sha256"]:
                raise SnapshotCorruptError(f"snapshot tensor file {ref['file']} fails its checksum "
                                           f"({len(data)} bytes, {ref['bytes']} expected): truncated or damaged")
            try:
                tensors = load_tensors(data)
            except Exception as exc:  # checksum matched but the content is not safetensors: a bad writer
                raise SnapshotCorruptError(f"snapshot tensor file {ref['file']} is unreadable: {exc}") from exc
        return Snapshot(body["session"], tensors)

    def delete(self, session_id: str) -> None:
        """Remove a session's snapshot; the JSON first, so a crash midway leaves no half snapshot."""
        stem = file_stem(session_id)
        (self.directory / f"{stem}.json").unlink(missing_ok=True)
        for path in self.directory.glob(f"{stem}.*.safetensors"):
            path.unlink(missing_ok=True)
        self._fsync_directory()

    def scan(self) -> Iterator[tuple[str, dict[str, Any] | SnapshotCorruptError]]:
        """Every snapshot as (file stem, session state or the error that makes it unreadable). Only the JSON is
        read (tensor files are verified when a session is loaded). Removes what a crash left behind: temp files
        and tensor files no JSON refers to, once older than LEFTOVER_AGE_S."""
        referenced = set()
        for path in sorted(self.directory.glob("*.json")):
            stem = path.name.removesuffix(".json")
            try:
                body = self._read_body(path)
                if file_stem(str(body["session"].get("id"))) != stem:
                    raise SnapshotCorruptError(f"{path.name} holds session {body['session'].get('id')!r}")
            except SnapshotCorruptError as exc:
                referenced.update(p.name for p in self.directory.glob(f"{stem}.*.safetensors"))
                yield stem, exc
                continue
            if body["tensors"] is not None:
                referenced.add(body["tensors"]["file"])
            yield stem, body["session"]
        horizon = time.time() - LEFTOVER_AGE_S
        leftovers = [*self.directory.glob(".*.tmp"),
                     *(p for p in self.directory.glob("*.safetensors") if p.name not in referenced)]
        for path in leftovers:
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink()
            except FileNotFoundError:
                pass

    def _read_session_body(self, session_id: str) -> dict[str, Any]:
        stem = file_stem(session_id)
        body = self._read_body(self.directory / f"{stem}.json")
        if body["session"].get("id") != session_id:
            raise SnapshotCorruptError(f"snapshot {stem}.json belongs to session {body['session'].get('id')!r}")
        return body

    def _read_body(self, path: Path) -> dict[str, Any]:
        raw = path.read_bytes()  # FileNotFoundError: no snapshot
        try:
            document = json.loads(raw)
            body = document["body"]
            valid = hashlib.sha256(_canonical(body)).hexdigest() == document["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotCorruptError(f"snapshot {path.name} is not a snapshot document "
                                       f"({len(raw)} bytes): truncated or damaged") from exc
        if not valid:
            raise SnapshotCorruptError(f"snapshot {path.name} fails its checksum: damaged")
        if body.get("format") != FORMAT_VERSION:
            raise SnapshotCorruptError(f"snapshot {path.name} has format {body.get('format')!r}, "
                                       f"this server reads {FORMAT_VERSION}")
        return body

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind (a full disk gets its space back)
            raise

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SnapshotWriter:
    """One thread that performs every write and delete of a SnapshotStore in submission order, so a delete
    queued after a save always wins and the engine's worker never waits for the disk."""

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="h2o-snapshots", daemon=True)
        self._thread.start()

    def save(self, state: dict[str, Any], tensor_bytes: bytes,
             done: Callable[[Exception | None], None]) -> None:
        """Queue a save; `done(error)` is called on the writer thread once it is durable (or failed)."""
        def job() -> None:
            try:
                self._store.save(state, tensor_bytes)
            except Exception as exc:
                logger.exception("could not write the snapshot of session %s", state["id"])
                done(exc)
            else:
                done(None)

        self._jobs.put(job)

    def delete(self, session_id: str) -> Future:
        """Queue a delete; the future is done once the files are gone, or holds the OSError that kept them."""
        done: Future = Future()

        def job() -> None:
            try:
                self._store.delete(session_id)
            except OSError as exc:
                logger.exception("could not delete the snapshot of session %s", session_id)
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._jobs.put(job)
        return done

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish every queued job, then stop."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

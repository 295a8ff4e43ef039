"""Session snapshots on disk: per session, one JSON file (its state, bounded by a turn), one safetensors file (its
cache tensors), an append-only transcript and an owner marker, written atomically and verified when read. No
pickle anywhere.

Layout of a snapshot directory, for a session whose id hashes to `<h>` (sha256 hex; ids never reach the
filesystem, so no id can name a path):

    <h>.json                     {"sha256": <of the canonical body>, "body": {"format", "session", "tensors"}}
    <h>.<t>.safetensors          the cache tensors; <t> = the first 16 hex digits of their sha256
    <h>.transcript.jsonl         every message, one checksummed JSON line each, appended turn by turn
    <h>.<owner>.owner            empty; its name says which API key owns the id (`anyone` without keys)
    quarantine/<h>.<time>/       the files of a snapshot found damaged, moved aside for the operator

The JSON is the commit point. A save appends the turn's messages to the transcript (after cutting it back to the
length the current JSON records, which drops what a crash may have half-appended), writes its tensor file under
a new name, then replaces the JSON (temp file + fsync + rename + fsync of the directory), then removes the older
tensor file: a crash at any moment leaves the previous or the new snapshot whole. What a turn writes is bounded by
the turn, not by the history: the JSON holds the last few messages, the transcript grows by the new ones.

The owner marker is written with a session's first snapshot and is removed only when the session is deleted: a
snapshot that cannot be read still cannot be claimed or deleted by another key.

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
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_tensors

from h2o_cache import CachePolicy

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2: the transcript moved out of the JSON into `<h>.transcript.jsonl`; format 1 snapshots are read and upgraded
by their next save."""
LEFTOVER_AGE_S = 300.0
"""Temp files and unreferenced tensor files older than this are a crash's leftovers; younger ones may be a write
in progress on another replica that shares the directory."""
QUARANTINE = "quarantine"
ANYONE = "anyone"
"""The owner marker of a session made without API keys."""

Signature = tuple[int, int, int]
"""(inode, mtime ns, size) of a snapshot's JSON: every save replaces the file, so a save changes it."""
Message = dict[str, str]


class SnapshotCorruptError(Exception):
    """A snapshot failed verification (checksum, truncation, schema, wrong session); it is reported, never loaded,
    and its files are quarantined."""


class SnapshotUnsupportedError(SnapshotCorruptError):
    """A snapshot in a format this server does not read (a newer version wrote it): reported, left in place."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TranscriptRef(Strict):
    messages: int = Field(ge=0)
    """Messages in the transcript file (the rest of the session's messages are in `history`)."""
    bytes: int = Field(ge=0)
    """Committed length of the transcript file; anything after it is a crash's half-append."""


class SessionRecord(Strict):
    """The schema of a session's JSON state (see app.sessions.Session.to_record): a snapshot that does not match
    it is damaged."""

    id: str
    owner: str | None
    policy: CachePolicy
    system: str | None
    history: list[Message]
    """The session's last messages: those not in the transcript file yet, and the few before them that the next
    turn is rendered after (app.chat.context)."""
    message_count: int = Field(ge=0)
    transcript: TranscriptRef
    fed_prompt: str
    fed_reply: str
    conversation_key: str | None = None
    """See app.conversations."""
    pending_ids: list[int]
    cache: dict[str, Any] | None
    turns: int = Field(ge=0)
    cache_tokens: int = Field(ge=0)
    cache_tokens_seen: int = Field(ge=0)
    cache_bytes: int = Field(ge=0)
    evicted_tokens: int = Field(ge=0)
    created_at: float
    updated_at: float


@dataclass
class Snapshot:
    record: SessionRecord
    tensors: dict[str, torch.Tensor]
    """Cache tensors on the CPU (empty for a session without a cache)."""


def file_stem(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def encode_transcript(messages: list[Message]) -> bytes:
    """Transcript lines: each message with a checksum of its own, so damage anywhere is found when it is read."""
    return b"".join(
        _canonical({"message": m, "sha256": hashlib.sha256(_canonical(m)).hexdigest()[:16]}) + b"\n" for m in messages
    )


def _upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """A format 1 state (whole transcript and fed text inline) as format 2: every message is unsaved history (the
    next save writes the transcript), and the fed text is split into the last reply and what came before."""
    state = dict(state)
    messages, fed = state.pop("messages"), state.pop("fed_text")
    reply = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
    split = fed.rfind(reply) if reply else -1
    state.update(
        history=messages,
        message_count=len(messages),
        transcript={"messages": 0, "bytes": 0},
        fed_prompt=fed[:split] if split >= 0 else fed,
        fed_reply=fed[split:] if split >= 0 else "",
    )
    return state


def _marker_owner(marker: Path) -> str:
    """The owner an owner marker `<stem>.<owner>.owner` names."""
    return marker.name.split(".")[1]


class SnapshotStore:
    """Synchronous reads and writes of snapshots in `directory` (writes come from one thread, see SnapshotWriter)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, record: SessionRecord, tensor_bytes: bytes, transcript: bytes = b"") -> None:
        """Atomically replace the snapshot of session `record.id`; `tensor_bytes` is a safetensors file's content
        (b"" when the session has no cache), `transcript` the turn's new messages (see `encode_transcript`), which
        `record.transcript` counts already."""
        stem = file_stem(record.id)
        first = not (self.directory / f"{stem}.json").exists()
        try:
            self._commit(stem, record, tensor_bytes, transcript)
        except BaseException:
            if first:  # nothing was acknowledged: the id is nobody's yet
                for path in [*self.directory.glob(f"{stem}.*.owner"), self._transcript(stem)]:
                    path.unlink(missing_ok=True)
            raise

    def _commit(self, stem: str, record: SessionRecord, tensor_bytes: bytes, transcript: bytes) -> None:
        self._mark_owner(stem, record.owner)
        self._append(self._transcript(stem), record.transcript.bytes - len(transcript), transcript)
        tensors = None
        if tensor_bytes:
            digest = hashlib.sha256(tensor_bytes).hexdigest()
            tensors = {"file": f"{stem}.{digest[:16]}.safetensors", "sha256": digest, "bytes": len(tensor_bytes)}
            self._write_atomic(self.directory / tensors["file"], tensor_bytes)
        body = {"format": FORMAT_VERSION, "session": record.model_dump(mode="json"), "tensors": tensors}
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

    def owner(self, stem: str) -> str | None:
        """The owner marker's name for file stem `stem` (ANYONE for a session made without keys); None if none."""
        for path in self.directory.glob(f"{stem}.*.owner"):
            return _marker_owner(path)
        return None

    def read_record(self, session_id: str) -> SessionRecord:
        """The verified JSON state of `session_id` (tensors not read); errors as `load`."""
        return self._read_session_body(session_id)[0]

    def load(self, session_id: str) -> Snapshot:
        """The verified snapshot of `session_id`; FileNotFoundError if there is none, SnapshotCorruptError if it
        fails verification."""
        record, ref = self._read_session_body(session_id)
        tensors: dict[str, torch.Tensor] = {}
        if ref is not None:
            if not isinstance(ref, dict) or not re.fullmatch(
                rf"{file_stem(session_id)}\.[0-9a-f]{{16}}\.safetensors", str(ref.get("file"))
            ):
                raise SnapshotCorruptError(
                    f"snapshot of {session_id!r} names tensor file "
                    f"{ref.get('file') if isinstance(ref, dict) else ref!r}, not one of its "
                    "own in the snapshot directory"
                )
            path = self.directory / ref["file"]
            try:
                data = path.read_bytes()
            except FileNotFoundError as exc:
                raise SnapshotCorruptError(f"snapshot tensor file {ref['file']} is missing") from exc
            if len(data) != ref.get("bytes") or hashlib.sha256(data).hexdigest() != ref.get("sha256"):
                raise SnapshotCorruptError(
                    f"snapshot tensor file {ref['file']} fails its checksum "
                    f"({len(data)} bytes, {ref.get('bytes')} expected): truncated or damaged"
                )
            try:
                tensors = load_tensors(data)
            except Exception as exc:  # checksum matched but the content is not safetensors: a bad writer
                raise SnapshotCorruptError(f"snapshot tensor file {ref['file']} is unreadable: {exc}") from exc
        return Snapshot(record, tensors)

    def read_transcript(self, session_id: str, ref: TranscriptRef) -> list[Message]:
        """The first `ref.messages` messages of a session, verified line by line (SnapshotCorruptError if not)."""
        if ref.messages == 0:
            return []
        path = self._transcript(file_stem(session_id))
        name = path.name
        try:
            with open(path, "rb") as f:
                data = f.read(ref.bytes)
        except FileNotFoundError as exc:
            raise SnapshotCorruptError(f"transcript {name} is missing") from exc
        lines = data.split(b"\n")
        if len(data) != ref.bytes or lines[-1] != b"" or len(lines) - 1 != ref.messages:
            raise SnapshotCorruptError(
                f"transcript {name} is truncated or damaged ({len(data)} bytes, {ref.bytes} expected)"
            )
        messages = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                entry = json.loads(line)
                message = entry["message"]
                valid = hashlib.sha256(_canonical(message)).hexdigest()[:16] == entry["sha256"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SnapshotCorruptError(f"transcript {name} line {number} is not a message") from exc
            if not valid:
                raise SnapshotCorruptError(f"transcript {name} line {number} fails its checksum: damaged")
            messages.append(message)
        return messages

    def delete(self, session_id: str) -> None:
        """Remove a session's snapshot; the JSON first, so a crash midway leaves no half snapshot, and the owner
        marker last, so the id stays its owner's until everything else is gone."""
        stem = file_stem(session_id)
        (self.directory / f"{stem}.json").unlink(missing_ok=True)
        for path in [
            *self.directory.glob(f"{stem}.*.safetensors"),
            self._transcript(stem),
            *self.directory.glob(f"{stem}.*.owner"),
        ]:
            path.unlink(missing_ok=True)
        self._fsync_directory()

    def quarantine(self, stem: str) -> Path | None:
        """Move a damaged snapshot's files (not its owner marker) aside into `quarantine/`, for an operator to
        look at; the path they went to, or None if there was nothing to move."""
        files = [
            p
            for p in [
                self.directory / f"{stem}.json",
                self._transcript(stem),
                *self.directory.glob(f"{stem}.*.safetensors"),
            ]
            if p.exists()
        ]
        if not files:
            return None
        target = self.directory / QUARANTINE / f"{stem}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
        target.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.move(path, target / path.name)
        self._fsync_directory()
        return target

    def quarantined(self, stem: str) -> bool:
        return any((self.directory / QUARANTINE).glob(f"{stem}.*"))

    def scan(self) -> Iterator[tuple[str, str | None, SessionRecord | SnapshotCorruptError]]:
        """Every session on disk as (file stem, owner marker, its state or why it cannot be read). Only the JSON is
        read (tensor files and transcripts are verified when used); a damaged JSON is quarantined. An owner marker
        whose snapshot was quarantined still names a session (its owner can see the error and delete it). Removes
        what a crash left behind once older than LEFTOVER_AGE_S: temp files, and tensor files, transcripts and
        owner markers of no snapshot."""
        owners = {  # one listing for the whole directory, not a glob per snapshot
            marker.name.split(".", 1)[0]: _marker_owner(marker) for marker in self.directory.glob("*.owner")
        }
        live: set[str] = set()
        kept_tensors: set[str] = set()
        for path in sorted(self.directory.glob("*.json")):
            stem = path.name.removesuffix(".json")
            live.add(stem)
            try:
                record, tensors = self._read_body(path)
                if file_stem(record.id) != stem:
                    raise SnapshotCorruptError(f"{path.name} holds session {record.id!r}")
            except SnapshotCorruptError as exc:
                error = self.set_aside(stem, exc)
                kept_tensors.update(p.name for p in self.directory.glob(f"{stem}.*.safetensors"))
                yield stem, owners.get(stem), error
                continue
            if isinstance(tensors, dict):
                kept_tensors.add(str(tensors.get("file")))
            yield stem, owners.get(stem), record
        for stem, owner in owners.items():
            if stem not in live and self.quarantined(stem):
                live.add(stem)
                yield stem, owner, SnapshotCorruptError(f"snapshot {stem} was quarantined as damaged")
        horizon = time.time() - LEFTOVER_AGE_S
        leftovers = [
            *self.directory.glob(".*.tmp"),
            *(p for p in self.directory.glob("*.safetensors") if p.name not in kept_tensors),
            *(
                p
                for pattern in ("*.transcript.jsonl", "*.owner")
                for p in self.directory.glob(pattern)
                if p.name.split(".", 1)[0] not in live
            ),
        ]
        for path in leftovers:
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink()
            except FileNotFoundError:
                pass

    def set_aside(self, stem: str, error: SnapshotCorruptError) -> SnapshotCorruptError:
        """Quarantine a snapshot found damaged (one in another format stays where it is); the error to report,
        saying where its files went."""
        if isinstance(error, SnapshotUnsupportedError):
            return error
        try:
            target = self.quarantine(stem)
        except OSError as exc:
            logger.error("could not quarantine damaged snapshot %s: %s", stem, exc)
            return error
        if target is None:
            return error
        logger.error("snapshot %s is damaged (%s); its files were moved to %s", stem, error, target)
        return SnapshotCorruptError(f"{error}; its files were moved to {target.relative_to(self.directory)}")

    def _read_session_body(self, session_id: str) -> tuple[SessionRecord, Any]:
        stem = file_stem(session_id)
        record, tensors = self._read_body(self.directory / f"{stem}.json")
        if record.id != session_id:
            raise SnapshotCorruptError(f"snapshot {stem}.json belongs to session {record.id!r}")
        return record, tensors

    def _read_body(self, path: Path) -> tuple[SessionRecord, Any]:
        """The verified session record and tensor reference of a snapshot JSON."""
        raw = path.read_bytes()  # FileNotFoundError: no snapshot
        try:
            document = json.loads(raw)
            body = document["body"]
            valid = hashlib.sha256(_canonical(body)).hexdigest() == document["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotCorruptError(
                f"snapshot {path.name} is not a snapshot document ({len(raw)} bytes): truncated or damaged"
            ) from exc
        if not valid:
            raise SnapshotCorruptError(f"snapshot {path.name} fails its checksum: damaged")
        if not isinstance(body, dict) or body.get("format") not in (1, FORMAT_VERSION):
            raise SnapshotUnsupportedError(
                f"snapshot {path.name} has format "
                f"{body.get('format') if isinstance(body, dict) else None!r}, this server "
                f"reads 1 and {FORMAT_VERSION}: a newer version wrote it"
            )
        try:
            state = body["session"]
            if body["format"] == 1:
                state = _upgrade_v1(state)
            return SessionRecord.model_validate(state), body["tensors"]
        except (ValidationError, KeyError, TypeError, AttributeError, IndexError) as exc:
            detail = (
                str(exc).splitlines()[0]
                if not isinstance(exc, ValidationError)
                else "; ".join(f"{'.'.join(map(str, e['loc'])) or 'session'}: {e['msg']}" for e in exc.errors()[:3])
            )
            raise SnapshotCorruptError(
                f"snapshot {path.name} does not match the format {body['format']} schema ({detail})"
            ) from exc

    def _transcript(self, stem: str) -> Path:
        return self.directory / f"{stem}.transcript.jsonl"

    def _mark_owner(self, stem: str, owner: str | None) -> None:
        """Write the owner marker (the API checks ownership before a session is created or used, so another
        owner's marker here is a leftover of a first save that was never committed)."""
        name = f"{stem}.{owner or ANYONE}.owner"
        if (self.directory / name).exists():
            return
        for stale in self.directory.glob(f"{stem}.*.owner"):
            stale.unlink(missing_ok=True)
        (self.directory / name).touch()

    def _append(self, path: Path, committed: int, data: bytes) -> None:
        """Cut the transcript back to its `committed` length (dropping a crash's half-append), then append `data`
        durably; on failure cut it back again, so a full disk gets its space back."""
        if not data and not committed and not path.exists():
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size < committed:
                raise SnapshotCorruptError(f"transcript {path.name} has {size} bytes, its snapshot {committed}")
            if size == committed and not data:
                return
            os.ftruncate(fd, committed)
            try:
                os.lseek(fd, committed, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, committed)
                raise
        finally:
            os.close(fd)

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

    def save(
        self, record: SessionRecord, tensor_bytes: bytes, transcript: bytes, done: Callable[[Exception | None], None]
    ) -> None:
        """Queue a save; `done(error)` is called on the writer thread once it is durable (or failed)."""

        def job() -> None:
            try:
                self._store.save(record, tensor_bytes, transcript)
            except Exception as exc:
                logger.exception("could not write the snapshot of session %s", record.id)
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

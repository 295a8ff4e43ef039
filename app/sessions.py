"""Conversations: each holds its chat history, its bounded KV cache and what the two have in common; the store
keeps a bounded number of them in memory and, with a snapshot directory, every one of them on disk."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import save as save_tensors

from app.chat import CONTEXT_MESSAGES, Message
from app.snapshots import (
    ANYONE,
    SessionRecord,
    Signature,
    Snapshot,
    SnapshotCorruptError,
    SnapshotStore,
    SnapshotWriter,
    TranscriptRef,
    encode_transcript,
    file_stem,
)
from h2o_cache import CachePolicy, cache_state

if TYPE_CHECKING:
    from app.metrics import Metrics

logger = logging.getLogger(__name__)


class Turn(Protocol):
    """What the session store knows of the turn a session is generating (app.generation.Generation): sessions hold
    state, not generations."""

    cancelled: bool
    finished: asyncio.Event

    def cancel(self) -> None: ...


COUNTERS = ("turns", "cache_tokens", "cache_tokens_seen", "cache_bytes", "evicted_tokens", "created_at", "updated_at")
SUMMARY_FIELDS = ("id", "owner", *COUNTERS, "conversation_key")
RECORD_FIELDS = ("id", "owner", "policy", "system", "message_count", "fed_prompt", "fed_reply", "conversation_key")
RECORD_FIELDS += ("pending_ids", *COUNTERS)
"""Fields a session and its snapshot record (app.snapshots.SessionRecord) share as they are."""


@dataclass
class Session:
    """One conversation. The event loop creates, lists and deletes sessions; while `active` is set, only the
    engine's worker thread changes the rest.

    Invariant between turns: the cache's text ends with `fed_prompt` + `fed_reply` minus the text of
    `pending_ids` (tokens already chosen but not fed yet: the last sampled token, or what a cancelled prefill
    left), and the last messages of `history` render to a text that holds them (see app.chat.turn_delta).
    """

    id: str
    policy: CachePolicy
    system: str | None = None
    owner: str | None = None
    """Hash of the API key that created the session (None without API keys); never the key itself."""
    history: list[Message] = field(default_factory=list)
    """The latest messages: every one while the session lives only in memory; with a snapshot store, those not
    in its transcript file yet and the last CONTEXT_MESSAGES (the next turn is rendered after them)."""
    message_count: int = 0
    transcript: TranscriptRef = field(default_factory=lambda: TranscriptRef(messages=0, bytes=0))
    """What the transcript file on disk holds (see app.snapshots)."""
    fed_prompt: str = ""
    """The text the last turn fed before its reply."""
    fed_reply: str = ""
    """The last turn's raw reply, end-of-turn token included."""
    conversation_key: str | None = None
    """The key of the conversation as its client saw it (app.conversations), None before the first turn."""
    pending_ids: list[int] = field(default_factory=list)
    cache: Any = None
    """The transformers Cache from h2o_cache.make_cache, built by the worker on the first forward."""
    saved_cache: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    """Tensors and metadata of a cache restored from a snapshot; the worker rebuilds `cache` from them on the
    next forward (h2o_cache.restore_cache), so loading a session never touches the model."""
    turns: int = 0
    cache_tokens: int = 0
    cache_tokens_seen: int = 0
    cache_bytes: int = 0
    evicted_tokens: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    active: Turn | None = None
    persisted: bool = False
    """The snapshot on disk holds this state: the session may leave memory."""
    ephemeral: bool = False
    """One request's only (a legacy completion): never stored, listed or written to disk."""
    deleted: bool = False

    def reset_cache(self) -> None:
        """Forget the cache; the next turn re-prefills the whole history once (used after a failed forward)."""
        self.cache = self.saved_cache = None
        self.fed_prompt = self.fed_reply = ""
        self.pending_ids = []
        self.cache_tokens = self.cache_bytes = 0

    def append(self, messages: list[Message]) -> None:
        """A finished turn's messages (worker thread)."""
        self.history.extend(messages)
        self.message_count += len(messages)

    @property
    def unsaved(self) -> list[Message]:
        """Messages not in the transcript file yet."""
        return self.history[len(self.history) - (self.message_count - self.transcript.messages) :]

    def to_record(self) -> tuple[SessionRecord, bytes, bytes]:
        """Everything that makes a continuation identical: the JSON state, a safetensors file's bytes and the
        transcript lines of the messages not written yet; all bounded by a turn, not by the history (worker
        thread, between steps: the bytes are a copy, so the cache may change right after)."""
        if self.cache is not None:
            tensors, cache_meta = cache_state(self.cache)
        elif self.saved_cache is not None:
            tensors, cache_meta = self.saved_cache
        else:
            tensors, cache_meta = {}, None
        unsaved = self.unsaved
        lines = encode_transcript(unsaved)
        record = SessionRecord(
            **{name: getattr(self, name) for name in RECORD_FIELDS},
            history=self.history[-(len(unsaved) + CONTEXT_MESSAGES) :],
            transcript=TranscriptRef(messages=self.message_count, bytes=self.transcript.bytes + len(lines)),
            cache=cache_meta,
        )
        return record, save_tensors(tensors) if tensors else b"", lines

    def saved(self, record: SessionRecord) -> None:
        """`record` is on disk: its messages are in the transcript file, and memory keeps only the last few."""
        self.transcript = record.transcript
        self.history = self.history[-(CONTEXT_MESSAGES + self.message_count - record.transcript.messages) :]

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> Session:
        r = snapshot.record
        return cls(
            **{name: getattr(r, name) for name in RECORD_FIELDS},
            history=list(r.history),
            transcript=r.transcript,
            saved_cache=(snapshot.tensors, r.cache) if r.cache is not None else None,
            persisted=True,
        )

    def summary(self) -> dict[str, Any]:
        """What listing a session needs (see `stored_summary` for one that is only on disk)."""
        return {
            **{name: getattr(self, name) for name in SUMMARY_FIELDS},
            "policy": self.policy,
            "busy": self.active is not None,
        }


def stored_summary(record: SessionRecord) -> dict[str, Any]:
    return {**{name: getattr(record, name) for name in SUMMARY_FIELDS}, "policy": record.policy, "busy": False}


class SnapshotDeleteError(Exception):
    """A session's snapshot files could not be removed."""


class SessionLimitError(Exception):
    """Raised when a new session would exceed `max_sessions`."""


class SessionStore:
    """Sessions by id, bounded in number; idle ones expire after `ttl_s`.

    Without a snapshot store every session lives in memory. With one, every completed turn is written to disk
    (`persist`, called by the engine), at most `max_resident` sessions stay in memory (the least recently used
    idle ones leave first; their snapshot is already up to date), and a session on disk is loaded again when it
    is touched (`load`). Only the event loop calls the methods, except `persist` (the worker).

    Replicas may share the snapshot directory: a session is live on one replica at a time (the router hashes its
    id), and moves when a replica dies or comes back. So before a session is used, `refresh` compares the snapshot
    on disk with the one this store last wrote or read: a snapshot it has not seen (another replica wrote it) is
    indexed, and replaces an idle copy in memory, which would be older; a snapshot deleted elsewhere is forgotten.
    """

    def __init__(
        self,
        max_sessions: int,
        ttl_s: float,
        max_resident: int | None = None,
        snapshots: SnapshotStore | None = None,
        metrics: Metrics | None = None,
        max_per_owner: int | None = None,
    ) -> None:
        self._max_sessions = max_sessions
        self._max_per_owner = max_per_owner
        self._ttl_s = ttl_s
        self._max_resident = max_resident if snapshots is not None and max_resident else max_sessions
        self._snapshots = snapshots
        self._writer = SnapshotWriter(snapshots) if snapshots is not None else None
        self._metrics = metrics
        self._resident: OrderedDict[str, Session] = OrderedDict()
        """In memory, least recently used first."""
        self._stored: dict[str, dict[str, Any]] = {}
        """Summaries of the sessions with a snapshot on disk (resident or not)."""
        self._signatures: dict[str, Signature] = {}
        """Of the snapshot files this store last wrote or read, by file stem (see `refresh`)."""
        self._corrupt: dict[str, tuple[SnapshotCorruptError, str | None]] = {}
        """Snapshots found damaged, by file stem (their session id may be unreadable), with their owner as the
        owner marker says (UNKNOWN_OWNER if it has none)."""
        self._loading: dict[str, asyncio.Task] = {}
        self._disk_lock = threading.Lock()
        """Orders a turn's save against a DELETE of the same session (worker thread vs event loop)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.write_error: str | None = None
        """Why the last snapshot write failed; None once one succeeds (``/ready`` answers 503 meanwhile)."""

    @property
    def persistent(self) -> bool:
        return self._snapshots is not None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Index the snapshot directory (JSON only; sessions load when touched) and start the writer thread."""
        self._loop = loop
        if self._snapshots is None:
            return
        for stem, marker, found in self._snapshots.scan():
            self._signatures[stem] = self._snapshots.signature(stem)
            if isinstance(found, SnapshotCorruptError):
                self._damaged(stem, found, marker)
            else:
                self._stored[found.id] = stored_summary(found)
        logger.info(
            "%d session snapshots found in %s (%d corrupt)",
            len(self._stored),
            self._snapshots.directory,
            len(self._corrupt),
        )
        self._writer.start()

    def close(self) -> None:
        """Finish pending snapshot writes (after the engine has stopped)."""
        if self._writer is not None:
            self._writer.close()

    def get(self, session_id: str) -> Session | None:
        """A resident session (marked as just used); see `load` for one that may be on disk."""
        session = self._resident.get(session_id)
        if session is not None:
            self._resident.move_to_end(session_id)
        return session

    def find_conversation(self, key: str) -> str | None:
        """The id of an idle session whose conversation has `key` (app.conversations; a key holds its owner)."""
        for session in self._resident.values():
            if session.conversation_key == key and session.active is None and not session.deleted:
                return session.id
        for session_id, summary in self._stored.items():
            if summary["conversation_key"] == key and session_id not in self._resident:
                return session_id
        return None

    def lookup(self, session_id: str) -> tuple[bool, str | None]:
        """(whether the session exists, its owner) from one look at the snapshot directory: the owner from its
        summary, or from its owner marker when its snapshot is damaged."""
        self.refresh(session_id)
        stem = file_stem(session_id)
        if stem in self._corrupt:
            return True, self._corrupt[stem][1]
        session = self._resident.get(session_id)
        if session is not None:
            return True, session.owner
        summary = self._stored.get(session_id)
        return summary is not None, None if summary is None else summary["owner"]

    async def load(self, session_id: str, refresh: bool = True) -> Session | None:
        """The session, read back from its snapshot if it is not in memory; None if there is none. Raises
        SnapshotCorruptError when its snapshot fails verification (every time, until it is deleted). `refresh`:
        False when the caller has just looked (`lookup`) and not awaited since."""
        if refresh:
            self.refresh(session_id)
        while session_id not in self._resident:
            stem = file_stem(session_id)
            if stem in self._corrupt:
                raise self._corrupt[stem][0]
            if session_id not in self._stored:
                return None
            task = self._loading.get(session_id)
            if task is None:
                task = self._loading[session_id] = asyncio.create_task(self._restore(session_id))
            await asyncio.shield(task)
        return self.get(session_id)

    def refresh(self, session_id: str) -> None:
        """Bring this store's view of `session_id` in line with the snapshot directory, which other replicas may
        write: one stat when nothing changed. A session generating here, or with a save pending, is this
        replica's own and is left alone."""
        if self._snapshots is None:
            return
        session = self._resident.get(session_id)
        if session is not None and (session.active is not None or not session.persisted):
            return
        stem = file_stem(session_id)
        signature = self._snapshots.signature(stem)
        if signature == self._signatures.get(stem):
            return
        if session is not None:  # older than the disk: `load` reads the current snapshot
            del self._resident[session_id]
        self._corrupt.pop(stem, None)
        self._stored.pop(session_id, None)
        self._signatures.pop(stem, None)
        if signature is None:
            if self._snapshots.quarantined(stem) and (marker := self._snapshots.owner(stem)) is not None:
                self._corrupt[stem] = (
                    SnapshotCorruptError(f"the snapshot of {session_id!r} was quarantined as damaged"),
                    _owner(marker),
                )
            return
        try:
            record = self._snapshots.read_record(session_id)
        except FileNotFoundError:  # deleted meanwhile
            return
        except SnapshotCorruptError as exc:
            self._set_aside(stem, self._snapshots.set_aside(stem, exc))
            return
        self._signatures[stem] = signature
        self._stored[session_id] = stored_summary(record)

    async def _restore(self, session_id: str) -> None:
        signature = self._snapshots.signature(file_stem(session_id))  # before the read: at worst a reload later
        try:
            snapshot = await asyncio.to_thread(self._snapshots.load, session_id)
        except FileNotFoundError:  # deleted meanwhile
            self._stored.pop(session_id, None)
            return
        except SnapshotCorruptError as exc:
            stem = file_stem(session_id)
            error = await asyncio.to_thread(self._snapshots.set_aside, stem, exc)
            self._set_aside(stem, error)
            self._stored.pop(session_id, None)
            raise error from exc
        finally:
            self._loading.pop(session_id, None)
        if session_id in self._stored and session_id not in self._resident:
            self._evict(room=1)
            self._resident[session_id] = Session.from_snapshot(snapshot)
            self._signatures[file_stem(session_id)] = signature
            if self._metrics is not None:
                self._metrics.sessions_restored.inc()

    def add(self, session: Session) -> None:
        """A new session (its id must be unknown: check `exists` first)."""
        self.expire()
        self._drop_unanswered()
        owners = [s["owner"] for s in self._stored.values()]  # of every known session, in memory or on disk
        owners += [s.owner for sid, s in self._resident.items() if sid not in self._stored]
        if len(owners) >= self._max_sessions:
            raise SessionLimitError(f"{self._max_sessions} sessions exist; delete one or retry later")
        if self._max_per_owner is not None and session.owner is not None:
            if owners.count(session.owner) >= self._max_per_owner:
                raise SessionLimitError(
                    f"this API key has {self._max_per_owner} sessions (H2O_MAX_SESSIONS_PER_KEY);"
                    " delete one or retry after they expire"
                )
        self._evict(room=1)
        self._resident[session.id] = session

    def pop(self, session_id: str) -> Session | None:
        """Forget a session, in memory and on disk (a damaged snapshot included), without waiting for the disk."""
        return self._pop(session_id)[0]

    async def delete(self, session_id: str) -> Session | None:
        """`pop`, then wait until its files are gone. SnapshotDeleteError if they could not be removed: the session
        is then indexed again from what is on disk (it would be back after a restart, so it is not gone)."""
        session, removed = self._pop(session_id)
        if removed is not None:
            try:
                await asyncio.wrap_future(removed)
            except OSError as exc:
                self.refresh(session_id)
                if self._metrics is not None:
                    self._metrics.snapshot_errors.labels("write").inc()
                raise SnapshotDeleteError(
                    f"the snapshot of session {session_id!r} could not be removed ({exc}); the session still exists"
                ) from exc
        return session

    def _pop(self, session_id: str) -> tuple[Session | None, Future | None]:
        session = self._resident.pop(session_id, None)
        if session is not None:
            session.deleted = True
        stem = file_stem(session_id)
        self._signatures.pop(stem, None)
        on_disk = self._stored.pop(session_id, None) is not None or self._corrupt.pop(stem, None) is not None
        removed = None
        if self._writer is not None and (on_disk or session is not None):
            with self._disk_lock:
                removed = self._writer.delete(session_id)
        return session, removed

    def persist(self, session: Session, then: Callable[[Exception | None], None]) -> None:
        """Worker thread, at the end of a turn: snapshot the session now and write it on the writer thread; the
        store learns about it on the event loop, then `then(error)` runs (it ends the turn, so a client sees a
        turn's end only once the turn is on disk, and an error when it could not be written)."""
        if self._writer is None or session.ephemeral:
            then(None)
            return
        record, tensor_bytes, transcript = session.to_record()
        started = time.perf_counter()

        def done(error: Exception | None) -> None:
            if self._metrics is not None:
                self._metrics.snapshot_write_seconds.observe(time.perf_counter() - started)
            signature = self._snapshots.signature(file_stem(session.id)) if error is None else None
            self._loop.call_soon_threadsafe(self._saved, session, record, signature, error)
            then(error)

        with self._disk_lock:
            if session.deleted:
                then(None)
            else:
                self._writer.save(record, tensor_bytes, transcript, done)

    async def messages(self, session: Session) -> list[Message]:
        """The whole conversation: the transcript file (read off the event loop) and what is not in it yet."""
        unsaved = session.unsaved
        if self._snapshots is None or not session.transcript.messages:
            return list(unsaved)
        saved = await asyncio.to_thread(self._snapshots.read_transcript, session.id, session.transcript)
        return saved + unsaved

    def _saved(
        self, session: Session, record: SessionRecord, signature: Signature | None, error: Exception | None
    ) -> None:
        if error is not None:  # the turn is not acknowledged, so it is not kept: the next use reads what is on disk
            session.persisted = False
            self.write_error = f"{type(error).__name__}: {error}"
            if self._resident.get(session.id) is session:
                del self._resident[session.id]
            if self._metrics is not None:
                self._metrics.snapshot_errors.labels("write").inc()
            return
        self.write_error = None
        session.persisted = True
        session.saved(record)
        if not session.deleted:
            self._stored[session.id] = stored_summary(record)
            self._signatures[file_stem(session.id)] = signature
        self._evict()

    def __iter__(self) -> Iterator[Session]:
        """Resident sessions."""
        return iter(list(self._resident.values()))

    def __len__(self) -> int:
        return len(self._resident)

    def summaries(self) -> list[dict[str, Any]]:
        """Every session, resident or on disk (damaged snapshots excluded)."""
        self._drop_unanswered()
        resident = [s.summary() for s in self._resident.values()]
        return resident + [summary for sid, summary in self._stored.items() if sid not in self._resident]

    @property
    def stored_count(self) -> int:
        return len(self._stored)

    def expire(self) -> None:
        """Delete idle sessions older than the TTL, in memory and on disk (as the disk has them: another replica
        may have carried a session on since this one last saw it)."""
        if not self._ttl_s:
            return
        horizon = time.time() - self._ttl_s

        def idle_ids() -> list[str]:
            ids = [s.id for s in self._resident.values() if s.active is None and s.updated_at < horizon]
            return ids + [
                sid
                for sid, summary in self._stored.items()
                if sid not in self._resident and summary["updated_at"] < horizon
            ]

        for session_id in idle_ids():
            self.refresh(session_id)
        expired = idle_ids()
        for session_id in expired:
            self.pop(session_id)
        if expired and self._metrics is not None:
            self._metrics.sessions_expired.inc(len(expired))

    def _evict(self, room: int = 0) -> None:
        """Drop least recently used idle sessions until `room` more fit within `max_resident` (they are on disk
        already). An unanswered session (no turn yet) has nothing worth keeping and is dropped too."""
        excess = len(self._resident) + room - self._max_resident
        if excess <= 0 or self._snapshots is None:
            return
        for session in list(self._resident.values()):
            if excess <= 0:
                break
            if session.active is None and (session.persisted or session.turns == 0):
                del self._resident[session.id]
                excess -= 1
                if self._metrics is not None:
                    self._metrics.sessions_evicted.inc()

    def _drop_unanswered(self) -> None:
        """Forget sessions whose first turn ended before anything was fed (queued, then abandoned or failed): they
        hold nothing, and must not count against H2O_MAX_SESSIONS or a key's quota."""
        for session_id, session in list(self._resident.items()):
            if session.turns == 0 and session.active is None and session_id not in self._stored:
                del self._resident[session_id]
                session.deleted = True

    def _set_aside(self, stem: str, error: SnapshotCorruptError) -> None:
        """A snapshot found damaged in use was just quarantined (app.snapshots.SnapshotStore.set_aside): remember
        the damage and its owner, and that what is on disk now is what this store has seen."""
        self._damaged(stem, error, self._snapshots.owner(stem))
        self._signatures[stem] = self._snapshots.signature(stem)

    def _damaged(self, stem: str, error: SnapshotCorruptError, marker: str | None) -> None:
        logger.error("session snapshot %s is damaged and will not be loaded: %s", stem, error)
        self._corrupt[stem] = (error, _owner(marker))
        if self._metrics is not None:
            self._metrics.snapshot_errors.labels("corrupt").inc()


UNKNOWN_OWNER = "unknown"
"""The owner of a damaged snapshot without an owner marker: no API key hashes to it."""


def _owner(marker: str | None) -> str | None:
    """A session's owner from its owner marker's name."""
    if marker is None:
        return UNKNOWN_OWNER
    return None if marker == ANYONE else marker

"""Conversations: each holds its chat history, its bounded KV cache and what the two have in common."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.chat import Message
from h2o_cache import CachePolicy

if TYPE_CHECKING:
    from app.engine import Generation


@dataclass
class Session:
    """One conversation. The event loop creates, lists and deletes sessions; while `active` is set, only the
    engine's worker thread changes the rest.

    Invariant between turns: the cache has processed exactly `fed_text` minus the text of `pending_ids`
    (tokens already chosen but not fed yet: the last sampled token, or what a cancelled prefill left), and
    `messages` renders to a text that starts with `fed_text` (see app.chat.turn_delta).
    """

    id: str
    policy: CachePolicy
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    fed_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    cache: Any = None
    """The transformers Cache from h2o_cache.make_cache, built by the worker on the first forward."""
    turns: int = 0
    cache_tokens: int = 0
    cache_tokens_seen: int = 0
    cache_bytes: int = 0
    evicted_tokens: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    active: Generation | None = None

    def reset_cache(self) -> None:
        """Forget the cache; the next turn re-prefills the whole history once (used after a failed forward)."""
        self.cache = None
        self.fed_text = ""
        self.pending_ids = []
        self.cache_tokens = self.cache_bytes = 0


class SessionLimitError(Exception):
    """Raised when a new session would exceed `max_sessions`."""


class SessionStore:
    """Live sessions by id, bounded in number; idle ones expire after `ttl_s` (checked when one is created)."""

    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self._sessions: dict[str, Session] = {}
        self._max_sessions = max_sessions
        self._ttl_s = ttl_s

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def add(self, session: Session) -> None:
        self._expire()
        if len(self._sessions) >= self._max_sessions:
            raise SessionLimitError(f"{self._max_sessions} sessions are live; delete one or retry later")
        self._sessions[session.id] = session

    def pop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        if not self._ttl_s:
            return
        horizon = time.time() - self._ttl_s
        for session in list(self._sessions.values()):
            if session.active is None and session.updated_at < horizon:
                del self._sessions[session.id]

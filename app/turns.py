"""The turn service: validate a turn against the limits, find or create its session once (a stored one loaded,
a stateless OpenAI conversation matched), check ownership and submit it to the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from app.chat import Message
from app.conversations import conversation_key
from app.engine import EngineNotReadyError, QueueFullError, SessionBusyError
from app.errors import ApiError, invalid_policy, not_found, retry_later
from app.generation import Generation
from app.protocol import (
    SamplingFields,
)
from app.sampling import SamplingParams
from app.sessions import Session, SessionLimitError
from app.snapshots import SnapshotCorruptError
from app.state import ServerState
from h2o_cache import CachePolicy

CANCEL_GRACE_S = 5.0
"""How long a new turn waits for a cancelled one (e.g. its client disconnected) to wind down before 409."""


def continued_conversation(
    state: ServerState, owner: str | None, messages: list[Message], system: str | None
) -> tuple[str, list[Message], str | None]:
    """(session id, the turn's messages, system prompt) of a stateless request: the stored session whose
    conversation the request's history is and its new message, else a new session and every message."""
    history = messages[:-1]
    started = any(m["role"] != "system" for m in history)
    found = state.sessions.find_conversation(conversation_key(owner, history)) if started else None
    outcome = "hit" if found else "rebuild" if started else "miss"
    state.metrics.conversation_reuse.labels(outcome).inc()
    if found:
        return found, messages[-1:], None
    return f"chat-{uuid.uuid4().hex}", messages, system


async def start_turn(
    state: ServerState,
    owner: str | None,
    session_id: str,
    turn: list[Message],
    system: str | None,
    policy: str | None,
    kv_dtype: str | None,
    sampling: SamplingFields,
    stop: list[str],
) -> Generation:
    """Validate a turn (`turn`: its messages, the new user message last) against the server's limits and the
    session, create the session on first use (or load it from its snapshot), and submit the turn. Any error
    leaves the store and the session as they were."""
    params = checked_turn(
        state,
        [*((f"{m['role']} message", m["content"]) for m in turn), ("system prompt", system or "")],
        sampling,
        stop,
    )
    session = await load_session(state, session_id, owner)
    if session is not None and session.active is not None and session.active.cancelled:
        with suppress(TimeoutError):
            await asyncio.wait_for(session.active.finished.wait(), CANCEL_GRACE_S)
        session = await load_session(state, session_id, owner)  # it may have left memory meanwhile
    # No await from here on: the checks and the submit happen atomically on the event loop.
    created = session is None
    if created:
        session = Session(id=session_id, policy=state.parse_policy(policy, kv_dtype), system=system, owner=owner)
    else:
        requested = None
        if policy is not None or kv_dtype is not None:  # what is left unsaid is the session's own
            requested = state.parse_policy(
                policy or session.policy.replace(kv_dtype="auto").name, kv_dtype, session.policy.kv_dtype
            )
        check_same(session, requested, system)
    check_key_quota(state, owner)
    try:
        with submit_errors(state):
            if created:
                state.sessions.add(session)
            if not session.message_count and session.system is not None and turn[0]["role"] != "system":
                turn = [{"role": "system", "content": session.system}, *turn]
            return state.engine.submit(session, turn, params)
    finally:
        if created and session.active is None:
            state.sessions.pop(session_id)


def checked_turn(
    state: ServerState, texts: list[tuple[str, str]], sampling: SamplingFields, stop: list[str]
) -> SamplingParams:
    """A turn's sampling parameters, once its texts (name, text) and settings are within the server's limits."""
    settings = state.settings
    if state.draining:
        raise retry_later(state.settings, 503, "the server is shutting down", "shutting_down")
    for name, text in texts:
        if len(text) > settings.max_message_chars:
            raise ApiError(
                413,
                f"{name} has {len(text)} characters; the limit is {settings.max_message_chars}",
                "message_too_large",
                "invalid",
            )
    max_new = sampling.max_new_tokens or settings.default_max_new_tokens
    if max_new > settings.max_new_tokens:
        raise ApiError(
            422,
            f"max_new_tokens={max_new} exceeds the server limit {settings.max_new_tokens}",
            "invalid_request",
            "invalid",
        )
    if sampling.min_new_tokens > max_new:
        raise ApiError(
            422,
            f"min_new_tokens={sampling.min_new_tokens} exceeds max_new_tokens={max_new}",
            "invalid_request",
            "invalid",
        )
    if any(not s for s in stop):
        raise ApiError(422, "stop strings must not be empty", "invalid_request", "invalid")
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=sampling.min_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop=tuple(stop),
        top_logprobs=sampling.top_logprobs if sampling.logprobs else None,
    )


def check_key_quota(state: ServerState, owner: str | None) -> None:
    settings = state.settings
    if settings.api_keys:
        running = sum(1 for g in state.engine.in_flight() if g.session.owner == owner)
        if running >= settings.max_requests_per_key:
            raise retry_later(
                settings,
                429,
                f"this API key has {running} generations in flight; the limit is {settings.max_requests_per_key}",
                "too_many_requests",
            )


@contextmanager
def submit_errors(state: ServerState) -> Iterator[None]:
    """The engine's and the store's refusals as API errors."""
    try:
        yield
    except SessionLimitError as exc:
        raise retry_later(state.settings, 429, str(exc), "too_many_sessions") from exc
    except QueueFullError as exc:
        raise retry_later(state.settings, 429, str(exc), "queue_full") from exc
    except SessionBusyError as exc:
        raise ApiError(409, str(exc), "session_busy", "conflict") from exc
    except EngineNotReadyError as exc:
        raise retry_later(state.settings, 503, str(exc), "not_ready") from exc


def check_same(session: Session, policy: CachePolicy | None, system: str | None) -> None:
    """A session's policy and system prompt are fixed when it is created."""
    if policy is not None and policy != session.policy:
        raise invalid_policy(
            f"session {session.id!r} uses policy {session.policy.name} (kv_dtype "
            f"{session.policy.kv_dtype}); a policy and its kv_dtype can only be chosen when a "
            "session is created"
        )
    if system is not None and system != session.system:
        raise ApiError(
            422,
            f"session {session.id!r} already has a different system prompt; it is set on the first turn only",
            "invalid_request",
            "invalid",
        )


async def load_session(state: ServerState, session_id: str, owner: str | None) -> Session | None:
    """The session, resident when this returns (read back from its snapshot if needed), if it exists and belongs to
    `owner`; None when it does not exist, 404 when it is another key's, 500 when its snapshot is damaged. One look
    at the store: the caller may use the session without another await in between."""
    known, session_owner = state.sessions.lookup(session_id)
    if known and not owns(state, owner, session_owner):
        raise not_found(session_id)
    try:
        session = await state.sessions.load(session_id, refresh=False)
    except SnapshotCorruptError as exc:
        raise ApiError(
            500,
            f"the snapshot of session {session_id!r} is damaged and was not loaded ({exc}); "
            "DELETE the session to start it over",
            "snapshot_corrupt",
        ) from exc
    if session is not None and not owns(state, owner, session.owner):  # replaced by another key's while loading
        raise not_found(session_id)
    return session


async def existing_session(state: ServerState, session_id: str, owner: str | None) -> Session:
    session = await load_session(state, session_id, owner)
    if session is None:
        raise not_found(session_id)
    return session


def check_owner(state: ServerState, session_id: str, owner: str | None) -> None:
    """404 unless the session exists (damaged or not) and is `owner`'s."""
    known, session_owner = state.sessions.lookup(session_id)
    if not known or not owns(state, owner, session_owner):
        raise not_found(session_id)


def owns(state: ServerState, caller: str | None, owner: str | None) -> bool:
    """Without API keys every session is everyone's; with them, a session is its creator's key's only."""
    return not state.settings.api_keys or caller == owner


def start_completion(
    state: ServerState,
    owner: str | None,
    prompt: str,
    policy: str | None,
    kv_dtype: str | None,
    sampling: SamplingFields,
    stop: list[str],
    top_logprobs: int | None,
) -> Generation:
    """A legacy completion: `prompt` fed as it is to an ephemeral session (never stored or listed)."""
    params = dataclasses.replace(checked_turn(state, [("prompt", prompt)], sampling, stop), top_logprobs=top_logprobs)
    check_key_quota(state, owner)
    session = Session(
        id=f"cmpl-{uuid.uuid4().hex}", policy=state.parse_policy(policy, kv_dtype), owner=owner, ephemeral=True
    )
    with submit_errors(state):
        return state.engine.submit(session, [{"role": "user", "content": prompt}], params, raw_prompt=prompt)

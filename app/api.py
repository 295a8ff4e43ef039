"""HTTP routes: they translate between HTTP (JSON, SSE, OpenAI's format) and the engine, nothing more."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.chat import Message
from app.conversations import conversation_key
from app.engine import (
    Engine,
    EngineNotReadyError,
    Generation,
    GenerationError,
    QueueFullError,
    SessionBusyError,
)
from app.metrics import Metrics
from app.protocol import (
    MAX_API_KEY_CHARS,
    MAX_CLIENT_ID_CHARS,
    MAX_KV_DTYPE_CHARS,
    MAX_POLICY_CHARS,
    SESSION_ID_PATTERN,
    SESSION_ID_RULE,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    Logprob,
    OpenAIRequest,
    SamplingFields,
    SessionDetail,
    SessionInfo,
    SessionList,
    TokenEvent,
    TurnResult,
    Usage,
    valid_session_id,
)
from app.sampling import SamplingParams
from app.sessions import Session, SessionLimitError, SessionStore, SnapshotDeleteError
from app.settings import Settings
from app.snapshots import SnapshotCorruptError
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes

STATIC_DIR = Path(__file__).parent / "static"
CANCEL_GRACE_S = 5.0
"""How long a new turn waits for a cancelled one (e.g. its client disconnected) to wind down before 409."""
DISCONNECT_POLL_S = 0.05
"""How often a non-streaming request checks that its client is still there (about one decode step)."""


def _check_session_id(session_id: str) -> str:
    """After the path pattern (which OpenAPI shows): the rest of the rule, `.` and `..`."""
    if not valid_session_id(session_id):
        raise ValueError(f"{session_id!r} is not a session id ({SESSION_ID_RULE})")
    return session_id


SessionId = Annotated[
    str, PathParam(pattern=SESSION_ID_PATTERN, description=SESSION_ID_RULE), AfterValidator(_check_session_id)
]


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "code"}}`; `outcome` labels h2o_requests_total."""

    def __init__(
        self, status: int, message: str, type_: str, outcome: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.outcome, self.headers = status, message, type_, outcome, headers


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    sessions: SessionStore
    metrics: Metrics
    draining: bool = False
    """Set on SIGTERM: new turns get 503 while the running ones finish."""
    loop: asyncio.AbstractEventLoop | None = None
    started_at: float = field(default_factory=time.time)

    def begin_drain(self) -> None:
        """Refuse new turns now; cancel those still running after `shutdown_grace_s` (thread- and signal-safe)."""

        def drain() -> None:
            self.draining = True
            self.loop.call_later(self.settings.shutdown_grace_s, self.engine.cancel_all)

        if self.loop is not None:
            self.loop.call_soon_threadsafe(drain)

    def parse_policy(
        self, name: str | None, kv_dtype: str | None = None, default_kv_dtype: str | None = None
    ) -> CachePolicy:
        """The requested (or default) policy, within the server's limits; ApiError 422 otherwise. Its KV storage is
        `kv_dtype`, else the name's `_<kv_dtype>` suffix, else `default_kv_dtype` (default: H2O_KV_DTYPE)."""
        s = self.settings
        options = {} if kv_dtype is None else {"kv_dtype": kv_dtype}
        try:
            policy = CachePolicy.parse(
                name or s.policy, slack=s.policy_slack, default_kv_dtype=default_kv_dtype or s.kv_dtype, **options
            )
        except ValueError as exc:
            raise _invalid_policy(str(exc)) from exc
        if policy.kv_dtype not in s.allowed_kv_dtypes:
            raise _invalid_policy(
                f"kv_dtype {policy.kv_dtype!r} is not allowed on this server; allowed: "
                f"{', '.join(s.allowed_kv_dtypes)} (H2O_ALLOWED_KV_DTYPES)"
            )
        if policy.max_tokens is None and not s.allow_full_policy:
            raise _invalid_policy("the unbounded 'full' policy is disabled on this server (H2O_ALLOW_FULL_POLICY)")
        if policy.max_tokens is not None and policy.max_tokens > s.max_policy_tokens:
            raise _invalid_policy(
                f"policy {policy.name} holds up to {policy.max_tokens} tokens; this server allows "
                f"{s.max_policy_tokens} (H2O_MAX_POLICY_TOKENS)"
            )
        self._check_bytes(policy)
        return policy

    def _check_bytes(self, policy: CachePolicy) -> None:
        """H2O_MAX_SESSION_BYTES against the bytes a full session of `policy` holds on the loaded model (before the
        model is loaded there is nothing to size: the turn gets 503 anyway)."""
        limit, model = self.settings.max_session_bytes, self.engine.model
        if limit is None or not self.engine.ready:
            return
        if policy.max_tokens is None:
            raise _invalid_policy(
                f"policy {policy.name} is unbounded; this server allows a session {limit:,} bytes "
                "of KV cache (H2O_MAX_SESSION_BYTES)"
            )
        nbytes = session_nbytes(model.config, policy, model.dtype)
        if nbytes > limit:
            raise _invalid_policy(
                f"policy {policy.name} holds up to {nbytes:,} bytes of KV cache on this model; this "
                f"server allows {limit:,} (H2O_MAX_SESSION_BYTES)"
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


def require_api_key(
    state: State,
    authorization: Annotated[str | None, Header(max_length=MAX_API_KEY_CHARS + 7)] = None,
    x_api_key: Annotated[str | None, Header(max_length=MAX_API_KEY_CHARS)] = None,
    x_h2o_client: Annotated[str | None, Header(max_length=MAX_CLIENT_ID_CHARS)] = None,
) -> str | None:
    """When API keys are configured, accept `Authorization: Bearer <key>` (what OpenAI clients send) or
    `X-API-Key: <key>`, and return the caller's identity: a hash of the key. Without keys the identity is a hash
    of `X-H2O-Client` (a random id a browser keeps; None without one): it only decides whose sessions a listing
    shows, as a server without keys trusts every caller."""
    keys = state.settings.api_keys
    if not keys:
        return key_id(f"client:{x_h2o_client}") if x_h2o_client else None
    supplied = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
    if not supplied or not any(secrets.compare_digest(supplied.encode(), key.encode()) for key in keys):
        raise ApiError(401, "missing or wrong API key", "unauthorized", headers={"WWW-Authenticate": "Bearer"})
    return key_id(supplied)


def key_id(key: str) -> str:
    """What sessions record as their owner: the key's hash, so snapshots never hold a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


Owner = Annotated[str | None, Depends(require_api_key)]
"""The caller's key hash (sessions of other keys do not exist for it: 404), or without keys its client id's."""

public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)])


@public.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/ready")
def ready(state: State) -> JSONResponse:
    """200 once the model is loaded; 503 while it loads (or if loading failed), and while snapshots cannot be
    written (turns would not be acknowledged)."""
    if state.engine.ready and state.sessions.write_error is None:
        return JSONResponse({"status": "ready", "model": state.settings.model})
    if state.engine.ready:
        body = {"status": "storage_failing", "detail": f"the last snapshot write failed: {state.sessions.write_error}"}
        return JSONResponse(body, 503, headers={"Retry-After": str(state.settings.retry_after_s)})
    body = {"status": "failed" if state.engine.load_error else "loading", "detail": state.engine.load_error}
    return JSONResponse(body, 503, headers={"Retry-After": str(state.settings.retry_after_s)})


@public.get("/metrics")
async def metrics(state: State) -> Response:
    """On the event loop: the session gauges are read from the session store at scrape time."""
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@protected.get("/v1/models")
def list_models(state: State) -> dict:
    """OpenAI's model list: the one model this server holds (front-ends call it on connect)."""
    return {"object": "list", "data": [_model_card(state)]}


@protected.get("/v1/models/{model_id:path}")
def get_model(model_id: str, state: State) -> dict:
    card = _model_card(state)
    if model_id != card["id"]:
        raise ApiError(404, f"no model {model_id!r}; this server holds {card['id']!r}", "model_not_found")
    return card


def _model_card(state: ServerState) -> dict:
    return {"id": state.settings.model, "object": "model", "created": int(state.started_at), "owned_by": "h2o-serve"}


@public.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@protected.get("/sessions")
async def list_sessions(state: State, owner: Owner) -> SessionList:
    """The caller's sessions, in memory or on disk (on the event loop, as every use of the session store): its key's,
    or without keys those made with its `X-H2O-Client` id (or with none, when it sends none)."""
    summaries = state.sessions.summaries()
    return SessionList(sessions=[_info(s) for s in summaries if s["owner"] == owner])


@protected.get("/sessions/{session_id}")
async def get_session(session_id: SessionId, state: State, owner: Owner) -> SessionDetail:
    session = await _existing(state, session_id, owner)
    try:
        messages = await state.sessions.messages(session)
    except SnapshotCorruptError as exc:
        raise ApiError(500, f"the transcript of session {session_id!r} is damaged ({exc})", "snapshot_corrupt") from exc
    return SessionDetail(**_info(session.summary()).model_dump(), messages=messages)


@protected.delete("/sessions/{session_id}", status_code=204)
async def delete_session(session_id: SessionId, state: State, owner: Owner) -> Response:
    """Deleting a generating session cancels its generation; its snapshot goes too (a damaged one included), and
    204 means the files are gone (500 `storage_error` if they could not be removed: the session still exists).
    On the event loop, as every other use of the session store."""
    if not state.sessions.exists(session_id) or not _owns(state, owner, _owner_of(state, session_id)):
        raise _not_found(session_id)
    try:
        session = await state.sessions.delete(session_id)
    except SnapshotDeleteError as exc:
        raise ApiError(500, str(exc), "storage_error") from exc
    if session is not None and session.active is not None:
        session.active.cancel()
    return Response(status_code=204)


@protected.post("/sessions/{session_id}/generate", response_model=None)
async def generate(
    session_id: SessionId, body: GenerateRequest, request: Request, state: State, owner: Owner
) -> Response | TurnResult:
    generation = await _start_turn(
        state,
        owner,
        session_id,
        [{"role": "user", "content": body.message}],
        body.system,
        body.policy,
        body.kv_dtype,
        body,
        body.stop,
    )
    request.state.generation = generation  # the request log (app.request_log.RequestLog) reads the turn's outcome
    if not body.stream:
        result = await _collect(generation, request)
        body = result.model_dump(mode="json", exclude={"logprobs"})
        if result.logprobs is not None:
            body["logprobs"] = [e.model_dump(mode="json", exclude_none=True) for e in result.logprobs]
        return JSONResponse(body)
    return _event_stream(state, _native_events(generation))


@protected.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    state: State,
    owner: Owner,
    x_session_id: Annotated[str | None, Header(max_length=128)] = None,
    x_h2o_policy: Annotated[str | None, Header(max_length=MAX_POLICY_CHARS)] = None,
    x_h2o_kv_dtype: Annotated[str | None, Header(max_length=MAX_KV_DTYPE_CHARS)] = None,
) -> Response | dict:
    """OpenAI's chat API. Without `X-Session-Id` the sent conversation is the truth: a request whose history (all
    but its last message) is a stored conversation of the same key continues that session, feeding only the new
    turn; any other (a new chat, a regenerate, an edit) is prefilled into a new session (see app.conversations).
    With `X-Session-Id` the server keeps the history: only the last message is new, and a leading system message
    counts on the first turn only. A new session's policy and KV storage come from `X-H2O-Policy` and
    `X-H2O-KV-Dtype`. The response's `X-Session-Id` header names the session the turn ran in."""
    if body.messages[-1].role != "user" or not body.messages[-1].content:
        raise ApiError(422, "the last message must be the user's new message, not empty", "invalid_request", "invalid")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    if x_session_id is not None:
        if not valid_session_id(x_session_id):
            raise ApiError(422, f"invalid X-Session-Id ({SESSION_ID_RULE})", "invalid_session_id", "invalid")
        session_id, turn = x_session_id, messages[-1:]
    else:
        session_id, turn, system = _continued_conversation(state, owner, messages, system)
    sampling = body.model_copy(update={"max_new_tokens": body.max_completion_tokens or body.max_tokens})
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    generation = await _start_turn(state, owner, session_id, turn, system, x_h2o_policy, x_h2o_kv_dtype, sampling, stop)
    request.state.generation = generation
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    session_header = {"X-Session-Id": session_id}
    if body.stream:
        envelope = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
        return _event_stream(
            state, _openai_chunks(generation, envelope, _include_usage(body), _chat_choice, ""), headers=session_header
        )
    result = await _collect(generation, request)
    return JSONResponse(
        headers=session_header,
        content={
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": _openai_finish(result.finish_reason),
                    "logprobs": _openai_logprobs(result.logprobs),
                }
            ],
            "usage": _openai_usage(result.usage),
        },
    )


def _continued_conversation(
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


@protected.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    state: State,
    owner: Owner,
    x_h2o_policy: Annotated[str | None, Header(max_length=MAX_POLICY_CHARS)] = None,
    x_h2o_kv_dtype: Annotated[str | None, Header(max_length=MAX_KV_DTYPE_CHARS)] = None,
) -> Response | dict:
    """OpenAI's legacy text completion: the prompt as it is (no chat template), on a cache of this request only,
    bounded by the policy as every session's; nothing is stored or listed."""
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    if not prompt:
        raise ApiError(422, "the prompt must not be empty", "invalid_request", "invalid")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    params = dataclasses.replace(
        _checked_turn(state, [("prompt", prompt)], body.model_copy(update={"max_new_tokens": body.max_tokens}), stop),
        top_logprobs=body.logprobs,
    )
    _check_key_quota(state, owner)
    session = Session(
        id=f"cmpl-{uuid.uuid4().hex}",
        policy=state.parse_policy(x_h2o_policy, x_h2o_kv_dtype),
        owner=owner,
        ephemeral=True,
    )
    with _submit_errors(state):
        generation = state.engine.submit(session, [{"role": "user", "content": prompt}], params, raw_prompt=prompt)
    request.state.generation = generation
    echo = prompt if body.echo else ""
    envelope = {"id": session.id, "object": "text_completion", "created": int(time.time()), "model": body.model}
    if body.stream:
        return _event_stream(
            state, _openai_chunks(generation, envelope, _include_usage(body), _text_choice, echo or None)
        )
    result = await _collect(generation, request)
    choice = _text_choice(echo + result.text, result.logprobs or [], _openai_finish(result.finish_reason), True)
    return {**envelope, "choices": [choice], "usage": _openai_usage(result.usage)}


def _include_usage(body: OpenAIRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _legacy_logprobs(events: list[TokenEvent]) -> dict | None:
    """The legacy completion's `logprobs`: None unless the request asked."""
    if not events or events[0].logprob is None:
        return None
    offsets = list(itertools.accumulate((len(e.text) for e in events[:-1]), initial=0))
    return {
        "tokens": [e.logprob.token for e in events],
        "token_logprobs": [e.logprob.logprob for e in events],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs or []} for e in events],
        "text_offset": offsets,
    }


def _openai_logprobs(events: list[TokenEvent] | None) -> dict | None:
    """OpenAI's `logprobs` of a choice or chunk: None unless the request asked."""
    if not events or events[0].logprob is None:
        return None

    def entry(logprob: Logprob) -> dict:
        return {"token": logprob.token, "logprob": logprob.logprob, "bytes": list(logprob.token.encode())}

    return {"content": [{**entry(e.logprob), "top_logprobs": [entry(t) for t in e.top_logprobs or []]} for e in events]}


def _openai_usage(usage: Usage) -> dict:
    """OpenAI counts the whole conversation as the prompt; what the session's cache held already is cached."""
    prompt = usage.cached_tokens + usage.prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": prompt + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def _start_turn(
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
    params = _checked_turn(
        state,
        [*((f"{m['role']} message", m["content"]) for m in turn), ("system prompt", system or "")],
        sampling,
        stop,
    )
    existing = await _load(state, session_id, owner)
    if existing is not None and existing.active is not None and existing.active.cancelled:
        with suppress(TimeoutError):
            await asyncio.wait_for(existing.active.finished.wait(), CANCEL_GRACE_S)
    while state.sessions.get(session_id) is None and state.sessions.exists(session_id):
        await _load(state, session_id, owner)  # it left memory while this request waited
    # No await from here on: the lookup, the checks and the submit happen atomically on the event loop.
    session = state.sessions.get(session_id)
    created = session is None
    if created:
        session = Session(id=session_id, policy=state.parse_policy(policy, kv_dtype), system=system, owner=owner)
    else:
        if not _owns(state, owner, session.owner):
            raise _not_found(session_id)
        requested = None
        if policy is not None or kv_dtype is not None:  # what is left unsaid is the session's own
            requested = state.parse_policy(
                policy or session.policy.replace(kv_dtype="auto").name, kv_dtype, session.policy.kv_dtype
            )
        _check_same(session, requested, system)
    _check_key_quota(state, owner)
    try:
        with _submit_errors(state):
            if created:
                state.sessions.add(session)
            if not session.message_count and session.system is not None and turn[0]["role"] != "system":
                turn = [{"role": "system", "content": session.system}, *turn]
            return state.engine.submit(session, turn, params)
    finally:
        if created and session.active is None:
            state.sessions.pop(session_id)


def _checked_turn(
    state: ServerState, texts: list[tuple[str, str]], sampling: SamplingFields, stop: list[str]
) -> SamplingParams:
    """A turn's sampling parameters, once its texts (name, text) and settings are within the server's limits."""
    settings = state.settings
    if state.draining:
        raise _retry_later(state, 503, "the server is shutting down", "shutting_down")
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


def _check_key_quota(state: ServerState, owner: str | None) -> None:
    settings = state.settings
    if settings.api_keys:
        running = sum(1 for g in state.engine.in_flight() if g.session.owner == owner)
        if running >= settings.max_requests_per_key:
            raise _retry_later(
                state,
                429,
                f"this API key has {running} generations in flight; the limit is {settings.max_requests_per_key}",
                "too_many_requests",
            )


@contextmanager
def _submit_errors(state: ServerState) -> Iterator[None]:
    """The engine's and the store's refusals as API errors."""
    try:
        yield
    except SessionLimitError as exc:
        raise _retry_later(state, 429, str(exc), "too_many_sessions") from exc
    except QueueFullError as exc:
        raise _retry_later(state, 429, str(exc), "queue_full") from exc
    except SessionBusyError as exc:
        raise ApiError(409, str(exc), "session_busy", "conflict") from exc
    except EngineNotReadyError as exc:
        raise _retry_later(state, 503, str(exc), "not_ready") from exc


def _check_same(session: Session, policy: CachePolicy | None, system: str | None) -> None:
    """A session's policy and system prompt are fixed when it is created."""
    if policy is not None and policy != session.policy:
        raise _invalid_policy(
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


def _invalid_policy(message: str) -> ApiError:
    return ApiError(422, message, "invalid_policy", "invalid")


def _retry_later(state: ServerState, status: int, message: str, type_: str) -> ApiError:
    return ApiError(status, message, type_, "rejected", headers={"Retry-After": str(state.settings.retry_after_s)})


async def _collect(generation: Generation, request: Request) -> TurnResult:
    """Run a turn to its end for a non-streaming response; a client that disconnects meanwhile cancels it (the
    server learns of it only by polling: no response is being written that could fail)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(generation, request))
    tokens = []
    try:
        async for event in generation:  # token events, then the TurnResult
            tokens.append(event)
    except GenerationError as exc:
        raise ApiError(exc.status, str(exc), exc.type) from exc
    finally:
        watcher.cancel()
        generation.cancel()  # no-op once finished; stops the worker if this handler was cancelled
    result = tokens.pop()
    if generation.params.top_logprobs is not None:
        result.logprobs = tokens
    return result


async def _cancel_on_disconnect(generation: Generation, request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    generation.cancel()


def _event_stream(
    state: ServerState, events: AsyncIterator[ServerSentEvent], headers: dict[str, str] | None = None
) -> EventSourceResponse:
    """An SSE response. On shutdown sse-starlette would cut streams at once; the grace lets the engine end them
    (cancelled after H2O_SHUTDOWN_GRACE_S) so clients get their `done` event."""
    return EventSourceResponse(
        events,
        ping=state.settings.sse_ping_s,
        headers=headers,
        shutdown_grace_period=state.settings.shutdown_grace_s + 2,
    )


async def _native_events(generation: Generation) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in generation:
            if isinstance(event, TokenEvent):
                yield ServerSentEvent(event.model_dump_json(exclude_none=True), event="token")
            else:
                yield ServerSentEvent(event.model_dump_json(exclude={"text", "logprobs"}), event="done")
    except GenerationError as exc:
        yield ServerSentEvent(json.dumps(_error_body(str(exc), exc.type, exc.status)), event="error")
    finally:
        generation.cancel()  # no-op once finished; a disconnected client stops the generation here


ChoiceOf = Callable[[str, list[TokenEvent], "str | None", bool], dict]
"""(text, token events, finish reason, first) -> one streamed choice of a chat or a legacy completion."""


def _chat_choice(text: str, events: list[TokenEvent], finish_reason: str | None, first: bool) -> dict:
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text or events else {}
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": _openai_logprobs(events)}


def _text_choice(text: str, events: list[TokenEvent], finish_reason: str | None, first: bool) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": _legacy_logprobs(events)}


async def _openai_chunks(
    generation: Generation, envelope: dict, include_usage: bool, choice_of: ChoiceOf, opening: str | None
) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's chunks (`envelope`: id, object, created, model), the first with `opening` text if any; with
    `stream_options.include_usage` every chunk has `usage: null` and a last chunk without choices carries the
    usage."""

    def chunk(choices: list[dict], usage: dict | None = None) -> ServerSentEvent:
        body = {**envelope, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return ServerSentEvent(json.dumps(body))

    if opening is not None:
        yield chunk([choice_of(opening, [], None, True)])
    try:
        async for event in generation:
            if isinstance(event, TokenEvent):
                if event.text or event.logprob is not None:
                    yield chunk([choice_of(event.text, [event], None, False)])
            else:
                yield chunk([choice_of("", [], _openai_finish(event.finish_reason), False)])
                if include_usage:
                    yield chunk([], usage=_openai_usage(event.usage))
        yield ServerSentEvent("[DONE]")
    except GenerationError as exc:
        yield ServerSentEvent(json.dumps(_error_body(str(exc), exc.type, exc.status)))
    finally:
        generation.cancel()


def _openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _load(state: ServerState, session_id: str, owner: str | None) -> Session | None:
    """The session if it exists and belongs to `owner` (else None when it does not exist, 404 when it is
    another key's); loaded from its snapshot if needed (500 when the snapshot is damaged)."""
    if state.sessions.exists(session_id) and not _owns(state, owner, _owner_of(state, session_id)):
        raise _not_found(session_id)
    try:
        session = await state.sessions.load(session_id)
    except SnapshotCorruptError as exc:
        raise ApiError(
            500,
            f"the snapshot of session {session_id!r} is damaged and was not loaded ({exc}); "
            "DELETE the session to start it over",
            "snapshot_corrupt",
        ) from exc
    if session is not None and not _owns(state, owner, session.owner):
        raise _not_found(session_id)
    return session


async def _existing(state: ServerState, session_id: str, owner: str | None) -> Session:
    session = await _load(state, session_id, owner)
    if session is None:
        raise _not_found(session_id)
    return session


def _owner_of(state: ServerState, session_id: str) -> str | None:
    """The owner of a known session, from its summary, or from its owner marker when its snapshot is damaged."""
    if state.sessions.is_damaged(session_id):
        return state.sessions.damaged_owner(session_id)
    summary = state.sessions.summary(session_id)
    return summary["owner"] if summary is not None else None


def _owns(state: ServerState, caller: str | None, owner: str | None) -> bool:
    """Without API keys every session is everyone's; with them, a session is its creator's key's only."""
    return not state.settings.api_keys or caller == owner


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, f"no session {session_id!r}", "session_not_found")


def _info(summary: dict) -> SessionInfo:
    policy = summary["policy"]
    return SessionInfo(
        id=summary["id"],
        policy=policy.name,
        kv_dtype=policy.kv_dtype,
        turns=summary["turns"],
        cache_tokens=summary["cache_tokens"],
        cache_tokens_seen=summary["cache_tokens_seen"],
        cache_budget=policy.max_tokens,
        evicted_tokens=summary["evicted_tokens"],
        cache_bytes=summary["cache_bytes"],
        busy=summary["busy"],
        created_at=summary["created_at"],
        updated_at=summary["updated_at"],
    )


def _error_body(message: str, type_: str, code: int) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}

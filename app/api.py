"""HTTP routes: they translate between HTTP (JSON, SSE, OpenAI's format) and the turn service (app.turns),
nothing more."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator

from app.errors import ApiError
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
    SessionDetail,
    SessionList,
    TurnResult,
    valid_session_id,
)
from app.responses import (
    chat_choice,
    collect,
    event_stream,
    include_usage,
    native_events,
    openai_chunks,
    openai_finish,
    openai_logprobs,
    openai_usage,
    session_info,
    text_choice,
)
from app.sessions import SnapshotDeleteError
from app.snapshots import SnapshotCorruptError
from app.state import ServerState
from app.turns import (
    check_owner,
    continued_conversation,
    existing_session,
    start_completion,
    start_turn,
)

STATIC_DIR = Path(__file__).parent / "static"


def _check_session_id(session_id: str) -> str:
    """After the path pattern (which OpenAPI shows): the rest of the rule, `.` and `..`."""
    if not valid_session_id(session_id):
        raise ValueError(f"{session_id!r} is not a session id ({SESSION_ID_RULE})")
    return session_id


SessionId = Annotated[
    str, PathParam(pattern=SESSION_ID_PATTERN, description=SESSION_ID_RULE), AfterValidator(_check_session_id)
]


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
    return SessionList(sessions=[session_info(s) for s in summaries if s["owner"] == owner])


@protected.get("/sessions/{session_id}")
async def get_session(session_id: SessionId, state: State, owner: Owner) -> SessionDetail:
    session = await existing_session(state, session_id, owner)
    try:
        messages = await state.sessions.messages(session)
    except SnapshotCorruptError as exc:
        raise ApiError(500, f"the transcript of session {session_id!r} is damaged ({exc})", "snapshot_corrupt") from exc
    return SessionDetail(**session_info(session.summary()).model_dump(), messages=messages)


@protected.delete("/sessions/{session_id}", status_code=204)
async def delete_session(session_id: SessionId, state: State, owner: Owner) -> Response:
    """Deleting a generating session cancels its generation; its snapshot goes too (a damaged one included), and
    204 means the files are gone (500 `storage_error` if they could not be removed: the session still exists).
    On the event loop, as every other use of the session store."""
    check_owner(state, session_id, owner)
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
    generation = await start_turn(
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
        result = await collect(generation, request)
        body = result.model_dump(mode="json", exclude={"logprobs"})
        if result.logprobs is not None:
            body["logprobs"] = [e.model_dump(mode="json", exclude_none=True) for e in result.logprobs]
        return JSONResponse(body)
    return event_stream(state, native_events(generation))


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
        session_id, turn, system = continued_conversation(state, owner, messages, system)
    sampling = body.model_copy(update={"max_new_tokens": body.max_completion_tokens or body.max_tokens})
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    generation = await start_turn(state, owner, session_id, turn, system, x_h2o_policy, x_h2o_kv_dtype, sampling, stop)
    request.state.generation = generation
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    session_header = {"X-Session-Id": session_id}
    if body.stream:
        envelope = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
        return event_stream(
            state, openai_chunks(generation, envelope, include_usage(body), chat_choice, ""), headers=session_header
        )
    result = await collect(generation, request)
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
                    "finish_reason": openai_finish(result.finish_reason),
                    "logprobs": openai_logprobs(result.logprobs),
                }
            ],
            "usage": openai_usage(result.usage),
        },
    )


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
    sampling = body.model_copy(update={"max_new_tokens": body.max_tokens})
    generation = start_completion(state, owner, prompt, x_h2o_policy, x_h2o_kv_dtype, sampling, stop, body.logprobs)
    request.state.generation = generation
    echo = prompt if body.echo else ""
    envelope = {
        "id": generation.session.id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    if body.stream:
        return event_stream(state, openai_chunks(generation, envelope, include_usage(body), text_choice, echo or None))
    result = await collect(generation, request)
    choice = text_choice(echo + result.text, result.logprobs or [], openai_finish(result.finish_reason), True)
    return {**envelope, "choices": [choice], "usage": openai_usage(result.usage)}

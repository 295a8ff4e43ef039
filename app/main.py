"""The FastAPI application: `create_app()` wires settings, engine, sessions and metrics; `app` is what
`uvicorn app.main:app` serves (the model loads in the background at startup, see /ready)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.api import ApiError, ServerState, protected, public
from app.engine import Engine, Generation, GenerationError
from app.metrics import Metrics, package_version
from app.protocol import TurnResult
from app.sessions import SessionStore
from app.settings import Settings
from app.snapshots import SnapshotStore
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes

GENERATION_PATHS = ("/generate", "/v1/chat/completions")
DRAIN_MARGIN_S = 5.0
"""On SIGTERM, how long past H2O_SHUTDOWN_GRACE_S the cancelled turns may take to be saved and answered."""


def create_app(
    settings: Settings | None = None, preloaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None
) -> FastAPI:
    """Build the server. `preloaded` (model, tokenizer) skips loading `settings.model` (tests use it)."""
    settings = settings or Settings()
    metrics = Metrics()
    snapshots = SnapshotStore(settings.snapshot_dir) if settings.snapshot_dir else None
    sessions = SessionStore(
        settings.max_sessions,
        settings.session_ttl_s,
        settings.max_resident_sessions,
        snapshots,
        metrics,
        settings.max_sessions_per_key,
    )
    metrics.track_sessions(lambda: sessions, lambda: sessions.stored_count)
    engine = Engine(settings, metrics, preloaded, persist=sessions.persist if snapshots else None)
    state = ServerState(settings, engine, sessions, metrics)
    default_policy = state.parse_policy(None)  # a bad default policy fails at startup, not on the first request
    metrics.track_kv_capacity(
        _kv_capacity(settings, engine, default_policy), lambda: sum(s.cache_bytes for s in sessions)
    )
    metrics.build_info.labels = lambda: {
        "version": package_version(),
        "model": settings.model,
        "policy": default_policy.replace(kv_dtype="auto").name,
        "kv_dtype": default_policy.kv_dtype,
        "device": _device(settings, engine),
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        await asyncio.to_thread(sessions.open, state.loop)
        engine.start()
        expiry = asyncio.create_task(_expire_periodically(sessions, settings.session_ttl_s))
        yield
        expiry.cancel()
        state.draining = True
        await engine.drain(settings.shutdown_grace_s)  # running turns end as cancelled and are saved
        engine.stop()
        await asyncio.to_thread(sessions.close)

    app = FastAPI(title="h2o-serve", lifespan=lifespan)
    app.state.server = state
    app.state.generations = GenerationsInFlight()
    app.include_router(public)
    app.include_router(protected)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ReplicaHeader, name=settings.replica_name)
    app.add_middleware(CountGenerations, counter=app.state.generations)
    app.add_middleware(RequestLog)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        if exc.outcome:
            metrics.requests.labels(exc.outcome).inc()
        if exc.outcome == "rejected":
            metrics.requests_rejected.labels(exc.type).inc()
        return _error(exc.status, exc.message, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.endswith(GENERATION_PATHS):
            metrics.requests.labels("invalid").inc()
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, details, "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "http_error", exc.headers)

    return app


def _kv_capacity(settings: Settings, engine: Engine, default_policy: CachePolicy):
    """h2o_kv_cache_capacity_bytes: resident session limit x per-session maximum (H2O_MAX_SESSION_BYTES, else a full
    session of the default policy on the loaded model); 0 while the model loads or when neither bounds a session."""
    resident = (
        settings.max_resident_sessions
        if settings.snapshot_dir and settings.max_resident_sessions
        else settings.max_sessions
    )
    known: list[int] = []

    def capacity() -> int:
        if known:
            return known[0]
        if settings.max_session_bytes is not None:
            known.append(resident * settings.max_session_bytes)
        elif engine.ready:
            bounded = default_policy.max_tokens is not None
            model = engine.model
            known.append(resident * session_nbytes(model.config, default_policy, model.dtype) if bounded else 0)
        return known[0] if known else 0

    return capacity


def _device(settings: Settings, engine: Engine) -> str:
    """The loaded model's device; before that, the configured one (empty: not chosen yet)."""
    if engine.ready:
        return str(engine.model.device)
    return settings.device or ""


def _error(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status, headers=headers)


async def drain(app: FastAPI) -> None:
    """The first phase of a graceful shutdown (`python -m app` on SIGTERM, see app.__main__): new turns get 503
    `shutting_down`, running ones may finish for H2O_SHUTDOWN_GRACE_S and are then cancelled (their partial turn is
    saved). Returns once every generation request has been answered (at most DRAIN_MARGIN_S after the grace
    period). Open connections keep being served meanwhile, so a request on an idle keep-alive connection gets the
    503 rather than a closed connection; only after this does the server close its connections."""
    state: ServerState = app.state.server
    state.begin_drain()
    await app.state.generations.wait_idle(state.settings.shutdown_grace_s + DRAIN_MARGIN_S)


async def _expire_periodically(sessions: SessionStore, ttl_s: float) -> None:
    """Delete expired sessions even when no new session arrives to trigger it."""
    if not ttl_s:
        return
    while True:
        await asyncio.sleep(min(max(ttl_s / 4, 0.25), 60.0))
        sessions.expire()


class GenerationsInFlight:
    """How many generation requests are being answered (a stream counts until its last event is sent)."""

    def __init__(self) -> None:
        self.count = 0

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until none is in flight (True) or `timeout_s` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.count


class CountGenerations:
    """Keeps a GenerationsInFlight up to date (a plain ASGI middleware, like ReplicaHeader)."""

    def __init__(self, app: ASGIApp, counter: GenerationsInFlight) -> None:
        self._app = app
        self._counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(GENERATION_PATHS):
            await self._app(scope, receive, send)
            return
        self._counter.count += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._counter.count -= 1


REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
"""A client's `X-Request-Id` is kept when it matches (no spaces, quotes or control characters; 128 characters at
most); otherwise the server makes one."""
PROBE_PATHS = ("/health", "/ready", "/metrics")
"""Logged at DEBUG (load balancers and Prometheus call them every few seconds)."""
ERROR_BODY_BYTES = 8192
request_log = logging.getLogger("app.requests")


def session_hash(session_id: str) -> str:
    """What logs show of a session id: a sha256 prefix (the id itself is a bearer's handle to the session), the
    start of its snapshot files' names (app.snapshots.file_stem)."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:16]


class RequestLog:
    """One log line per request on the `app.requests` logger, written when the response has been sent (for a stream:
    when it ends), and `X-Request-Id` on every response: the client's if it sent a sane one, else a new one.

    The line holds the request id, method, route template (never the path: it holds session ids), status, the
    session's hash, and for a turn (the Generation the route puts in `request.state.generation`) its tokens,
    finish reason, TTFT, TPOT; and the duration. A turn that failed (an `error` event ending a 200 stream, or a
    500) is logged at ERROR with its cause; 429 and 503 at WARNING; probes (/health, /ready, /metrics) at DEBUG.
    The fields are in the record's `h2o_fields` (app.__main__.JsonFormatter writes them as JSON keys)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if REQUEST_ID_PATTERN.fullmatch(sent) else uuid.uuid4().hex
        response: dict = {"status": None, "json": False, "body": b"", "stream": False, "disconnected": False}

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                response["disconnected"] = True
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = dict(message.get("headers", []))
                content_type = headers.get(b"content-type", b"")
                response["json"] = content_type.startswith(b"application/json")
                response["stream"] = content_type.startswith(b"text/event-stream")
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif (
                message["type"] == "http.response.body"
                and response["json"]
                and response["status"] >= 400
                and len(response["body"]) < ERROR_BODY_BYTES
            ):
                response["body"] += message.get("body", b"")
            await send(message)

        failure: BaseException | None = None
        try:
            await self._app(scope, receive_watching, send_with_id)
        except BaseException as exc:  # logged here, handled further out (ServerErrorMiddleware answers 500)
            failure = exc
            raise
        finally:
            try:
                self._log(scope, request_id, response, time.perf_counter() - started, failure)
            except Exception:  # a log line must never break a response
                request_log.exception("request log failed")

    def _log(
        self, scope: Scope, request_id: str, response: dict, duration_s: float, failure: BaseException | None
    ) -> None:
        route = scope.get("route")
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        generation: Generation | None = scope.get("state", {}).get("generation")
        status = response["status"] or (500 if failure is not None else 0)
        session_id = (
            generation.session.id
            if generation is not None
            else (scope.get("path_params") or {}).get("session_id")
            or dict(scope["headers"]).get(b"x-session-id", b"").decode("latin-1")
            or None
        )
        fields: dict = {
            "request_id": request_id,
            "method": scope["method"],
            "route": template or "(unmatched)",
            "status": status,
        }
        if session_id:
            fields["session"] = session_hash(session_id)
        if response["stream"]:
            fields["stream"] = True
        error, cause = None, None
        if generation is not None:
            outcome = generation.outcome
            if isinstance(outcome, TurnResult):
                usage = outcome.usage
                fields.update(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens,
                    finish=outcome.finish_reason,
                    ttft_ms=_ms(outcome.ttft_s),
                    tpot_ms=_ms(outcome.tpot_s),
                )
            else:  # failed, or the client left before the turn ended: what the worker has done so far
                g = generation
                n_out = len(g.output_ids)
                fields.update(
                    prompt_tokens=g.n_fed,
                    completion_tokens=n_out,
                    cached_tokens=g.cached_tokens,
                    finish="error"
                    if outcome is not None
                    else "disconnected"
                    if response["disconnected"]
                    else "unfinished",
                )
                if g.first_token_at:
                    fields["ttft_ms"] = _ms(g.first_token_at - g.submitted_at)
                if n_out > 1:
                    fields["tpot_ms"] = _ms((g.last_token_at - g.first_token_at) / (n_out - 1))
                if isinstance(outcome, GenerationError):
                    error, cause = outcome.type, str(outcome)
        if error is None and status >= 400:
            error = _error_type(response["body"]) if response["body"] else None
        if failure is not None and error is None and not isinstance(failure, asyncio.CancelledError):
            error, cause = "internal_error", f"{type(failure).__name__}: {failure}"
        fields["duration_ms"] = _ms(duration_s)
        if error is not None:
            fields["error"] = error
        if cause is not None:
            fields["cause"] = _redact(cause, session_id)
        path = scope["path"]
        if (
            isinstance(generation.outcome if generation else None, GenerationError)
            or (status >= 500 and status != 503)
            or error == "internal_error"
        ):
            level = logging.ERROR
        elif path in PROBE_PATHS:
            level = logging.DEBUG
        elif status in (429, 503):
            level = logging.WARNING
        else:
            level = logging.INFO
        summary = f"{fields['method']} {fields['route']} {status}"
        text = " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items() if k not in ("method", "route", "status"))
        request_log.log(level, "%s %s", summary, text, extra={"h2o_fields": fields, "h2o_summary": summary})


def _redact(text: str, session_id: str | None) -> str:
    """`text` without the raw session id (where it stands as a word of its own)."""
    if not session_id:
        return text
    return re.sub(rf"(?<![A-Za-z0-9_-]){re.escape(session_id)}(?![A-Za-z0-9_-])", "<session>", text)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _logfmt(value: object) -> str:
    """A logfmt value: bare when it is one word, else a JSON string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if text and re.fullmatch(r"[^\s\"=]+", text) else json.dumps(text)


def _error_type(body: bytes) -> str | None:
    """`error.type` of an error response's JSON body (the message may name a session: not logged)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return str(error.get("type")) if isinstance(error, dict) and error.get("type") else None


class BodyLimit:
    """Answers 413 to a request body over `max_bytes` before the app reads it: by its Content-Length, or, for a
    chunked body, by counting while buffering it (bounded by `max_bytes`)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self._max_bytes:
                await self._reject(send)
                return
            await self._app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self._app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self._max_bytes:
                await self._reject(send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self._app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        content = json.dumps(
            {"error": {"message": f"request body over {self._max_bytes} bytes", "type": "body_too_large", "code": 413}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


class ReplicaHeader:
    """Adds `X-H2O-Replica` to every response (a plain ASGI middleware: it leaves streaming and disconnect
    detection alone, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self._app = app
        self._header = (b"x-h2o-replica", name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self._header]
            await send(message)

        await self._app(scope, receive, send_with_header if scope["type"] == "http" else send)


app = create_app()

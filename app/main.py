"""The FastAPI application: `create_app()` wires settings, engine, sessions and metrics; `app` is what
`uvicorn app.main:app` serves (the model loads in the background at startup, see /ready)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.api import ApiError, ServerState, protected, public
from app.engine import Engine
from app.metrics import Metrics
from app.sessions import SessionStore
from app.settings import Settings
from app.snapshots import SnapshotStore

GENERATION_PATHS = ("/generate", "/v1/chat/completions")
DRAIN_MARGIN_S = 5.0
"""On SIGTERM, how long past H2O_SHUTDOWN_GRACE_S the cancelled turns may take to be saved and answered."""


def create_app(settings: Settings | None = None,
               preloaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> FastAPI:
    """Build the server. `preloaded` (model, tokenizer) skips loading `settings.model` (tests use it)."""
    settings = settings or Settings()
    metrics = Metrics()
    snapshots = SnapshotStore(settings.snapshot_dir) if settings.snapshot_dir else None
    sessions = SessionStore(settings.max_sessions, settings.session_ttl_s, settings.max_resident_sessions,
                            snapshots, metrics, settings.max_sessions_per_key)
    metrics.track_sessions(lambda: sessions, lambda: sessions.stored_count)
    engine = Engine(settings, metrics, preloaded, persist=sessions.persist if snapshots else None)
    state = ServerState(settings, engine, sessions, metrics)
    state.parse_policy(None)  # a bad default policy fails at startup, not on the first request

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

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        if exc.outcome:
            metrics.requests.labels(exc.outcome).inc()
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
        content = json.dumps({"error": {"message": f"request body over {self._max_bytes} bytes",
                                        "type": "body_too_large", "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode()), (b"connection", b"close")]})
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

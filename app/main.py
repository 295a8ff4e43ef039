"""The FastAPI application: `create_app()` wires settings, engine, sessions and metrics; `app` is what
`uvicorn app.main:app` serves (the model loads in the background at startup, see /ready)."""

from __future__ import annotations

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

GENERATION_PATHS = ("/generate", "/v1/chat/completions")


def create_app(settings: Settings | None = None,
               preloaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> FastAPI:
    """Build the server. `preloaded` (model, tokenizer) skips loading `settings.model` (tests use it)."""
    settings = settings or Settings()
    metrics = Metrics()
    sessions = SessionStore(settings.max_sessions, settings.session_ttl_s)
    metrics.track_sessions(lambda: sessions)
    state = ServerState(settings, Engine(settings, metrics, preloaded), sessions, metrics)
    state.parse_policy(None)  # a bad default policy fails at startup, not on the first request

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="h2o-serve", lifespan=lifespan)
    app.state.server = state
    app.include_router(public)
    app.include_router(protected)
    app.add_middleware(ReplicaHeader, name=settings.replica_name)

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

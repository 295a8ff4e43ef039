"""The FastAPI application: `create_app()` wires settings, engine, sessions and metrics (the model loads in the
background at startup, see /ready). Nothing is built at import: `python -m app` calls it, or
`uvicorn app.main:create_app --factory`, so importing the module never reads the environment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.api import protected, public
from app.engine import Engine
from app.errors import ApiError, error_body
from app.metrics import Metrics, package_version
from app.middleware import GENERATION_PATHS, BodyLimit, CountGenerations, GenerationsInFlight, ReplicaHeader
from app.request_log import RequestLog
from app.sessions import SessionStore
from app.settings import Settings
from app.snapshots import SnapshotStore
from app.state import ServerState
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes

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
    return JSONResponse(error_body(message, type_, status), status, headers=headers)


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

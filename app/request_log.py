"""The request log: one line per request (route, status, request id, the session's hash, a turn's tokens and
timings), written when its response's last byte is sent; text or JSON (`H2O_LOG_FORMAT`, see app.__main__)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.generation import Generation, GenerationError
from app.protocol import TurnResult
from app.snapshots import file_stem

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
"""A client's `X-Request-Id` is kept when it matches (no spaces, quotes or control characters; 128 characters at
most); otherwise the server makes one."""
PROBE_PATHS = ("/health", "/ready", "/metrics")
"""Logged at DEBUG (load balancers and Prometheus call them every few seconds)."""
ERROR_BODY_BYTES = 8192
request_log = logging.getLogger("app.requests")


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
            fields["session"] = file_stem(session_id)[:16]
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

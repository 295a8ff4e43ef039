"""Plain ASGI middleware of the server: the request body limit, the replica header, and the count of generation
requests in flight that a graceful shutdown waits for."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

GENERATION_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions")


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

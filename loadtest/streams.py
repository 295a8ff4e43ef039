"""Reading h2o-serve's streamed replies: a byte-level SSE parser and the checks each protocol's stream must pass.
Kept apart from the locustfile so tests can import it without importing locust (which monkey-patches the stdlib)."""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import Iterable, Iterator

import requests

_LINE_END = re.compile(r"\r\n|\r|\n")


class StreamError(Exception):
    """The reply was not a well-formed stream that ended the way the protocol says it must."""


def sse_events(chunks: Iterable[bytes]) -> Iterator[tuple[str, str]]:
    """Yield ``(event, data)`` per server-sent event. Parses bytes as they arrive: ``requests.iter_lines`` splits a
    ``\\r\\n`` that straddles two chunks into two line ends, which would cut an event in half."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer, event, data = "", "message", []
    for chunk in chunks:
        buffer += decoder.decode(chunk)
        # A trailing "\r" may still be followed by its "\n": keep it back until the next chunk.
        held = "\r" if buffer.endswith("\r") else ""
        lines = _LINE_END.split(buffer[: len(buffer) - len(held)])
        buffer = lines.pop() + held
        for line in lines:
            if line == "":
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
    if data:
        yield event, "\n".join(data)


def read_native(response: requests.Response) -> list[float]:
    """Arrival times of the ``token`` events of a ``/sessions/{id}/generate`` stream; checks the ``done`` event."""
    times: list[float] = []
    for event, data in sse_events(response.iter_content(chunk_size=None)):
        if event == "token":
            payload = json.loads(data)
            if "text" not in payload or "token_id" not in payload:
                raise StreamError(f"token event without text/token_id: {data[:200]}")
            times.append(time.perf_counter())
        elif event == "done":
            done = json.loads(data)
            completion = done.get("usage", {}).get("completion_tokens")
            # A final end-of-turn token counts as completion but has no text, so it may have no event.
            if not isinstance(completion, int) or not len(times) <= completion <= len(times) + 1:
                raise StreamError(f"done reports {completion} completion tokens, the stream carried {len(times)}")
            if not done.get("finish_reason"):
                raise StreamError(f"done event without finish_reason: {data[:200]}")
            return times
        elif event == "error":
            raise StreamError(f"error event: {data[:200]}")
    raise StreamError(f"stream ended after {len(times)} tokens without a done event")


def read_openai(response: requests.Response) -> list[float]:
    """Arrival times of the content chunks of an OpenAI chat-completions stream; checks it finishes with a
    ``finish_reason`` and ``[DONE]``."""
    times: list[float] = []
    finish_reason = None
    for _, data in sse_events(response.iter_content(chunk_size=None)):
        if data == "[DONE]":
            if finish_reason is None:
                raise StreamError("[DONE] before any choice carried a finish_reason")
            return times
        chunk = json.loads(data)
        if "error" in chunk:
            raise StreamError(f"error chunk: {data[:200]}")
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                times.append(time.perf_counter())
            finish_reason = choice.get("finish_reason") or finish_reason
    raise StreamError(f"stream ended after {len(times)} chunks without [DONE]")

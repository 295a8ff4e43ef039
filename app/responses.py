"""A turn's answer in the client's format: native SSE events, OpenAI chunks and choices (chat and legacy
completion), usage and logprobs; and the non-streaming collection that cancels when its client leaves."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.errors import ApiError, error_body
from app.generation import Generation, GenerationError
from app.protocol import (
    Logprob,
    OpenAIRequest,
    SessionInfo,
    TokenEvent,
    TurnResult,
    Usage,
)
from app.state import ServerState

DISCONNECT_POLL_S = 0.05
"""How often a non-streaming request checks that its client is still there (about one decode step)."""


def include_usage(body: OpenAIRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def legacy_logprobs(events: list[TokenEvent]) -> dict | None:
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


def openai_logprobs(events: list[TokenEvent] | None) -> dict | None:
    """OpenAI's `logprobs` of a choice or chunk: None unless the request asked."""
    if not events or events[0].logprob is None:
        return None

    def entry(logprob: Logprob) -> dict:
        return {"token": logprob.token, "logprob": logprob.logprob, "bytes": list(logprob.token.encode())}

    return {"content": [{**entry(e.logprob), "top_logprobs": [entry(t) for t in e.top_logprobs or []]} for e in events]}


def openai_usage(usage: Usage) -> dict:
    """OpenAI counts the whole conversation as the prompt; what the session's cache held already is cached."""
    prompt = usage.cached_tokens + usage.prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": prompt + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def collect(generation: Generation, request: Request) -> TurnResult:
    """Run a turn to its end for a non-streaming response; a client that disconnects meanwhile cancels it (the
    server learns of it only by polling: no response is being written that could fail)."""
    watcher = asyncio.create_task(cancel_on_disconnect(generation, request))
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


async def cancel_on_disconnect(generation: Generation, request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    generation.cancel()


def event_stream(
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


async def native_events(generation: Generation) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in generation:
            if isinstance(event, TokenEvent):
                yield ServerSentEvent(event.model_dump_json(exclude_none=True), event="token")
            else:
                yield ServerSentEvent(event.model_dump_json(exclude={"text", "logprobs"}), event="done")
    except GenerationError as exc:
        yield ServerSentEvent(json.dumps(error_body(str(exc), exc.type, exc.status)), event="error")
    finally:
        generation.cancel()  # no-op once finished; a disconnected client stops the generation here


ChoiceOf = Callable[[str, list[TokenEvent], "str | None", bool], dict]
"""(text, token events, finish reason, first) -> one streamed choice of a chat or a legacy completion."""


def chat_choice(text: str, events: list[TokenEvent], finish_reason: str | None, first: bool) -> dict:
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text or events else {}
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": openai_logprobs(events)}


def text_choice(text: str, events: list[TokenEvent], finish_reason: str | None, first: bool) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": legacy_logprobs(events)}


async def openai_chunks(
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
                yield chunk([choice_of("", [], openai_finish(event.finish_reason), False)])
                if include_usage:
                    yield chunk([], usage=openai_usage(event.usage))
        yield ServerSentEvent("[DONE]")
    except GenerationError as exc:
        yield ServerSentEvent(json.dumps(error_body(str(exc), exc.type, exc.status)))
    finally:
        generation.cancel()


def openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def session_info(summary: dict) -> SessionInfo:
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

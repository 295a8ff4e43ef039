"""One turn in flight (`Generation`): created by the engine's `submit` on the event loop, advanced by the worker,
its events delivered to the request on the event loop; and the errors a turn can end with."""

from __future__ import annotations

import asyncio
import time

import torch

from app.chat import Message
from app.protocol import TokenEvent, TurnResult
from app.sampling import SamplingParams
from app.sessions import Session
from app.textstream import TextStream
from h2o_cache import CachePolicy


class GenerationError(Exception):
    """A generation failed inside the worker; the session was rolled back to its last turn."""

    type = "generation_error"
    status = 500


class TurnNotSavedError(GenerationError):
    """The turn was generated but its snapshot could not be written: it is not acknowledged and not kept (the
    session is what its last saved snapshot holds)."""

    type = "storage_error"
    status = 503


class Generation:
    """One turn in flight. Created on the event loop by `Engine.submit`; advanced by the worker; its events
    (TokenEvent..., then TurnResult or GenerationError) arrive on `events`."""

    def __init__(
        self,
        session: Session,
        new_messages: list[Message],
        prompt_text: str,
        prompt_ids: list[int],
        params: SamplingParams,
        decoder: TextStream,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.session = session
        self.cached_tokens = session.cache_tokens_seen
        """Tokens of the conversation the session's cache had seen before this turn (not fed again)."""
        self.new_messages = new_messages
        self.prompt_text = prompt_text
        self.prompt_ids = prompt_ids
        """Tokens to feed: the session's pending tokens, then the turn delta."""
        self.params = params
        self.decoder = decoder
        self.events: asyncio.Queue[TokenEvent | TurnResult | GenerationError] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.cancelled = False
        """Set from the event loop; the worker stops at its next step."""
        self.submitted_at = time.perf_counter()
        self.generator: torch.Generator | None = None
        self.n_fed = 0
        self.output_ids: list[int] = []
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.scheduled_at: float | None = None
        """When the worker took it from the waiting queue (perf_counter)."""
        self.outcome: TurnResult | GenerationError | None = None
        """The last event, once the turn has ended (the request log reads it)."""
        self.ended = False
        """Set by the worker when it finishes or fails the turn (a finished turn may still be being saved)."""
        self._loop = loop

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def policy(self) -> CachePolicy:
        return self.session.policy

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: TokenEvent | TurnResult | GenerationError) -> None:
        """Hand an event to the event loop (called by the worker)."""
        self._call_on_loop(self.events.put_nowait, event)

    def close(self, last: TurnResult | GenerationError) -> None:
        """Release the session and hand over the last event in one step on the event loop, so a client that has
        seen the turn end always finds the session free (called by the worker or the snapshot writer)."""
        self._call_on_loop(self._close_on_loop, last)

    def _close_on_loop(self, last: TurnResult | GenerationError) -> None:
        if self.session.active is self:
            self.session.active = None
        self.outcome = last
        self.finished.set()
        self.events.put_nowait(last)

    def _call_on_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            pass

    async def __aiter__(self):
        """Token events, then the TurnResult; raises GenerationError if the worker failed."""
        while True:
            event = await self.events.get()
            if isinstance(event, GenerationError):
                raise event
            yield event
            if isinstance(event, TurnResult):
                return

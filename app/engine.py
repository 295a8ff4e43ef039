"""The model and its scheduler: one worker thread owns the model and advances every running generation one
step per round (a prefill chunk or one decoded token), round-robin, so sessions interleave fairly.
No HTTP here: the routes submit turns and read each turn's events from an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.batching import Batcher
from app.chat import Message, context, turn_delta
from app.conversations import extend_key, root_key
from app.generation import Generation, GenerationError, TurnNotSavedError
from app.memory import release_freed_memory
from app.metrics import Metrics
from app.protocol import Logprob, TokenEvent, TurnResult, Usage
from app.sampling import SamplingParams, logprobs, sample
from app.sessions import Session
from app.settings import Settings
from app.snapshots import file_stem
from app.textstream import TextStream
from h2o_cache import load_model, make_cache, restore_cache

logger = logging.getLogger(__name__)


class EngineNotReadyError(Exception):
    """The model is still loading (or failed to load)."""


class QueueFullError(Exception):
    """max_running + max_waiting generations are in flight."""


class SessionBusyError(Exception):
    """The session is generating already."""


class Engine:
    """Holds the model and the scheduler thread.

    `_step_all` is the one place that runs the model over the running generations; continuous batching
    replaces it with one batched forward per round without touching the HTTP layer.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        preloaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        persist: Callable[[Session, Callable[[Exception | None], None]], None] | None = None,
    ) -> None:
        """`persist(session, then)` is called on the worker when a turn has changed a session; it must call
        `then(error)` (from any thread) once the session is saved or could not be (SessionStore.persist), which
        ends the turn: with its result, or with TurnNotSavedError."""
        self.settings = settings
        self.metrics = metrics
        self._persist = persist
        self.model, self.tokenizer = preloaded if preloaded else (None, None)
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._in_flight = 0
        self._generations: set[Generation] = set()
        """Submitted and not yet released (guarded by _cond)."""
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._eos_ids: list[int] = []
        self._batcher: Batcher | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="h2o-engine", daemon=True)
        self._thread.start()

    def cancel_all(self) -> None:
        """Cancel every generation in flight; each ends at its next step and keeps what it generated."""
        with self._cond:
            for generation in self._generations:
                generation.cancel()

    async def drain(self, timeout_s: float) -> None:
        """Cancel every generation and wait (up to `timeout_s`) until each has ended and been saved."""
        self.cancel_all()
        deadline = time.monotonic() + timeout_s
        while self._in_flight and self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def in_flight(self) -> list[Generation]:
        """Turns submitted and not finished yet."""
        with self._cond:
            return list(self._generations)

    def submit(
        self, session: Session, new_messages: list[Message], params: SamplingParams, raw_prompt: str | None = None
    ) -> Generation:
        """Queue the next turn of `session` (event loop only): `new_messages` are the turn's messages (a user
        message, after the system message on a session's first turn, or a whole conversation to rebuild). The
        turn is tokenized here so bad input fails before any response starts; the session changes only when the
        worker finishes the turn. `raw_prompt`: text fed as it is instead of the chat template's rendering
        (a legacy completion; the tokenizer adds its special tokens, as a BOS)."""
        if not self.ready:
            raise EngineNotReadyError(self.load_error or "the model is loading")
        if session.active is not None:
            raise SessionBusyError(f"session {session.id!r} is generating; wait for the reply or cancel it")
        if raw_prompt is None:
            delta = turn_delta(
                self.tokenizer,
                context(session.system, session.history),
                new_messages,
                session.fed_prompt,
                session.fed_reply,
            )
        else:
            delta = raw_prompt
        ids = session.pending_ids + self.tokenizer(delta, add_special_tokens=raw_prompt is not None).input_ids
        decoder = TextStream(self.tokenizer, params.stop)
        generation = Generation(session, new_messages, delta, ids, params, decoder, asyncio.get_running_loop())
        with self._cond:
            if self._in_flight >= self.settings.max_running + self.settings.max_waiting:
                raise QueueFullError(f"{self._in_flight} generations are in flight; retry later")
            self._in_flight += 1
            self._generations.add(generation)
            self._waiting.append(generation)
            self.metrics.requests_waiting.set(len(self._waiting))
            self._cond.notify()
        session.active = generation
        return generation

    def _load(self) -> None:
        s = self.settings
        logger.info("loading model %s", s.model)
        self.model, self.tokenizer = load_model(s.model, device=s.device, dtype=s.dtype)

    def _run(self) -> None:
        try:
            if self.model is None:
                self._load()
        except Exception as exc:  # reported by /ready and by every generate
            logger.exception("model failed to load")
            self.load_error = f"model failed to load: {exc}"
            return
        self._eos_ids = sorted(_eos_ids(self.model, self.tokenizer))
        if self.settings.batching:
            self._batcher = Batcher(self, self.settings.max_batch)
        self._ready.set()
        active: list[Generation] = []
        while True:
            with self._cond:
                while not (self._stopping or active or self._waiting):
                    self._cond.wait()
                if self._stopping:
                    break
                while self._waiting and len(active) < self.settings.max_running:
                    active.append(self._waiting.popleft())
                    active[-1].scheduled_at = time.perf_counter()
                    self.metrics.queue_time.observe(active[-1].scheduled_at - active[-1].submitted_at)
                self.metrics.requests_waiting.set(len(self._waiting))
            self.metrics.requests_running.set(len(active))
            stepped, sampled_before = active, sum(len(g.output_ids) for g in active)
            try:
                active = self._step_all(active)
            except Exception as exc:  # a fault outside any one turn's step: end this round's turns, keep serving
                logger.exception("a scheduler round failed")
                if self._batcher is not None:
                    self._batcher.pool.reset()
                for g in stepped:
                    if not g.ended:
                        self.fail(g, GenerationError(f"generation failed: {exc}"))
                active = []
            sampled = sum(len(g.output_ids) for g in stepped) - sampled_before  # at most one token each
            if sampled:
                self.metrics.decode_batch_size.observe(sampled)
            self.metrics.requests_running.set(len(active))
            if not active and not self._waiting:  # idle: what turns freed goes back to the OS (RSS follows sessions)
                release_freed_memory()
        with self._cond:
            active += self._waiting
            self._waiting.clear()
        for generation in active:
            self.fail(generation, GenerationError("the server is shutting down"))

    def _step_all(self, active: list[Generation]) -> list[Generation]:
        """One scheduler round: advance each running generation by one step; return those still running."""
        with torch.inference_mode():
            if self._batcher is not None:
                return self._batcher.step_all(active)
            running = []
            for generation in active:
                try:
                    done = self.step(generation)
                except Exception as exc:
                    logger.exception("generation failed in session %s", file_stem(generation.session.id)[:16])
                    self.fail(generation, GenerationError(f"generation failed: {exc}"))
                    done = True
                if not done:
                    running.append(generation)
        return running

    def step(self, g: Generation) -> bool:
        """Feed one prefill chunk or the last sampled token, maybe sample the next; True when finished."""
        if g.cancelled:
            self.finish(g, "cancelled")
            return True
        if g.n_fed < len(g.prompt_ids):
            chunk = g.prompt_ids[g.n_fed : g.n_fed + self.settings.prefill_chunk]
            logits = self._forward(g.session, chunk)
            g.n_fed += len(chunk)
            if g.n_fed < len(g.prompt_ids):
                return False
        else:
            logits = self._forward(g.session, g.output_ids[-1:])
        reason = self.take(g, logits)
        if reason is None:
            return False
        self.finish(g, reason)
        return True

    def take(self, g: Generation, logits: torch.Tensor) -> str | None:
        """Sample the next token from `logits` (vocab,) and emit it; the finish reason, or None to go on."""
        if g.generator is None:
            g.generator = torch.Generator(device=logits.device)
            if g.params.seed is None:
                g.generator.seed()
            else:
                g.generator.manual_seed(g.params.seed)
        suppress = self._eos_ids if len(g.output_ids) < g.params.min_new_tokens else []
        token = sample(logits, g.params, g.generator, suppress)
        previous, g.last_token_at = g.last_token_at, time.perf_counter()
        if previous is not None:
            self.metrics.inter_token_latency.observe(g.last_token_at - previous)
        g.first_token_at = g.first_token_at or g.last_token_at
        g.output_ids.append(token)
        is_eos = token in self._eos_ids
        text = "" if is_eos else g.decoder.push(token)
        reason = None
        if is_eos or g.decoder.stopped:
            reason = "stop"
        elif len(g.output_ids) >= g.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            text += g.decoder.flush()
        if text or not is_eos:
            g.emit(TokenEvent(text=text, token_id=token, **self._logprobs(logits, token, g.params.top_logprobs)))
        return reason

    def _logprobs(self, logits: torch.Tensor, token: int, top: int | None) -> dict:
        """A token event's `logprob` and `top_logprobs` fields (none unless the request asked)."""
        if top is None:
            return {}
        sampled, alternatives = logprobs(logits, token, top)
        ids = [token] + [i for i, _ in alternatives]
        texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        return {
            "logprob": Logprob(token_id=token, token=texts[0], logprob=sampled),
            "top_logprobs": [Logprob(token_id=i, token=t, logprob=lp) for (i, lp), t in zip(alternatives, texts[1:])]
            if top
            else None,
        }

    def _forward(self, session: Session, ids: list[int]) -> torch.Tensor:
        """Feed `ids` to the session's cache; return the last position's logits (vocab,)."""
        if session.cache is None and session.saved_cache is not None:
            session.cache = restore_cache(self.model, *session.saved_cache)
            session.saved_cache = None
        elif session.cache is None:
            session.cache = make_cache(self.model, session.policy)
        cache = session.cache
        evicted_before = cache.evicted_tokens
        out = self.model(
            input_ids=torch.tensor([ids], device=self.model.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        evicted = cache.evicted_tokens - evicted_before
        session.evicted_tokens += evicted
        self.metrics.cache_evictions.inc(evicted)
        session.cache_tokens_seen = cache.get_seq_length()
        session.cache_tokens = cache.kept_tokens()
        session.cache_bytes = cache.nbytes()
        return out.logits[0, -1]

    def finish(self, g: Generation, reason: str) -> None:
        """Write the turn into the session (unless it was cancelled before anything was fed), save it, then
        report it and release the session. A batched turn has left the pool already: its cache is the row's copy."""
        g.ended = True
        s = g.session
        if s.cache is not None:  # a session at rest holds its stored codes only, and reports what it holds
            s.cache.release_working()
            s.cache_bytes = s.cache.nbytes()
        started = g.n_fed > 0
        if started:
            ends_with_eos = reason == "stop" and g.output_ids[-1:] and g.output_ids[-1] in self._eos_ids
            content_ids = g.output_ids[:-1] if ends_with_eos else g.output_ids
            s.append([*g.new_messages, {"role": "assistant", "content": self._raw(content_ids)}])
            s.fed_prompt, s.fed_reply = g.prompt_text, self._raw(g.output_ids)
            s.conversation_key = extend_key(
                s.conversation_key or root_key(s.owner),
                [*g.new_messages, {"role": "assistant", "content": g.decoder.output}],
            )
            s.pending_ids = g.prompt_ids[g.n_fed :] + g.output_ids[-1:]
            s.turns += 1
            s.updated_at = time.time()
        ttft_s = (g.first_token_at - g.submitted_at) if g.first_token_at else 0.0
        n_out = len(g.output_ids)
        tpot_s = (g.last_token_at - g.first_token_at) / (n_out - 1) if n_out > 1 else 0.0
        m = self.metrics
        m.requests.labels(reason).inc()
        m.prompt_tokens.inc(g.n_fed)
        m.generation_tokens.inc(n_out)
        if g.first_token_at:
            m.ttft.observe(ttft_s)
        if n_out > 1:
            m.tpot.observe(tpot_s)
        m.e2e_latency.observe(time.perf_counter() - g.submitted_at)
        if g.first_token_at and g.scheduled_at is not None:
            m.prefill_time.observe(g.first_token_at - g.scheduled_at)
            m.decode_time.observe(g.last_token_at - g.first_token_at)
        result = TurnResult(
            finish_reason=reason,
            usage=Usage(prompt_tokens=g.n_fed, completion_tokens=n_out, cached_tokens=g.cached_tokens),
            cache_tokens=s.cache_tokens,
            cache_tokens_seen=s.cache_tokens_seen,
            cache_budget=s.policy.max_tokens,
            ttft_s=ttft_s,
            tpot_s=tpot_s,
            text=g.decoder.output,
        )

        def complete(error: Exception | None = None) -> None:
            if error is None:
                self._release(g, result)
                return
            self.metrics.requests.labels("error").inc()
            self._release(
                g,
                TurnNotSavedError(
                    f"the turn was generated but could not be saved ({error}); it was "
                    "not kept: retry it once storage works"
                ),
            )

        if started and self._persist is not None:
            self._persist(s, complete)
        else:
            complete()

    def fail(self, g: Generation, error: GenerationError) -> None:
        """The turn is dropped; the cache may hold part of it, so the next turn rebuilds it from the last exchanges
        (see app.chat.context)."""
        g.ended = True
        if g.n_fed:
            g.session.reset_cache()
        self.metrics.requests.labels("error").inc()
        self._release(g, error)

    def _release(self, g: Generation, last: TurnResult | GenerationError) -> None:
        with self._cond:
            self._in_flight -= 1
            self._generations.discard(g)
        g.close(last)

    def _raw(self, ids: list[int]) -> str:
        """Exact text of `ids`, special tokens included: what the chat template must reproduce."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-turn tokens: the tokenizer's EOS plus the generation config's (an int or a list)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}

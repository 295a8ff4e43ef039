"""The engine loop, in the shape of vLLM v1's: one worker thread repeats a step — the scheduler plans it
(app.scheduler, pure), the model runner runs its forwards (app.model_runner), the output processor turns logits
into tokens and events (app.output_processor) — and the engine writes each ended turn into its session, saves it
and hands the turn's last event to the request. No HTTP here: the routes submit turns (app.turns) and read each
turn's events from an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.chat import Message, context, turn_delta
from app.conversations import extend_key, root_key
from app.generation import Generation, GenerationError, TurnNotSavedError
from app.memory import release_freed_memory
from app.metrics import Metrics
from app.model_runner import ModelRunner
from app.output_processor import OutputProcessor
from app.protocol import TurnResult, Usage
from app.sampling import SamplingParams
from app.scheduler import SchedulerConfig, StepPlan, schedule
from app.sessions import Session
from app.settings import Settings
from app.snapshots import file_stem
from app.textstream import TextStream
from h2o_cache import load_model

logger = logging.getLogger(__name__)


class EngineNotReadyError(Exception):
    """The model is still loading (or failed to load)."""


class QueueFullError(Exception):
    """max_running + max_waiting generations are in flight."""


class SessionBusyError(Exception):
    """The session is generating already."""


class Engine:
    """The worker thread and its queue of submitted turns; the model runner and output processor exist once the
    model has loaded (`ready`)."""

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
        self.runner: ModelRunner | None = None
        self.output: OutputProcessor | None = None

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
        s = self.settings
        self.runner = ModelRunner(self.model, self.metrics, s.max_batch if s.batching else None)
        self.output = OutputProcessor(self.model, self.tokenizer, self.metrics)
        self._ready.set()
        config = SchedulerConfig.from_settings(s)
        running: list[Generation] = []
        while True:
            with self._cond:
                while not (self._stopping or running or self._waiting):
                    self._cond.wait()
                if self._stopping:
                    break
                fault = None
                try:
                    plan = schedule(config, self._waiting, running, self.runner.pool_view())
                except Exception as exc:  # a scheduler bug: this step's turns (all of them) end below
                    fault, plan = exc, StepPlan(running=[*running, *self._waiting], admitted=len(self._waiting))
                for _ in range(plan.admitted):
                    admitted = self._waiting.popleft()
                    admitted.scheduled_at = time.perf_counter()
                    self.metrics.queue_time.observe(admitted.scheduled_at - admitted.submitted_at)
                self.metrics.requests_waiting.set(len(self._waiting))
            self.metrics.requests_running.set(len(plan.running))
            try:
                if fault is not None:
                    raise fault
                self._execute(plan)
            except Exception as exc:  # a fault outside any one turn's part: the step's turns end, the engine serves on
                self._fail_round(plan.running, exc)
            running = [g for g in plan.running if not g.ended]
            self.metrics.requests_running.set(len(running))
            if not running and not self._waiting:  # idle: what turns freed goes back to the OS (RSS follows sessions)
                release_freed_memory()
        with self._cond:
            ending = [*running, *self._waiting]
            self._waiting.clear()
        for generation in ending:
            self.fail(generation, GenerationError("the server is shutting down"))

    def _execute(self, plan: StepPlan[Generation]) -> None:
        """Carry out one step's plan: each turn's part fails alone; a fault in the batched forward fails its rows."""
        sampled_before = sum(len(g.output_ids) for g in plan.running)
        with torch.inference_mode():
            for g in plan.cancelled:
                self.finish(g, "cancelled")
            for g, n in plan.prefill:
                self._guarded(g, self._prefill, n)
            for g in plan.joins:
                self._guarded(g, self.runner.join)
            for g in plan.alone:
                self._guarded(g, self._decode_alone)
            pooled = [g for g in plan.pooled if not g.ended]
            if pooled:
                self._decode_pooled(pooled)
        sampled = sum(len(g.output_ids) for g in plan.running) - sampled_before  # at most one token each
        if sampled:
            self.metrics.decode_batch_size.observe(sampled)
        self.metrics.kv_pool_bytes.set(self.runner.pool_nbytes())

    def _prefill(self, g: Generation, n: int) -> None:
        """Feed the next `n` prompt tokens; the last chunk's logits give the turn its first token."""
        logits = self.runner.feed(g, g.prompt_ids[g.n_fed : g.n_fed + n])
        g.n_fed += n
        if g.n_fed == len(g.prompt_ids):
            self._take(g, logits)

    def _decode_alone(self, g: Generation) -> None:
        self._take(g, self.runner.feed(g, g.output_ids[-1:]))

    def _decode_pooled(self, pooled: list[Generation]) -> None:
        try:
            logits = self.runner.decode_pooled(pooled)
        except Exception as exc:
            self._fail_round(pooled, exc)
            return
        for g in pooled:
            self._guarded(g, self._take, logits[g])

    def _take(self, g: Generation, logits: torch.Tensor) -> None:
        reason = self.output.take(g, logits)
        if reason is not None:
            self.finish(g, reason)

    def _guarded(self, g: Generation, action: Callable[..., None], *args: Any) -> None:
        """Run one turn's part of the step; if it raises, that turn alone fails (and frees its pool row)."""
        try:
            action(g, *args)
        except Exception as exc:
            logger.exception("generation failed in session %s", file_stem(g.session.id)[:16])
            self.fail(g, GenerationError(f"generation failed: {exc}"))

    def _fail_round(self, turns: list[Generation], exc: Exception) -> None:
        """A fault outside any one turn's part (the scheduler, the batched forward): its turns end with an error."""
        logger.exception("a scheduler step failed", exc_info=exc)
        self.runner.reset()
        for g in turns:
            if not g.ended:
                self.fail(g, GenerationError(f"generation failed: {exc}"))

    def finish(self, g: Generation, reason: str) -> None:
        """Write the turn into the session (unless it was cancelled before anything was fed), save it, then
        report it and release the session."""
        g.ended = True
        self.runner.leave(g)
        s = g.session
        if s.cache is not None:  # a session at rest holds its stored codes only, and reports what it holds
            s.cache.release_working()
            s.cache_bytes = s.cache.nbytes()
        started = g.n_fed > 0
        if started:
            content_ids = g.output_ids[:-1] if reason == "stop" and self.output.ends_with_eos(g) else g.output_ids
            s.append([*g.new_messages, {"role": "assistant", "content": self.output.raw(content_ids)}])
            s.fed_prompt, s.fed_reply = g.prompt_text, self.output.raw(g.output_ids)
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
        self.runner.drop(g)
        if g.n_fed:
            g.session.reset_cache()
        self.metrics.requests.labels("error").inc()
        self._release(g, error)

    def _release(self, g: Generation, last: TurnResult | GenerationError) -> None:
        with self._cond:
            self._in_flight -= 1
            self._generations.discard(g)
        g.close(last)

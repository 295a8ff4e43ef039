"""Continuous batching: every scheduler round runs one batched forward over all decoding generations.

A generation's prompt is prefilled on the session's own batch-1 cache (chunks of `prefill_chunk` tokens, at most
`prefill_chunk` prompt tokens per round in all, so a long prompt never stalls the streams for long). Once its first
token is sampled it joins the `SlotPool`: its cache is copied into a row of one shared `H2OCache` pool, and from then
on each round feeds every row its last sampled token in a single forward. The row evicts exactly as the session's
own cache would, so a generation gives the same tokens batched or alone. When the turn ends the row is copied back
to the session's batch-1 cache (what snapshots save and the next turn prefills on) and freed.

Idle sessions therefore never hold a row: on a CPU a held row costs compute in every forward, and the next turn
starts with a prefill on the batch-1 cache anyway. The pool grows by doubling up to `max_batch` rows and halves when
a quarter of it is in use, so a lone stream runs at batch-1 speed. A turn starts its prefill only while fewer than
`max_batch` generations have started, so it waits for a row before its first token rather than mid-stream.
Generations whose policy differs from the pool's (one pool per policy, bounded policies only) decode on their own
cache.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from transformers import PreTrainedModel

from app.generation import Generation, GenerationError
from app.metrics import Metrics
from app.settings import Settings
from app.snapshots import file_stem
from h2o_cache import H2OCache

logger = logging.getLogger(__name__)


class SlotPool:
    """Rows of one `H2OCache` pool <-> decoding generations. While a generation holds a row, the row *is* its
    session's cache (`session.cache` is None); `leave` copies it back."""

    def __init__(self, model, max_rows: int) -> None:
        self._model = model
        self.max_rows = max_rows
        self.cache: H2OCache | None = None
        self.members: list[Generation | None] = []
        self.rows: dict[Generation, int] = {}

    @property
    def n_rows(self) -> int:
        return len(self.members)

    def nbytes(self) -> int:
        """Bytes the pool holds: its rows' stored codes and, for storage other than the model's dtype, the decoded
        working copy that every row's forward reads (kept while the pool exists); 0 without a pool."""
        return 0 if self.cache is None else self.cache.nbytes() + self.cache.working_nbytes()

    def accepts(self, cache: H2OCache) -> bool:
        """A bounded policy equal to the pool's (any bounded policy when the pool is empty)."""
        if cache is None or cache.policy.capacity is None:
            return False
        return self.cache is None or cache.policy == self.cache.policy

    def join(self, g: Generation) -> int | None:
        """Move `g`'s session cache into a free row (growing the pool if needed); None if the pool is full or
        holds another policy."""
        if g in self.rows:
            return self.rows[g]
        session = g.session
        if not self.accepts(session.cache):
            return None
        if self.cache is None:
            self._resize(1, session.cache)
        if None not in self.members:
            if self.n_rows >= self.max_rows:
                return None
            self._resize(min(self.max_rows, 2 * self.n_rows))
        row = self.members.index(None)
        self.cache.insert(row, session.cache)
        self.members[row], self.rows[g] = g, row
        session.cache = None
        return row

    def leave(self, g: Generation) -> None:
        """Copy `g`'s row back into its session's batch-1 cache and free the row (no-op if it holds none)."""
        row = self.rows.get(g)
        if row is None:
            return
        g.session.cache = self.cache.extract(row)
        self._free(g, row)

    def drop(self, g: Generation) -> None:
        """Free `g`'s row without keeping it (its forward failed: the session's cache is rebuilt from history)."""
        row = self.rows.get(g)
        if row is not None:
            self._free(g, row)

    def reset(self) -> None:
        """Forget the pool (after a failed forward, whose rows may be half-written)."""
        self.cache, self.members, self.rows = None, [], {}

    def _free(self, g: Generation, row: int) -> None:
        self.cache.release(row)
        self.members[row] = None
        del self.rows[g]
        if not self.rows:
            self.reset()  # an empty pool frees its memory and may take another policy next
        elif self.n_rows > 1 and len(self.rows) <= self.n_rows // 4:
            self._resize(self.n_rows // 2)

    def _resize(self, n_rows: int, template: H2OCache | None = None) -> None:
        """A new pool of `n_rows` rows; members keep their order and move to the front."""
        template = template or self.cache
        new = H2OCache.pool(self._model, template.policy, n_rows, rotary=template.layers[0].rotary)
        members: list[Generation | None] = [None] * n_rows
        for i, (g, row) in enumerate(sorted(self.rows.items(), key=lambda item: item[1])):
            new.insert(i, self.cache.extract(row))
            members[i], self.rows[g] = g, i
        self.cache, self.members = new, members

    def forward(self, generations: list[Generation]) -> torch.Tensor:
        """Feed every member its last sampled token in one forward; return logits ``(n_rows, vocab)``."""
        device = self._model.device
        tokens = torch.zeros(self.n_rows, 1, dtype=torch.long)
        mask = torch.zeros(self.n_rows, 1, dtype=torch.long)
        for g in generations:
            row = self.rows[g]
            tokens[row, 0] = g.output_ids[-1]
            mask[row, 0] = 1
        out = self._model(
            input_ids=tokens.to(device),
            attention_mask=mask.to(device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]


class TurnSteps(Protocol):
    """What the batcher needs of the engine (app.engine.Engine): its model, settings and metrics, and the steps it
    keeps: a generation's own step (a prefill chunk, or decoding alone), sampling from logits, ending a turn."""

    model: PreTrainedModel
    settings: Settings
    metrics: Metrics

    def step(self, g: Generation) -> bool: ...

    def take(self, g: Generation, logits: torch.Tensor) -> str | None: ...

    def finish(self, g: Generation, reason: str) -> None: ...

    def fail(self, g: Generation, error: GenerationError) -> None: ...


class Batcher:
    """The batched scheduler round of an engine (which keeps sampling, emitting and finishing)."""

    def __init__(self, engine: TurnSteps, max_batch: int) -> None:
        self.engine = engine
        self.pool = SlotPool(engine.model, max_batch)

    def step_all(self, active: list[Generation]) -> list[Generation]:
        """One round: prefill chunks within the round's budget, then one batched decode step; returns the
        generations still running."""
        engine = self.engine
        running: list[Generation] = []
        pooled: list[Generation] = []
        budget = engine.settings.prefill_chunk
        seats = sum(1 for g in active if g in self.pool.rows or g.n_fed)
        for g in active:
            try:
                if g.cancelled:
                    self.pool.leave(g)
                    engine.finish(g, "cancelled")
                    continue
                if g.n_fed < len(g.prompt_ids):
                    if budget <= 0 or (not g.n_fed and seats >= self.pool.max_rows):
                        running.append(g)  # waits for the budget, or before its first token for a row
                        continue
                    seats += not g.n_fed
                    budget -= min(engine.settings.prefill_chunk, len(g.prompt_ids) - g.n_fed)
                    if engine.step(g):
                        continue
                elif self.pool.join(g) is not None:
                    pooled.append(g)
                    continue
                elif engine.step(g):  # pool full or another policy: decode alone
                    continue
                running.append(g)
            except Exception as exc:
                self._fail(g, exc)
        if pooled:
            running += self._decode(pooled)
        engine.metrics.kv_pool_bytes.set(self.pool.nbytes())
        return running

    def _decode(self, pooled: list[Generation]) -> list[Generation]:
        engine = self.engine
        layer = self.pool.cache.layers[0]
        evicted_before = {g: layer.row_evicted[self.pool.rows[g]] for g in pooled}
        try:
            logits = self.pool.forward(pooled)
        except Exception as exc:
            self.pool.reset()
            for g in pooled:
                self._fail(g, exc)
            return []
        layer = self.pool.cache.layers[0]
        for g in pooled:  # before any row leaves: a leave may shrink the pool and renumber the rows
            row, s = self.pool.rows[g], g.session
            evicted = layer.row_evicted[row] - evicted_before[g]
            s.evicted_tokens += evicted
            engine.metrics.cache_evictions.inc(evicted)
            s.cache_tokens = layer.row_valid[row]
            s.cache_tokens_seen += 1
        row_logits = {g: logits[self.pool.rows[g]] for g in pooled}
        running = []
        for g in pooled:
            try:
                reason = engine.take(g, row_logits[g])
            except Exception as exc:
                self._fail(g, exc)
                continue
            if reason is None:
                running.append(g)
            else:
                self.pool.leave(g)
                engine.finish(g, reason)
        return running

    def _fail(self, g: Generation, exc: Exception) -> None:
        logger.exception("generation failed in session %s", file_stem(g.session.id)[:16], exc_info=exc)
        self.pool.drop(g)
        self.engine.fail(g, GenerationError(f"generation failed: {exc}"))

"""The model runner: owns the model and the batching pool and runs a step plan's forwards. It is the one place that
feeds a cache, so it is the one place that counts what each forward kept and evicted into the session."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from app.generation import Generation
from app.metrics import Metrics
from app.scheduler import PoolView
from app.sessions import Session
from app.slot_pool import SlotPool
from h2o_cache import make_cache, restore_cache


class ModelRunner:
    """Forwards for the engine: a prefill chunk or a lone decode on a session's own cache, and one batched decode
    over the pool's rows."""

    def __init__(self, model: PreTrainedModel, metrics: Metrics, max_batch: int | None) -> None:
        """`max_batch`: rows of the batching pool; None runs without one."""
        self.model = model
        self.metrics = metrics
        self.pool = SlotPool(model, max_batch) if max_batch else None

    def pool_view(self) -> PoolView[Generation]:
        if self.pool is None or self.pool.cache is None:
            return PoolView()
        return PoolView(frozenset(self.pool.rows), self.pool.cache.policy)

    def feed(self, g: Generation, ids: list[int]) -> torch.Tensor:
        """Feed `ids` to the session's own cache (made or restored on first use); the last position's logits."""
        session = g.session
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
        self._count(session, cache.evicted_tokens - evicted_before, cache.kept_tokens(), cache.get_seq_length())
        session.cache_bytes = cache.nbytes()
        return out.logits[0, -1]

    def join(self, g: Generation) -> None:
        """Move `g`'s session cache into a pool row (the scheduler checked that it fits)."""
        if self.pool is None or self.pool.join(g) is None:
            raise RuntimeError("the scheduler planned a pool row that the pool cannot give")

    def decode_pooled(self, pooled: list[Generation]) -> dict[Generation, torch.Tensor]:
        """Feed every pooled turn its last sampled token in one forward; each turn's logits (vocab,). A failed
        forward may have half-written the rows: the pool is forgotten before the error propagates."""
        pool = self.pool
        evicted_before = {g: pool.cache.layers[0].row_evicted[pool.rows[g]] for g in pooled}
        try:
            logits = pool.forward(pooled)
        except Exception:
            pool.reset()
            raise
        layer = pool.cache.layers[0]
        for g in pooled:
            row = pool.rows[g]
            seen = g.session.cache_tokens_seen + 1
            self._count(g.session, layer.row_evicted[row] - evicted_before[g], layer.row_valid[row], seen)
        return {g: logits[pool.rows[g]] for g in pooled}

    def leave(self, g: Generation) -> None:
        """`g`'s row (if any) back into its session's own cache: its turn ended."""
        if self.pool is not None:
            self.pool.leave(g)

    def drop(self, g: Generation) -> None:
        """Free `g`'s row (if any) without keeping it: its turn failed and the session's cache is rebuilt."""
        if self.pool is not None:
            self.pool.drop(g)

    def reset(self) -> None:
        """Forget the pool after a fault outside any one turn (its rows may be half-written)."""
        if self.pool is not None:
            self.pool.reset()

    def pool_nbytes(self) -> int:
        return 0 if self.pool is None else self.pool.nbytes()

    def _count(self, session: Session, evicted: int, kept: int, seen: int) -> None:
        """What a forward did to a session's cache: tokens evicted (the counter too), kept and seen so far."""
        session.evicted_tokens += evicted
        self.metrics.cache_evictions.inc(evicted)
        session.cache_tokens, session.cache_tokens_seen = kept, seen

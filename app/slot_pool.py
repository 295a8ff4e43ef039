"""The batching pool: rows of one shared `H2OCache` <-> the turns decoding in it.

A turn's prompt is prefilled on its session's own batch-1 cache; once its first token is sampled it may join the
pool: its cache is copied into a row, and from then on each step feeds every row its last sampled token in a single
forward. A row evicts exactly as the session's own cache would, so a turn gives the same tokens batched or alone.
When the turn ends the row is copied back to the session's batch-1 cache (what snapshots save and the next turn
prefills on) and freed.

Idle sessions therefore never hold a row: on a CPU a held row costs compute in every forward, and the next turn
starts with a prefill on the batch-1 cache anyway. The pool grows by doubling up to `max_rows` and halves when a
quarter of it is in use, so a lone stream runs at batch-1 speed. One pool holds one bounded policy (app.scheduler
decides who joins).
"""

from __future__ import annotations

import torch

from app.generation import Generation
from app.scheduler import fits_pool
from h2o_cache import H2OCache


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

    def accepts(self, cache: H2OCache | None) -> bool:
        return cache is not None and fits_pool(cache.policy, None if self.cache is None else self.cache.policy)

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

"""Eviction scores, one small class per rule: what ranks the heavy-hitter candidates of an H2O cache.

A layer keeps one fp32 number per (row, KV head, slot), ``scores``, that a :class:`Scorer` folds each forward's
post-softmax attention into (:meth:`Scorer.accumulate`); when a row is cut, :meth:`Scorer.rank` turns that state (or
anything else in the slots, such as the keys) into a score, higher survives. Sinks and the recent window are kept
whatever the score; selection itself is shared (:func:`h2o_cache.scoring.select_kept`).

A rule registers its name with :func:`register`; that name is a valid ``CachePolicy.score_mode``. A scorer holds no
per-layer state, so one instance may serve every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from h2o_cache.policy import CachePolicy

DEFAULT_DECAY = 0.98

SCORERS: dict[str, type[Scorer]] = {}
"""Rule name -> scorer class: the valid ``CachePolicy.score_mode`` values."""


def register(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a scorer selectable as ``score_mode=name``."""

    def add(cls: type[Scorer]) -> type[Scorer]:
        SCORERS[name] = cls
        return cls

    return add


def scorer_for(policy: CachePolicy) -> Scorer:
    """The scorer that ``policy.score_mode`` names."""
    return SCORERS[policy.score_mode].from_policy(policy)


def pool_group_attention(probs: torch.Tensor, query_valid: torch.Tensor | None) -> torch.Tensor:
    """Sum post-softmax attention over the query heads of each KV group and over the (valid) queries.

    Args:
        probs: ``(batch, kv_heads, group, q_len, kv_len)`` fp32 attention probabilities.
        query_valid: ``(batch, q_len)`` bool, False for padding queries (their rows are garbage), or None.

    Returns:
        ``(batch, kv_heads, kv_len)`` attention mass received by each slot in this forward.
    """
    if query_valid is not None:
        probs = probs * query_valid[:, None, None, :, None].to(probs.dtype)
    return probs.sum(dim=(2, 3))


class Scorer:
    """How a layer ranks its slots for eviction.

    ``needs_attention``: whether :meth:`accumulate` must see the attention probabilities; without it the layer
    runs plain SDPA (no probabilities, no ``scores`` updates), as for StreamingLLM.
    """

    needs_attention: ClassVar[bool] = True

    @classmethod
    def from_policy(cls, policy: CachePolicy) -> Scorer:
        return cls()

    def before_forward(self, scores: torch.Tensor, n_queries: int, query_valid: torch.Tensor | None) -> None:
        """Before a forward of ``n_queries`` tokens (``query_valid``: ``(batch, n_queries)`` bool, False for
        padding, or None); ``scores`` ``(batch, kv_heads, n)`` already holds zeros for the new tokens' slots."""

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor, query_valid: torch.Tensor | None) -> None:
        """Fold one block of queries into ``scores`` in place. A forward may come in several query blocks, in order.

        Args:
            scores: ``(batch, kv_heads, n)`` fp32 state of the first ``n`` slots (those the block's queries see).
            probs: ``(batch, kv_heads, group, q_len, n)`` fp32 post-softmax attention of the block's queries.
            query_valid: ``(batch, q_len)`` bool, False for padding queries, or None (all valid).
        """
        raise NotImplementedError

    def rank(self, slots: dict[str, torch.Tensor], valid_seen: torch.Tensor) -> torch.Tensor:
        """``(rows, kv_heads, n)`` fp32 score of the slots of the rows being cut, higher survives; by default the
        accumulated state itself.

        Args:
            slots: per-slot tensors of those rows: ``keys`` ``(rows, kv_heads, n, head_dim)`` floating point as the
                model sees them (post-RoPE), ``position`` (original position, integer), ``valid`` (bool, False for
                padding) and ``scores`` (fp32, when ``needs_attention``), each ``(rows, kv_heads, n)``.
            valid_seen: ``(rows,)`` valid tokens each row has appended so far.
        """
        return slots["scores"]


@register("sum")
@dataclass
class SumScorer(Scorer):
    """H2O (arXiv 2306.14048): attention summed over every query that saw the token. Old tokens win by age."""

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor, query_valid: torch.Tensor | None) -> None:
        scores.add_(pool_group_attention(probs, query_valid))


@register("mean")
@dataclass
class MeanScorer(SumScorer):
    """H2O's sum divided by the number of queries that saw the token, so that age alone wins nothing. Every valid
    query after a token sees it, so that number is ``valid_seen - position`` and needs no state of its own."""

    def rank(self, slots: dict[str, torch.Tensor], valid_seen: torch.Tensor) -> torch.Tensor:
        observers = (valid_seen[:, None, None] - slots["position"]).float()
        return slots["scores"] / observers.clamp(min=1.0)


@register("ema")
@dataclass
class EmaScorer(SumScorer):
    """H2O's sum with the past decayed by ``decay`` per new token, so the attention recent queries pay counts most
    (``decay`` 1 is ``sum``). A forward decays the past once, by ``decay`` to the power of the row's valid tokens
    (a row that sits out a step in a pool decays as it would alone)."""

    decay: float = DEFAULT_DECAY

    @classmethod
    def from_policy(cls, policy: CachePolicy) -> Scorer:
        return cls(decay=policy.decay)

    def before_forward(self, scores: torch.Tensor, n_queries: int, query_valid: torch.Tensor | None) -> None:
        if query_valid is None:
            scores.mul_(self.decay**n_queries)
        else:
            scores.mul_((self.decay ** query_valid.sum(-1, dtype=scores.dtype))[:, None, None])


@register("tova")
@dataclass
class TovaScorer(Scorer):
    """TOVA (arXiv 2401.06104): the attention of the current (last) query alone, summed over the KV group's query
    heads. Each block overwrites with its last valid query per row, so a forward's last block with a valid query
    for a row leaves that row's last query; a block of padding only leaves the row as it was."""

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor, query_valid: torch.Tensor | None) -> None:
        if query_valid is None:
            scores.copy_(probs[:, :, :, -1].sum(dim=2))
            return
        b, h, g, q, n = probs.shape
        last = q - 1 - query_valid.flip(-1).to(torch.int8).argmax(-1)  # (batch,) last valid query of the block
        latest = probs.gather(3, last.view(b, 1, 1, 1, 1).expand(b, h, g, 1, n)).sum(dim=(2, 3))
        scores.copy_(torch.where(query_valid.any(-1)[:, None, None], latest, scores))


@register("keydiff")
@dataclass
class KeyDiffScorer(Scorer):
    """KeyDiff (arXiv 2504.15364): keep the keys least like the rest, i.e. rank by the negative cosine similarity
    of each key to the mean unit key of its row and KV head (padding left out). Needs no attention at all."""

    needs_attention: ClassVar[bool] = False

    def rank(self, slots: dict[str, torch.Tensor], valid_seen: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(slots["keys"].float(), dim=-1)
        valid = slots["valid"][..., None].float()
        anchor = (unit * valid).sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1.0)
        return -F.cosine_similarity(unit, anchor, dim=-1)

"""Selection: which slots survive an eviction, given a score per slot (:mod:`h2o_cache.scorers` makes it).

Every policy keeps the first ``n_sink`` valid tokens and the newest ``n_recent`` valid tokens; H2O fills the rest of
the capacity with the highest-scoring tokens. Padding slots rank below everything, so they go first.
"""

from __future__ import annotations

import torch

from h2o_cache.policy import CachePolicy

_PROTECTED = torch.finfo(torch.float32).max
_DROPPED = -torch.finfo(torch.float32).max


def select_kept(
    policy: CachePolicy, valid: torch.Tensor, score: torch.Tensor | None, n_keep: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which slots survive, per row and KV head, in their original order.

    Args:
        valid: ``(batch, kv_heads, kv_len)`` bool, False for padding.
        score: ``(batch, kv_heads, kv_len)`` heavy-hitter score (None: no heavy hitters, e.g. StreamingLLM).
        n_keep: valid slots to keep per row; rows share the length ``max(n_keep)``.

    Returns:
        ``(batch, kv_heads, max(n_keep))`` int64 slot indices, ascending, and, when some row keeps fewer than
        ``max(n_keep)``, a bool tensor of the same shape that is False on the slots that row only keeps as padding.
    """
    rank = valid.to(torch.int32).cumsum(-1)  # 1-based rank among valid slots
    n_valid = rank[..., -1:]
    protected = valid & ((rank <= policy.n_sink) | (rank > n_valid - policy.n_recent))
    middle = torch.zeros_like(rank, dtype=torch.float32) if score is None else score.float()
    priority = torch.where(valid, middle, _DROPPED)
    priority = torch.where(protected, _PROTECTED, priority)
    target = max(n_keep)
    if all(k == target for k in n_keep):
        return priority.topk(target, dim=-1, sorted=False).indices.sort(dim=-1).values, None
    best = priority.topk(target, dim=-1, sorted=True).indices  # best first: a row's first n_keep[row] are kept
    ranks = torch.arange(target, device=valid.device)
    keep_valid = (ranks < torch.tensor(n_keep, device=valid.device)[:, None])[:, None, :].expand_as(best)
    order = best.argsort(dim=-1)
    return best.gather(-1, order), keep_valid.gather(-1, order)

"""Bytes a session's cache holds, from a model config and a policy, without building a model: the capacity formula
that sizing (the server's limits, Kubernetes memory, benchmarks at equal bytes) is computed from.

It reads the same per-slot fields a layer allocates (:func:`h2o_cache.cache.slot_fields`), so it cannot drift from
what :meth:`H2OCache.nbytes` reports; a test checks the two against a real cache.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from h2o_cache.cache import PAGE, slot_fields
from h2o_cache.policy import CachePolicy
from h2o_cache.quant import FloatCodec, make_codec
from h2o_cache.scorers import SCORERS


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a model config."""
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, kv_heads, head_dim


def slot_nbytes(config: PretrainedConfig, policy: CachePolicy, dtype: torch.dtype) -> int:
    """Bytes one token slot costs over all layers and KV heads (keys, values, scales, scores, bookkeeping) for a
    model computing in ``dtype``."""
    layers, kv_heads, head_dim = kv_shape(config)
    codecs = {kind: make_codec(policy.kv_dtype, dtype, head_dim, kind) for kind in ("keys", "values")}
    tracks_rotation = policy.rolling and policy.capacity is not None and codecs["keys"] != FloatCodec(dtype)
    scores = policy.needs_scores and SCORERS[policy.score_mode].needs_attention
    fields = slot_fields(codecs, {"keys": head_dim, "values": head_dim}, scores, tracks_rotation)
    per_head = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size() for shape, dt in fields.values())
    return layers * kv_heads * per_head


def session_nbytes(
    config: PretrainedConfig, policy: CachePolicy, dtype: torch.dtype, n_tokens: int | None = None
) -> int:
    """Bytes a batch-1 session holds once ``n_tokens`` tokens have gone through it (default: a full one, i.e.
    ``capacity + slack`` slots), in whole pages of :data:`~h2o_cache.cache.PAGE` slots."""
    steady = None if policy.capacity is None else policy.capacity + max(policy.slack, 1)
    if n_tokens is None:
        if steady is None:
            raise ValueError("an unbounded (full) policy has no full size: pass n_tokens")
        n_tokens = steady
    slots = -(-max(n_tokens, 1) // PAGE) * PAGE
    return (slots if steady is None else min(slots, steady)) * slot_nbytes(config, policy, dtype)

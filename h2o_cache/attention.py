"""The attention hook: an attention function and a mask function registered with transformers under ``"h2o"``.

A cache layer's ``update`` runs right before the attention call of the same layer, in the same thread, so the layer
marks itself active there and the attention function picks it up: the model's code stays untouched. Without an
active layer (another cache, or no cache) both functions fall back to transformers' SDPA path, so a model switched
to ``"h2o"`` behaves exactly as with ``"sdpa"`` until it is given an :class:`~h2o_cache.cache.H2OCache`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "h2o"

_state = threading.local()


def set_active_layer(layer) -> None:
    _state.layer = layer


def _pop_active_layer():
    layer = getattr(_state, "layer", None)
    _state.layer = None
    return layer


@contextmanager
def h2o_forward() -> Iterator[None]:
    """Marks a forward pass that runs over an H2O cache (the mask function then returns padding of new tokens)."""
    _state.in_forward = True
    _state.layer = None
    try:
        yield
    finally:
        _state.in_forward = False
        _state.layer = None


def h2o_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs):
    """Inside an H2O forward: no mask, since each layer builds its own from its slots (padding, causality among
    the new tokens). Elsewhere: transformers' SDPA mask."""
    if getattr(_state, "in_forward", False):
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs
    )


def h2o_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention through the active H2O layer (scores + eviction), else plain SDPA."""
    layer = _pop_active_layer()
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None:
        raise ValueError("an H2O cache builds its own masks; pass a 2D padding attention_mask, not a 4D mask")
    return layer.attend(query, scaling, kwargs.get("sliding_window")), None


def register() -> None:
    """Make ``"h2o"`` a valid ``attn_implementation`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, h2o_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, h2o_mask)

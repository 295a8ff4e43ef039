"""Turn an :class:`H2OCache` into plain tensors + JSON metadata and back (for safetensors snapshots, no pickle)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PreTrainedModel

from h2o_cache.cache import H2OCache
from h2o_cache.patch import make_cache
from h2o_cache.policy import CachePolicy

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
"""Format 1 (before kv_dtype): int64 positions, the model's dtype; it loads as ``kv_dtype="auto"``."""


def cache_state(cache: H2OCache) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every layer's :meth:`~h2o_cache.cache.H2OLayer.state_dict`, tensors named ``layers.{i}.{name}``."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        layer_tensors, layer_meta = layer.state_dict()
        layers.append(layer_meta)
        tensors.update({f"layers.{i}.{name}": tensor for name, tensor in layer_tensors.items()})
    meta = {"format": FORMAT_VERSION, "policy": dataclasses.asdict(cache.policy), "layers": layers}
    return tensors, meta


def restore_cache(model: PreTrainedModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> H2OCache:
    """Rebuild a cache saved by :func:`cache_state` for ``model`` (on the model's device)."""
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"unsupported cache snapshot format {meta.get('format')!r}")
    cache = make_cache(model, CachePolicy(**meta["policy"]))
    if len(meta["layers"]) != len(cache.layers):
        raise ValueError(f"snapshot has {len(meta['layers'])} layers, the model {len(cache.layers)}")
    for i, (layer, info) in enumerate(zip(cache.layers, meta["layers"])):
        prefix = f"layers.{i}."
        layer_tensors = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        layer.load_state_dict(layer_tensors, info, model.dtype, model.device)
    return cache

"""Turn an :class:`H2OCache` into plain tensors + JSON metadata and back (for safetensors snapshots, no pickle)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PreTrainedModel

from h2o_cache.cache import H2OCache
from h2o_cache.patch import make_cache
from h2o_cache.policy import CachePolicy

FORMAT_VERSION = 1


def cache_state(cache: H2OCache) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The slots in use of every layer (``layers.{i}.{name}``) and the counters needed to continue exactly."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        layers.append({"length": layer.length, "seen": layer.seen, "row_valid": layer.row_valid,
                       "row_evicted": layer.row_evicted, "has_padding": layer.has_padding,
                       "initialized": layer.is_initialized})
        if layer.is_initialized:
            for name in layer._slots:
                tensors[f"layers.{i}.{name}"] = layer.slot(name).to("cpu", copy=True)
            tensors[f"layers.{i}.valid_seen"] = layer._valid_seen.to("cpu", copy=True)
    meta = {"format": FORMAT_VERSION, "policy": dataclasses.asdict(cache.policy), "layers": layers}
    return tensors, meta


def restore_cache(model: PreTrainedModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> H2OCache:
    """Rebuild a cache saved by :func:`cache_state` for ``model`` (on the model's device)."""
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported cache snapshot format {meta.get('format')!r}")
    cache = make_cache(model, CachePolicy(**meta["policy"]))
    if len(meta["layers"]) != len(cache.layers):
        raise ValueError(f"snapshot has {len(meta['layers'])} layers, the model {len(cache.layers)}")
    device = model.device
    for i, (layer, info) in enumerate(zip(cache.layers, meta["layers"])):
        if not info["initialized"]:
            continue
        keys = tensors[f"layers.{i}.keys"].to(device)
        layer.lazy_initialization(keys, tensors[f"layers.{i}.values"].to(device))
        if info["length"] > layer.n_slots:
            layer._allocate(keys, tensors[f"layers.{i}.values"], info["length"])
        layer.length = info["length"]
        for name, slots in layer._slots.items():
            slots[:, :, : layer.length] = tensors[f"layers.{i}.{name}"].to(device)
        layer._valid_seen = tensors[f"layers.{i}.valid_seen"].to(device, copy=True)
        layer.seen, layer.has_padding = info["seen"], info["has_padding"]
        layer.row_valid, layer.row_evicted = list(info["row_valid"]), list(info["row_evicted"])
        layer._refresh_views()
    return cache

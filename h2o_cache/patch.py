"""Install the H2O cache on a model: ``make_cache`` and the seed-style ``enable_*`` / ``disable_*`` helpers.

Installing switches the model's attention implementation to ``"h2o"`` and wraps its ``forward`` so that, whenever
the cache is an :class:`H2OCache`, (1) long inputs run in chunks of ``policy.chunk_size`` with eviction between
them and (2) with position rolling, new tokens get positions inside the cache instead of absolute ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from h2o_cache import attention
from h2o_cache.cache import H2OCache
from h2o_cache.policy import CachePolicy
from h2o_cache.rope import RotaryDelta
from h2o_cache.scorers import Scorer

_ORIGINAL_FORWARD = "_h2o_original_forward"
_PREVIOUS_ATTN = "_h2o_previous_attn_implementation"
_DEFAULT_POLICY = "_h2o_default_policy"


def _as_policy(policy: CachePolicy | str, options: dict[str, Any]) -> CachePolicy:
    if isinstance(policy, CachePolicy):
        return policy.replace(**options) if options else policy
    return CachePolicy.parse(policy, **options)


def install(model: PreTrainedModel) -> None:
    """Register the hook and wrap ``model.forward`` (idempotent)."""
    attention.register()
    if model.config._attn_implementation != attention.ATTN_IMPLEMENTATION:
        setattr(model, _PREVIOUS_ATTN, model.config._attn_implementation)
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    if not hasattr(model, _ORIGINAL_FORWARD):
        original = model.forward
        setattr(model, _ORIGINAL_FORWARD, original)
        model.forward = functools.wraps(original)(functools.partial(_forward, model, original))


def uninstall(model: PreTrainedModel) -> None:
    """Undo :func:`install`: original forward and attention implementation, no default policy."""
    if hasattr(model, _ORIGINAL_FORWARD):
        del model.forward  # the instance attribute shadows the class method
        delattr(model, _ORIGINAL_FORWARD)
    if hasattr(model, _PREVIOUS_ATTN):
        model.set_attn_implementation(getattr(model, _PREVIOUS_ATTN))
        delattr(model, _PREVIOUS_ATTN)
    if hasattr(model, _DEFAULT_POLICY):
        delattr(model, _DEFAULT_POLICY)


def _new_cache(model: PreTrainedModel, policy: CachePolicy, scorers: Sequence[Scorer] | None = None) -> H2OCache:
    needs_rotary = policy.rolling and policy.capacity is not None
    rotary = RotaryDelta.from_model(model) if needs_rotary else None
    return H2OCache(policy, model.config.get_text_config().num_hidden_layers, rotary, scorers)


def make_cache(
    model: PreTrainedModel, policy: CachePolicy | str = "full", scorers: Sequence[Scorer] | None = None, **options: Any
) -> H2OCache:
    """Install what the model needs (idempotent) and return a fresh cache for ``policy``.

    ``scorers`` (one per layer) rank heavy hitters instead of the rule ``score_mode`` names, e.g. a custom
    :class:`~h2o_cache.scorers.Scorer`. ``options`` override policy fields (``score_mode``, ``slack``,
    ``chunk_size``, ``rolling``).
    """
    policy = _as_policy(policy, options)
    install(model)
    return _new_cache(model, policy, scorers)


def enable_h2o_llm(
    model: PreTrainedModel, n_sink: int = 8, recent_window: int = 32, max_capacity: int = 256, **options: Any
) -> CachePolicy:
    """Make plain ``model.generate()`` / ``model(...)`` use an H2O cache when no cache is passed."""
    return _enable(model, CachePolicy.h2o(n_sink, recent_window, max_capacity, **options))


def enable_streaming_llm(
    model: PreTrainedModel, n_sink: int = 4, window_size: int = 256, **options: Any
) -> CachePolicy:
    """Make plain ``model.generate()`` / ``model(...)`` use a StreamingLLM cache when no cache is passed."""
    return _enable(model, CachePolicy.streaming(n_sink, window_size, **options))


def disable_streaming_llm(model: PreTrainedModel) -> None:
    """Back to the model's own full cache and attention; the model is otherwise untouched."""
    uninstall(model)


def _enable(model: PreTrainedModel, policy: CachePolicy) -> CachePolicy:
    _new_cache(model, policy)  # fail now, not at generate time, on a model that cannot roll positions
    install(model)
    setattr(model, _DEFAULT_POLICY, policy)
    return policy


def _forward(model: PreTrainedModel, original, *args, **kwargs):
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
        if args:
            raise TypeError("pass arguments other than input_ids by keyword to an H2O-enabled model")
    cache = kwargs.get("past_key_values")
    default = getattr(model, _DEFAULT_POLICY, None)
    fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
    if default is not None and fresh and kwargs.get("use_cache", True) is not False:
        cache = kwargs["past_key_values"] = _new_cache(model, default)
    if not isinstance(cache, H2OCache):
        return original(**kwargs)
    return _chunked_forward(original, cache, kwargs)


def _chunked_forward(original, cache: H2OCache, kwargs: dict[str, Any]):
    """Run the input in chunks of ``chunk_size``; the returned output is the last chunk's (logits of all chunks are
    concatenated when the caller asked for every position's logits)."""
    name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    inputs = kwargs[name]
    q = inputs.shape[1]
    chunk = cache.policy.chunk_size
    mask = kwargs.get("attention_mask")
    keep = kwargs.get("logits_to_keep", 0)
    if q > chunk and kwargs.get("labels") is not None:
        raise ValueError(f"labels are not supported for inputs longer than chunk_size ({chunk})")
    all_logits, out = [], None
    for start in range(0, q, chunk):
        end = min(q, start + chunk)
        step = dict(kwargs)
        step[name] = inputs[:, start:end]
        if mask is not None and mask.dim() == 2:
            step["attention_mask"] = mask[:, : mask.shape[1] - q + end]
        if end < q and keep != 0:
            step["logits_to_keep"] = 1  # only the last chunk's logits are returned
        out = _step(original, cache, step, name)
        if keep == 0 and getattr(out, "logits", None) is not None:
            all_logits.append(out.logits)
    if len(all_logits) > 1:
        out.logits = torch.cat(all_logits, dim=1)
    return out


def _step(original, cache: H2OCache, kwargs: dict[str, Any], name: str):
    """One forward of at most ``chunk_size`` tokens: room in the cache, positions from it, the hook marked active."""
    inputs = kwargs[name]
    q = inputs.shape[1]
    mask = kwargs.get("attention_mask")
    new_valid = mask[:, -q:].to(torch.bool) if mask is not None and mask.dim() == 2 else None
    cache.begin_forward(new_valid, q)
    kwargs["position_ids"] = cache.next_positions(new_valid, q, inputs.device)
    with attention.h2o_forward():
        return original(**kwargs)

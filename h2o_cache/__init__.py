"""h2o_cache: bounded KV caches (H2O, StreamingLLM) with position rolling for transformers."""
# TEMPORARY placeholder while the real cache is being written: make_cache returns a DynamicCache.
from transformers import DynamicCache

from h2o_cache.loading import load_model
from h2o_cache.policy import CachePolicy


def make_cache(model, policy):
    if isinstance(policy, str):
        policy = CachePolicy.parse(policy)
    return DynamicCache(config=model.config)


__all__ = ["CachePolicy", "make_cache", "load_model"]

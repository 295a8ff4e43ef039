"""h2o_cache: bounded KV caches (H2O, StreamingLLM) with position rolling, as a transformers ``Cache``."""

from h2o_cache.cache import H2OCache, H2OLayer
from h2o_cache.loading import load_model
from h2o_cache.patch import disable_streaming_llm, enable_h2o_llm, enable_streaming_llm, make_cache
from h2o_cache.policy import CachePolicy
from h2o_cache.rope import RotaryDelta
from h2o_cache.scorers import SCORERS, EmaScorer, KeyDiffScorer, MeanScorer, Scorer, SumScorer, TovaScorer
from h2o_cache.snapshot import cache_state, restore_cache
from h2o_cache.weights import Int4WeightLinear, Int8WeightLinear, quantize_weights

__all__ = [
    "SCORERS",
    "CachePolicy",
    "EmaScorer",
    "H2OCache",
    "H2OLayer",
    "Int4WeightLinear",
    "Int8WeightLinear",
    "KeyDiffScorer",
    "MeanScorer",
    "RotaryDelta",
    "Scorer",
    "SumScorer",
    "TovaScorer",
    "cache_state",
    "disable_streaming_llm",
    "enable_h2o_llm",
    "enable_streaming_llm",
    "load_model",
    "make_cache",
    "quantize_weights",
    "restore_cache",
]

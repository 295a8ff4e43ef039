"""With eviction, the cache keeps the same tokens and gives the same logits as the plain reference of each policy
(every eviction rule: test_scorers.py)."""

from __future__ import annotations

import pytest

from h2o_cache import CachePolicy

from .reference import assert_matches_reference

CASES = [
    ("streaming_4_24", dict(slack=0)),
    ("streaming_4_24", dict(slack=6)),
    ("h2o_4_6_24", dict(slack=0)),
]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("rolling", [True, False])
@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("causal_block", [128, 3])  # 3: a chunk's queries in blocks, each over its causal keys only
def test_matches_naive_reference(family, rolling, name, options, causal_block, monkeypatch):
    monkeypatch.setattr("h2o_cache.cache._CAUSAL_BLOCK", causal_block)
    assert_matches_reference(family, CachePolicy.parse(name, rolling=rolling, chunk_size=8, **options))

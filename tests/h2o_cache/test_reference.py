"""With eviction, the cache keeps the same tokens and gives the same logits as the plain reference of each policy."""

from __future__ import annotations

import pytest
import torch

from h2o_cache import CachePolicy, make_cache

from .models import VOCAB, tiny_model
from .reference import ReferencePolicy

CASES = [
    ("streaming_4_24", dict(slack=0)),
    ("streaming_4_24", dict(slack=6)),
    ("h2o_4_6_24", dict(score_mode="sum", slack=0)),
    ("h2o_4_6_24", dict(score_mode="mean", slack=0)),
    ("h2o_2_6_20", dict(score_mode="mean", slack=5)),
    ("h2o_2_6_20", dict(score_mode="sum", slack=5)),
    ("h2o_2_6_20", dict(score_mode="ema", decay=0.9, slack=5)),
]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("rolling", [True, False])
@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("causal_block", [128, 3])  # 3: a chunk's queries in blocks, each over its causal keys only
def test_matches_naive_reference(family, rolling, name, options, causal_block, monkeypatch):
    monkeypatch.setattr("h2o_cache.cache._CAUSAL_BLOCK", causal_block)
    model = tiny_model(family, dtype=torch.float64)
    policy = CachePolicy.parse(name, rolling=rolling, chunk_size=8, **options)
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, 30))  # 4 chunks of 8: eviction inside the prefill too
    steps = torch.randint(0, VOCAB, (1, 25))
    reference = ReferencePolicy(model, policy)
    cache = make_cache(model, policy)
    with torch.no_grad():
        want = [reference.forward(prompt)[:, -1]]
        got = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(steps.shape[1]):
            want.append(reference.forward(steps[:, i : i + 1])[:, -1])
            got.append(model(steps[:, i : i + 1], past_key_values=cache, use_cache=True).logits[:, -1])
            for layer_idx, layer in enumerate(cache.layers):
                kept = layer.slot("position")[0]
                for head in range(kept.shape[0]):
                    assert kept[head].tolist() == reference.kept(layer_idx, head), (i, layer_idx, head)
    assert cache.evicted_tokens > 0
    # fp64 model, but transformers computes RoPE angles in fp32: agreement to ~1e-8, not 1e-15.
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sign,middle", [(-1.0, list(range(2, 8))), (1.0, list(range(10, 16)))])
def test_eviction_score_replaced_on_a_layer_decides_the_heavy_hitters(sign, middle):
    """A layer's ``eviction_score`` is the one ranking of heavy-hitter candidates (benchmarks/oracle.py replaces it):
    ranking by -position keeps the oldest middle tokens, by +position the newest, around the sinks and recent."""
    model = tiny_model("llama")
    policy = CachePolicy.parse("h2o_2_4_12", slack=0, chunk_size=4)
    cache = make_cache(model, policy)
    for layer in cache.layers:
        layer.eviction_score = lambda slots, valid_seen: sign * slots["position"].float()
    torch.manual_seed(3)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 20)), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        for head in layer.slot("position")[0].tolist():
            assert head == [0, 1] + middle + [16, 17, 18, 19]

"""Every eviction rule of h2o_cache.scorers through the same checks (a new rule = one row in RULES): the cache keeps
what the plain reference keeps, and a pool's rows keep what each session keeps alone. Plus a custom Scorer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from h2o_cache import SCORERS, CachePolicy, H2OCache, Scorer, make_cache

from .models import VOCAB, tiny_model
from .reference import assert_matches_reference

RULES = {  # rule -> policy options it needs
    "sum": {},
    "mean": {},
    "ema": {"decay": 0.9},
    "tova": {},
    "keydiff": {},
}


def test_every_registered_rule_has_a_row():
    assert set(RULES) == set(SCORERS)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("rolling", [True, False])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("causal_block", [128, 3])  # 3: a chunk's queries in blocks, each over its causal keys only
def test_rule_matches_naive_reference(family, rolling, rule, causal_block, monkeypatch):
    monkeypatch.setattr("h2o_cache.cache._CAUSAL_BLOCK", causal_block)
    policy = CachePolicy.parse("h2o_2_6_20", score_mode=rule, rolling=rolling, slack=5, chunk_size=8, **RULES[rule])
    assert_matches_reference(family, policy)


# Tokens per row and forward after prompts of 20 and 33 (row 1 is then at capacity + slack): the rows cut at
# different steps; row 1 sits 12 steps out (padding) and is cut right after, before a 3-token chunk beside row 0's
# single token, so a rule must leave a padded row's state as it was.
SCHEDULE = [(1, 1)] * 4 + [(1, 0)] * 12 + [(1, 3)] + [(0, 1)] * 2 + [(1, 1)] * 10


@pytest.mark.parametrize("rule", RULES)
def test_rule_in_a_pool_keeps_what_each_session_keeps_alone(rule, monkeypatch):
    monkeypatch.setattr("h2o_cache.cache._CAUSAL_BLOCK", 2)
    model = tiny_model("llama", dtype=torch.float64)
    policy = CachePolicy.parse("h2o_4_6_24", score_mode=rule, slack=5, chunk_size=16, **RULES[rule])
    torch.manual_seed(4)
    streams = [torch.randint(1, VOCAB, (1, 60)) for _ in range(2)]
    with torch.no_grad():
        sessions = [make_cache(model, policy) for _ in range(2)]
        for cache, stream, n in zip(sessions, streams, (20, 33)):
            model(stream[:, :n], past_key_values=cache, use_cache=True)
        pool = H2OCache.pool(model, policy, batch=2, rotary=sessions[0].layers[0].rotary)
        for row, cache in enumerate(sessions):
            pool.insert(row, cache)
        fed = [20, 33]
        for counts in SCHEDULE:
            q = max(counts)
            ids, mask = torch.zeros(2, q, dtype=torch.long), torch.zeros(2, q, dtype=torch.long)
            for row, c in enumerate(counts):
                if c:
                    ids[row, q - c :], mask[row, q - c :] = streams[row][0, fed[row] : fed[row] + c], 1
            got = model(ids, attention_mask=mask, past_key_values=pool, use_cache=True).logits[:, -1]
            for row, c in enumerate(counts):
                if c:
                    chunk = streams[row][:, fed[row] : fed[row] + c]
                    want = model(chunk, past_key_values=sessions[row], use_cache=True).logits[0, -1]
                    torch.testing.assert_close(got[row], want, rtol=1e-6, atol=1e-7)  # RoPE angles are fp32
                    fed[row] += c
        for row, cache in enumerate(sessions):
            alone = pool.extract(row)
            for mine, theirs in zip(alone.layers, cache.layers):
                assert mine.slot("position").tolist() == theirs.slot("position").tolist(), row
                if mine.scorer.needs_attention:  # a rule without attention stores no scores
                    torch.testing.assert_close(mine.slot("scores"), theirs.slot("scores"), rtol=1e-5, atol=1e-7)
    assert all(cache.evicted_tokens > 0 for cache in sessions)


@dataclass
class ByPosition(Scorer):
    """Ranks by ``sign`` x original position; needs no attention, so the layers run plain SDPA."""

    sign: float
    needs_attention: ClassVar[bool] = False

    def rank(self, slots: dict[str, torch.Tensor], valid_seen: torch.Tensor) -> torch.Tensor:
        return self.sign * slots["position"].float()


@pytest.mark.parametrize("sign,middle", [(-1.0, list(range(2, 8))), (1.0, list(range(10, 16)))])
def test_a_custom_scorer_decides_the_heavy_hitters(sign, middle):
    """Ranking by -position keeps the oldest middle tokens, by +position the newest, around the sinks and recent."""
    model = tiny_model("llama")
    scorers = [ByPosition(sign)] * model.config.num_hidden_layers
    cache = make_cache(model, "h2o_2_4_12", scorers=scorers, slack=0, chunk_size=4)
    torch.manual_seed(3)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 20)), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        for head in layer.slot("position")[0].tolist():
            assert head == [0, 1] + middle + [16, 17, 18, 19]


def test_one_scorer_per_layer():
    with pytest.raises(ValueError, match="1 scorers for 2 layers"):
        make_cache(tiny_model("llama"), "h2o_2_4_12", scorers=[ByPosition(1.0)])

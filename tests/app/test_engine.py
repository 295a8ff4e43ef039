"""Sampling: greedy, top-k, top-p, seeds and suppressed tokens; the fast nucleus search against a naive one."""

import pytest
import torch

from app.sampling import SamplingParams, candidates, sample


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 200, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample(logits, params, generator, []) for _ in range(n)]


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def test_temperature_zero_is_argmax():
    assert draws(LOGITS, SamplingParams(8, temperature=0.0), n=3) == [0, 0, 0]


def test_top_k_and_top_p_restrict_the_candidates():
    assert set(draws(LOGITS, SamplingParams(8, temperature=1.0, top_k=2))) == {0, 1}
    probs = LOGITS.softmax(-1)  # 0.56, 0.21, 0.13, ...: the nucleus of 0.7 is the first two tokens
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert set(draws(LOGITS, SamplingParams(8, temperature=1.0, top_p=0.7))) == {0, 1}
    assert set(draws(LOGITS, SamplingParams(8, temperature=1.0))) == {0, 1, 2, 3, 4}


def test_same_seed_same_draws():
    params = SamplingParams(8, temperature=1.5)
    assert draws(LOGITS, params, seed=7) == draws(LOGITS, params, seed=7) != draws(LOGITS, params, seed=8)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_suppressed_tokens_are_never_picked(temperature):
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(8, temperature=temperature)
    assert all(sample(LOGITS, params, generator, [0, 1]) in (2, 3, 4) for _ in range(100))


def naive_candidates(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The textbook filter on the whole vocabulary in float64 (top-k mask, full sort, nucleus, renormalise): the
    probability of every token, 0 outside the candidates."""
    scaled = logits.double() / params.temperature
    if 0 < params.top_k < len(scaled):
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, params.top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1)
    if params.top_p < 1:
        order = probs.argsort(descending=True)
        beyond = order[probs[order].cumsum(-1) - probs[order] > params.top_p]
        probs[beyond] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("spread", [0.5, 4.0], ids=["wide-nucleus", "narrow-nucleus"])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 1.0), (50, 0.8), (1000, 0.95), (1000, 1.0)])
def test_candidates_match_a_full_sort_on_a_large_vocabulary(spread, top_k, top_p):
    # spread 0.5 puts thousands of tokens in the nucleus (past the probe: the full-sort fallback), 4.0 a handful.
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(1)) * spread
    params = SamplingParams(8, temperature=0.7, top_k=top_k, top_p=top_p)
    ids, probs = candidates(logits, params)
    got = torch.zeros(len(logits), dtype=torch.float64)
    got[slice(None) if ids is None else ids] = probs.double()
    want = naive_candidates(logits, params)
    assert torch.equal(got > 0, want > 0)
    assert (got - want).abs().max() < 1e-6
    if top_p < 1 and spread == 0.5 and not top_k:
        assert (want > 0).sum() > 256  # the case the probe cannot settle


def test_a_vanishing_temperature_is_greedy_without_nan():
    params = SamplingParams(8, temperature=1e-300)
    assert draws(LOGITS, params, n=20) == [0] * 20

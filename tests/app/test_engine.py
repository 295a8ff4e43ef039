"""Sampling: greedy, top-k, top-p, seeds and suppressed tokens."""

import pytest
import torch

from app.engine import SamplingParams, sample


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

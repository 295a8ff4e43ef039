"""The budget holds over long runs: 10,000 decode steps and a 20,000-token prompt."""

from __future__ import annotations

import torch

from h2o_cache import H2OLayer, make_cache
from h2o_cache.cache import PAGE

from .models import VOCAB, tiny_model


def _check_layer(layer: H2OLayer, bound: int, n_sink: int, n_recent: int) -> None:
    assert layer.length <= bound
    kept = layer.slot("position")
    sinks = torch.arange(n_sink)
    recent = torch.arange(layer.seen - n_recent, layer.seen)
    assert torch.equal(kept[..., :n_sink], sinks.expand_as(kept[..., :n_sink]))
    assert torch.equal(kept[..., -n_recent:], recent.expand_as(kept[..., -n_recent:]))


def test_ten_thousand_decode_steps_stay_in_budget():
    model = tiny_model("llama", layers=1)
    cache = make_cache(model, "h2o_4_16_64", slack=16)
    step = torch.zeros(1, 1, dtype=torch.long)
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (10_000,))
    with torch.no_grad():
        for i, token in enumerate(tokens):
            step[0, 0] = token
            model(step, past_key_values=cache, use_cache=True)
            if i >= 64:
                _check_layer(cache.layers[0], 64 + 16, 4, 16)
    assert cache.get_seq_length() == 10_000
    assert cache.evicted_tokens == 10_000 - cache.kept_tokens()


def test_twenty_thousand_token_prompt_is_chunked_within_budget():
    model = tiny_model("llama")
    cache = make_cache(model, "h2o_4_16_64", slack=16, chunk_size=256)
    peak = {"len": 0}
    original = H2OLayer.update

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        peak["len"] = max(peak["len"], self.length)
        return out

    H2OLayer.update = spy
    try:
        with torch.no_grad():
            out = model(torch.randint(0, VOCAB, (1, 20_000)), past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        H2OLayer.update = original
    assert out.logits.shape == (1, 1, VOCAB)
    assert peak["len"] <= 64 + max(16, 256)  # inside the chunked prefill
    for layer in cache.layers:
        _check_layer(layer, 64 + 16, 4, 16)  # once the forward returns
        assert layer.n_slots == min(PAGE * -(-layer.length // PAGE), 64 + 16)  # a chunk grows them for its forward only
    assert cache.get_seq_length() == 20_000

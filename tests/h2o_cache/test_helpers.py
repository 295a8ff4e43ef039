"""The seed-style helpers turn plain `model.generate()` into a bounded-cache generate, and back."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from h2o_cache import H2OCache, disable_streaming_llm, enable_h2o_llm, enable_streaming_llm

from .models import VOCAB, tiny_model

GEN = dict(max_new_tokens=80, do_sample=False, return_dict_in_generate=True, pad_token_id=0)


def test_enable_h2o_makes_plain_generate_bounded():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 50))
    with torch.no_grad():
        before = model.generate(ids, **GEN)
        enable_h2o_llm(model, n_sink=4, recent_window=8, max_capacity=32, slack=8)
        bounded = model.generate(ids, **GEN)
        disable_streaming_llm(model)
        after = model.generate(ids, **GEN)
    cache = bounded.past_key_values
    assert isinstance(cache, H2OCache) and cache.policy.name == "h2o_4_8_32"
    assert cache.get_seq_length() == 129 and cache.kept_tokens() <= 40 and cache.evicted_tokens > 0
    assert not torch.equal(bounded.sequences, before.sequences)  # 32 of 129 tokens kept: the output changes
    assert isinstance(after.past_key_values, DynamicCache)
    assert torch.equal(after.sequences, before.sequences)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model)


def test_enable_streaming_with_sampling_keeps_window():
    model = tiny_model("qwen2")
    enable_streaming_llm(model, n_sink=4, window_size=24, slack=0)
    with torch.no_grad():
        out = model.generate(
            torch.randint(1, VOCAB, (2, 30)), **{**GEN, "do_sample": True, "top_k": 20, "max_new_tokens": 40}
        )
    cache = out.past_key_values
    assert cache.kept_tokens() == 24
    kept = cache.layers[0].slot("position")
    assert torch.equal(kept[..., :4], torch.arange(4).expand_as(kept[..., :4]))
    assert torch.equal(kept[..., 4:], torch.arange(49, 69).expand_as(kept[..., 4:]))
    disable_streaming_llm(model)

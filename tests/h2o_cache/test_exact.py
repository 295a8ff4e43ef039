"""Where nothing is evicted, every policy must give transformers' DynamicCache logits."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from h2o_cache import make_cache

from .models import VOCAB, tiny_model

POLICIES = ["full", "streaming_4_512", "h2o_4_8_512"]
FAMILIES = ["llama", "mistral", "qwen2", "gpt_neox"]  # mistral: sliding window 16, outgrown here


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = [37, 20, 29]
    ids = torch.randint(1, VOCAB, (3, max(lengths)))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return ids * mask, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("rolling", [True, False])
def test_prefill_and_decode_match_dynamic_cache_batch1(family, policy, rolling):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 45))
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        ref = [model(ids, past_key_values=ref_cache, use_cache=True).logits]
        cache = make_cache(model, policy, rolling=rolling, chunk_size=16)  # 45 tokens -> 3 chunks
        got = [model(ids, past_key_values=cache, use_cache=True).logits]
        for token in torch.randint(0, VOCAB, (12,)):
            step = token.view(1, 1)
            ref.append(model(step, past_key_values=ref_cache, use_cache=True).logits)
            got.append(model(step, past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(ref, 1), rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 57 and cache.kept_tokens() == 57 and cache.evicted_tokens == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("rolling", [True, False])
@pytest.mark.parametrize("causal_block", [128, 5])  # 5: the prompt's queries in blocks over their causal keys
def test_generate_left_padded_batch3_matches_dynamic_cache(family, policy, rolling, causal_block, monkeypatch):
    monkeypatch.setattr("h2o_cache.cache._CAUSAL_BLOCK", causal_block)
    model = tiny_model(family)
    ids, mask = _left_padded_batch()
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        got = model.generate(ids, past_key_values=make_cache(model, policy, rolling=rolling, chunk_size=16), **kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_dynamic_cache(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
        got = model(ids, past_key_values=make_cache(model, "h2o_4_8_512"), use_cache=True).logits
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)

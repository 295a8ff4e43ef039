"""The real SmolLM2-135M-Instruct (bundled GGUF): exact where nothing is evicted, bounded and sane where it is."""

from __future__ import annotations

import pytest
import torch

from h2o_cache import load_model, make_cache


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", device="cpu")


def test_generate_matches_full_cache_until_eviction(smollm2):
    model, tokenizer = smollm2
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    gen = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **gen)
        got = model.generate(ids, past_key_values=make_cache(model, "h2o_8_32_256"), **gen)
    assert torch.equal(got, ref)
    assert "paris" in tokenizer.decode(got[0, ids.shape[1] :]).lower()


def test_long_prompt_stays_bounded_and_fluent(smollm2):
    model, tokenizer = smollm2
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(300))
    ids = tokenizer(text, return_tensors="pt").input_ids  # ~4k tokens
    cache = make_cache(model, "h2o_8_32_256")
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        nll = torch.nn.functional.cross_entropy(out.logits[0, -200:-1], ids[0, -199:])
    assert cache.get_seq_length() == ids.shape[1] > 3000
    assert cache.kept_tokens() <= 256 + 64
    assert nll.exp() < 3.0  # the pattern is trivially predictable when the right tokens are kept

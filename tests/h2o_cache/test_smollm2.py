"""The real SmolLM2-135M-Instruct (bundled GGUF): exact where nothing is evicted, bounded and sane where it is."""

from __future__ import annotations

import pytest
import torch

from benchmarks.data import tokenize
from benchmarks.runner import data_available
from h2o_cache import CachePolicy, load_model, make_cache
from h2o_cache.budget import session_nbytes

pytestmark = pytest.mark.slow


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


# Measured with this protocol (768 tokens of Moby Dick, PPL of the last 512 over the same policy stored in fp32),
# full / h2o_4_128_256: int8 1.0019 / 1.0016, k8v4 1.0043 / 1.0035, int4 1.021 / 1.0035. The bounds leave ~2x room.
STORAGE_PPL_BOUND = {"int8": 1.005, "k8v4": 1.02, "int4": 1.05}


@pytest.mark.skipif(not data_available(None), reason="../shared/data not present")
@pytest.mark.parametrize("kv_dtype", sorted(STORAGE_PPL_BOUND))
def test_quantized_storage_keeps_real_text_ppl_and_holds_the_formula_bytes(smollm2, kv_dtype):
    """The real model on real prose: integer storage costs at most its documented PPL bound over the model's dtype,
    with eviction (the server's default policy) as without, and holds exactly the capacity formula's bytes."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenize(tokenizer, "moby", 768)])

    def ppl(policy: str) -> tuple[float, int]:
        cache = make_cache(model, policy, slack=64)
        with torch.no_grad():
            logits = model(ids[:, :256], past_key_values=cache, use_cache=True).logits[:, -1:]
            for start in range(256, 767, 64):
                logits = torch.cat(
                    [logits, model(ids[:, start : start + 64], past_key_values=cache, use_cache=True).logits], dim=1
                )
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 256:])
        return float(nll.exp()), cache.nbytes()

    for policy in ("full", "h2o_4_128_256"):
        base, _ = ppl(policy)
        got, nbytes = ppl(f"{policy}_{kv_dtype}")
        assert got <= base * STORAGE_PPL_BOUND[kv_dtype], (policy, got, base)
        stored = CachePolicy.parse(f"{policy}_{kv_dtype}", slack=64)
        assert nbytes == session_nbytes(model.config, stored, model.dtype, n_tokens=768)

"""A cache saved to tensors and restored continues with exactly the same logits and evictions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from h2o_cache import cache_state, make_cache, restore_cache

from .models import VOCAB, tiny_model


@pytest.mark.parametrize(
    "policy", ["full", "streaming_4_24", "h2o_4_6_24", "full_int8", "h2o_4_6_24_int4", "streaming_4_24_bf16"]
)
def test_restored_cache_continues_identically(tmp_path, policy):
    model = tiny_model("llama")
    ids, steps = torch.randint(0, VOCAB, (1, 40)), torch.randint(0, VOCAB, (30,))
    cache = make_cache(model, policy, slack=4, chunk_size=16)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        tensors, meta = cache_state(cache)
        save_file(tensors, tmp_path / "cache.safetensors")
        (tmp_path / "cache.json").write_text(json.dumps(meta))
        restored = restore_cache(
            model, load_file(tmp_path / "cache.safetensors"), json.loads((tmp_path / "cache.json").read_text())
        )
        for token in steps:
            a = model(token.view(1, 1), past_key_values=cache, use_cache=True).logits
            b = model(token.view(1, 1), past_key_values=restored, use_cache=True).logits
            assert torch.equal(a, b)
    assert restored.get_seq_length() == cache.get_seq_length() == 70
    assert restored.evicted_tokens == cache.evicted_tokens
    assert restored.kept_tokens() == cache.kept_tokens()

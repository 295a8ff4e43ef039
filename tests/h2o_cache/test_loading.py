"""Model loading options: dtype names and int8 weights."""

from __future__ import annotations

import pytest
import torch

from h2o_cache import make_cache
from h2o_cache.loading import quantize_int8, resolve_dtype

from .models import VOCAB, tiny_model


def test_dtype_names():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("int8", "cpu") is torch.float32  # int8 weights, fp32 activations and cache
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_int8_weights_replace_linears_and_stay_close():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
        quantized = quantize_int8(model)
        got = quantized(ids, past_key_values=make_cache(quantized, "h2o_4_8_24", slack=0), use_cache=True).logits
    linears = [name for name, m in quantized.named_modules() if type(m) is torch.nn.Linear]
    assert linears == ["lm_head"]  # every other Linear is int8
    assert (got - ref).abs().max() < 0.2  # one 40-token chunk sees every token: only int8 rounding differs

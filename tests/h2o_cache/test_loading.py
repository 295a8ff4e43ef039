"""Model loading options: dtype names (the weight-only int8 / int4 layers: test_weights.py)."""

from __future__ import annotations

import pytest
import torch

from h2o_cache.loading import INT4, INT8, resolve_dtype


def test_dtype_names():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype(INT8, "cpu") is torch.float32  # weight-only: fp32 activations, bf16 inside the kernels
    assert resolve_dtype(INT4, "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")

"""Weight-only int8 / int4 Linear layers (h2o_cache.weights) and the load_model precisions built on them."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from h2o_cache import make_cache
from h2o_cache.loading import load_model, tiny_llama
from h2o_cache.weights import (
    KERNEL_DTYPE,
    Int4WeightLinear,
    Int8WeightLinear,
    quantize_int4,
    quantize_int8,
    quantize_weights,
    weight_nbytes,
)

from .models import VOCAB, tiny_model


def linear(out_features: int = 96, in_features: int = 128, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(1 + 4 * torch.rand(out_features, 1))  # channels of different ranges
        layer.weight[:, 5] += 0.5  # an outlier column: groups must not share one range
    return layer


def reference_int4(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight an int4 layer should multiply by, rebuilt from its stored bf16 scales and zero points alone:
    codes 0..15 rounded against them, ``(q - 8) * scale + zero``."""
    out_features, in_features = weight.shape
    scale = scales_and_zeros[..., 0].float().t()[..., None]  # (out, groups, 1)
    zero = scales_and_zeros[..., 1].float().t()[..., None]
    groups = weight.float().reshape(out_features, -1, group_size)
    codes = ((groups - zero) / scale).round().add(8).clamp(0, 15)
    return ((codes - 8) * scale + zero).reshape(out_features, in_features)


def test_int8_linear_matches_a_dequantized_matmul():
    dense = linear(bias=True)
    layer = Int8WeightLinear(dense.weight, dense.bias)
    w = dense.weight.detach()
    scale = layer.scales.float()
    assert layer.qweight.dtype is torch.int8 and layer.scales.dtype is KERNEL_DTYPE
    deq = layer.dequantized()
    assert torch.equal(deq, layer.qweight.float() * scale[:, None])
    assert ((deq - w).abs() <= scale[:, None] * 0.5 + 1e-6).all()  # round to nearest, per output channel
    x = torch.randn(3, 5, 128)
    expected = x.to(KERNEL_DTYPE).float() @ deq.t() + dense.bias.detach()
    got = layer(x)
    assert got.shape == (3, 5, 96) and got.dtype is torch.float32  # the input's dtype comes back
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()  # bf16 output rounding only
    assert layer(x.to(torch.bfloat16)).dtype is torch.bfloat16


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_matches_a_dequantized_matmul(group_size):
    dense = linear()
    layer = Int4WeightLinear(dense.weight, group_size=group_size)
    w = dense.weight.detach()
    sz = layer.scales_and_zeros
    assert sz.shape == (128 // group_size, 96, 2) and sz.dtype is KERNEL_DTYPE
    assert layer.qweight.numel() == 96 * 128 // 2  # two codes a byte
    expected_weight = reference_int4(w, sz, group_size)
    assert torch.equal(layer.dequantized(), expected_weight)
    step = sz[..., 0].float().t().repeat_interleave(group_size, dim=1)
    assert ((expected_weight - w).abs() <= 0.6 * step).all()  # half a step, plus the bf16 zero point's rounding
    x = torch.randn(7, 128)
    expected = x.to(KERNEL_DTYPE).float() @ expected_weight.t()
    got = layer(x)
    assert got.shape == (7, 96) and got.dtype is torch.float32
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


def test_int4_refuses_groups_that_do_not_tile_the_input():
    with pytest.raises(ValueError, match="groups of 64 do not tile 96"):
        Int4WeightLinear(torch.randn(8, 96), group_size=64)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_biases_survive(kind):
    """Qwen2's q/k/v projections carry biases."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
        got = quantize_weights(copy.deepcopy(model), kind)(ids).logits
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_every_linear_is_replaced_and_the_output_projection_is_explicit():
    model, _ = tiny_llama()
    int8 = quantize_int8(copy.deepcopy(model))
    int4 = quantize_int4(copy.deepcopy(model))
    dense_head = quantize_weights(copy.deepcopy(model), "int4", output=None)
    for quantized in (int8, int4, dense_head):
        assert not [name for name, m in quantized.named_modules() if type(m) is nn.Linear and name != "lm_head"]
    assert type(int8.lm_head) is Int8WeightLinear
    assert type(int4.lm_head) is Int8WeightLinear  # int4 models keep an int8 output projection by default
    assert type(int4.model.layers[0].mlp.down_proj) is Int4WeightLinear
    assert type(dense_head.lm_head) is nn.Linear
    assert int4.get_input_embeddings().weight.dtype is torch.float32  # the (tied) input table is untouched
    sizes = {name: weight_nbytes(m) for name, m in [("fp32", model), ("int8", int8), ("int4", int4)]}
    assert sizes["fp32"]["per_token"] > 3 * sizes["int8"]["per_token"] > 3 * sizes["int4"]["per_token"] / 2


# Relative RMS error of tiny_llama's logits over fp32's, 48 tokens through an evicting H2O cache, and the share of
# positions whose argmax agrees (measured over 3 seeds: int8 0.008-0.011 and >= 0.96; int4 0.07-0.09 and >= 0.79:
# random weights are on no 4-bit grid, so int4 is coarse here). About 2x room.
LOGIT_BOUND = {"int8": (0.025, 0.9), "int4": (0.2, 0.6)}


def chunked_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits of ``ids`` fed 8 tokens a forward through an H2O cache that evicts, and the tokens it evicted."""
    cache = make_cache(model, "h2o_4_8_24", slack=0)
    with torch.no_grad():
        logits = [model(input_ids=ids[:, i : i + 8], past_key_values=cache).logits for i in range(0, ids.shape[1], 8)]
    return torch.cat(logits, 1).float(), cache.evicted_tokens


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_tiny_model_logits_stay_close(kind, compute):
    model, _ = tiny_llama()
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(1))
    ref, evicted = chunked_logits(model, ids)
    got, _ = chunked_logits(quantize_weights(copy.deepcopy(model).to(compute), kind), ids)
    assert evicted > 0
    bound, agreement = LOGIT_BOUND[kind]
    assert (got - ref).norm() / ref.norm() < bound
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > agreement


def test_no_deprecated_quantization():
    """The torch.ao quantize_dynamic path is gone: quantizing and running warn about nothing."""
    model, _ = tiny_llama()
    ids = torch.randint(0, 1000, (1, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in ("int8", "int4"):
            with torch.no_grad():
                quantize_weights(copy.deepcopy(model), kind)(ids)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], caught
    library = Path(__file__).resolve().parents[2] / "h2o_cache"
    assert not [
        p.name
        for p in library.glob("*.py")
        if "quantize_dynamic" in p.read_text() or "torch.ao.quantization" in p.read_text()
    ]


def test_refuses_other_devices():
    model = tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="CPU kernels and the model is on meta"):
        quantize_weights(model, "int8")
    with pytest.raises(ValueError, match="unknown weight-only precision 'int2'"):
        quantize_weights(tiny_model("llama"), "int2")


def test_load_model_fails_clearly():
    """Before anything loads: an unknown dtype names the choices, int8 / int4 on a GPU says to use fp16 / bf16."""
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; choose one of .*int8, int4, auto"):
        load_model("no/such-model", device="cpu", dtype="fp8")
    for kind in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"dtype '{kind}' .* needs device 'cpu', not 'cuda'"):
            load_model("no/such-model", device="cuda", dtype=kind)


def _file_mapped(tensor: torch.Tensor) -> str | None:
    """The file whose memory map holds `tensor`'s data (Linux /proc), None for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_a_quantized_model_lets_go_of_the_checkpoint(tmp_path):
    """The dense parameters left after quantizing are copied out of the checkpoint's memory map, which would otherwise
    keep every page that quantizing read resident (load_model does this for int8 / int4)."""
    from transformers import AutoModelForCausalLM

    from h2o_cache.loading import _copy_out_of_checkpoint

    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _file_mapped(model.get_input_embeddings().weight), "loading no longer maps the checkpoint: test is moot"
    quantize_int4(model)
    _copy_out_of_checkpoint(model)
    mapped = {name: _file_mapped(p) for name, p in model.named_parameters()}
    assert mapped and not any(mapped.values()), mapped

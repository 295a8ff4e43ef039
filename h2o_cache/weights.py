"""Weight-only int8 / int4 ``Linear`` layers on PyTorch's own ATen CPU kernels (no extra package).

Decoding one token reads every weight once, so on a CPU a step costs about its weight bytes over the memory
bandwidth plus Python overhead. These modules keep the weights small and multiply them with ATen's weight-only
kernels, which dequantize inside the GEMM:

* ``int8``: symmetric, one scale per output channel; ``torch.ops.aten._weight_int8pack_mm`` (1 byte a weight).
* ``int4``: asymmetric, a scale and a zero point per group of ``group_size`` input channels (default 32), packed by
  ``_convert_weight_to_int4pack_for_cpu`` and multiplied by ``_weight_int4pack_mm_for_cpu`` (0.5 byte a weight +
  4 bytes a group). The output projection is int8 unless asked otherwise (:data:`OUTPUT_PRECISION`).

Both kernels take fp32 activations but only their bf16 path is vectorized (measured on a 2-core AVX-512 Xeon, one
thread, a 1536x576 layer, one token: fp32 activations 0.53 ms (int8) / 1.4 ms (int4) against 0.045 ms in bf16,
dense fp32 0.12 ms; fp16 activations are slower still). So a layer casts its input to bf16, multiplies, and casts
the output back to the input's dtype: the rest of the model (norms, attention, the KV cache, residual stream) keeps
its own compute dtype. Scales and zero points are stored in bf16, as the kernels want, and the codes are rounded
against those bf16 values, so that the dequantized weight is exactly ``q * scale`` (int8) or
``(q - 8) * scale + zero`` (int4) with the stored numbers.

CPU only: the CUDA kernels (``_weight_int4pack_mm``, and an int8 one in recent builds) take other packings and
layouts that no machine of this project has checked, so :func:`quantize_weights` refuses other devices with a clear
error instead of guessing (use fp16 / bf16 on a GPU, where decode is not bound by weight bytes the same way).
"""

from __future__ import annotations

import torch
from torch import nn

INT8 = "int8"
INT4 = "int4"
WEIGHT_DTYPES: tuple[str, ...] = (INT8, INT4)
"""Weight-only precisions :func:`quantize_weights` knows."""

INT4_GROUP_SIZE = 32
"""Input channels per int4 scale / zero point. The kernel takes 32, 64, 128 or 256; SmolLM2's 576-wide layers take 32
or 64, at the same speed. 32 is the block of the Q4_1 GGUF the bundled weights come from, so its 4-bit grid is
recovered but for the bf16 rounding of scales and zero points (WikiText PPL within 0.1% of fp32's with an int8
``lm_head``); 64 straddles two such blocks and costs +15% PPL."""

KERNEL_DTYPE = torch.bfloat16
"""Activation, scale and zero-point dtype inside the kernels (their only vectorized path on the CPU)."""

_INT4_INNER_K_TILES = 2  # the CPU packing accepts 2, 4 or 8; the layout only matters to the CUDA kernel


class Int8WeightLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` ``(out, in)`` and one bf16 scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(KERNEL_DTYPE)
        codes = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", codes.contiguous())
        self.register_buffer("scales", scale.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 ``(out, in)`` weight this layer multiplies by."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4WeightLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = (q - 8) * scale + zero`` per group of ``group_size`` input channels, ``q`` in
    0..15 packed two to a byte in the CPU kernel's layout; bf16 scales and zero points ``(in / group, out, 2)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if group_size not in (32, 64, 128, 256) or self.in_features % group_size:
            raise ValueError(
                f"int4 groups of {group_size} do not tile {self.in_features} input channels "
                "(the kernel takes groups of 32, 64, 128 or 256 that divide the input width)"
            )
        self.group_size = group_size
        groups = weight.detach().float().reshape(self.out_features, -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp_min(1e-6).to(KERNEL_DTYPE)
        zero = (low + 8 * scale.float()).to(KERNEL_DTYPE)  # the value code 8 stands for
        codes = ((groups - zero.float()[..., None]) / scale.float()[..., None]).round().add(8).clamp(0, 15)
        codes = codes.reshape(self.out_features, self.in_features).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), _INT4_INNER_K_TILES)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 ``(out, in)`` weight this layer multiplies by: the kernel's fp32 path (exact, slow) applied to
        an identity, since the packed layout is the kernel's own."""
        eye = torch.eye(self.in_features, device=self.qweight.device)
        sz = self.scales_and_zeros.float()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, sz).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )


QUANTIZED_LINEARS = (Int8WeightLinear, Int4WeightLinear)

OUTPUT_PRECISION = INT8
"""Precision of the output projection (``lm_head``) by default, for both ``int8`` and ``int4`` models: per-channel
int8 costs SmolLM2 nothing measurable (WikiText PPL within 0.1% of fp32's), while int4 there costs +1.2% for 11 MB
less read per token (its tied embedding is not on the Q4_1 grid the rest of the GGUF is)."""


def quantize_weights(
    model: nn.Module,
    kind: str,
    group_size: int = INT4_GROUP_SIZE,
    output: str | None = OUTPUT_PRECISION,
    skip: frozenset[str] = frozenset(),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place; returns it) by its ``kind`` (``"int8"`` or ``"int4"``)
    weight-only version. ``output``: the precision of the output projection (``lm_head``; its tied input
    embeddings stay as they are), ``None`` to leave it dense; ``skip``: module names left alone. CPU only."""
    for precision in (kind, output):
        if precision is not None and precision not in WEIGHT_DTYPES:
            raise ValueError(f"unknown weight-only precision {precision!r}; choose one of {WEIGHT_DTYPES}")
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())} - {"cpu"}
    if devices:
        raise ValueError(
            f"{kind} weights run on PyTorch's CPU kernels and the model is on {', '.join(sorted(devices))}: load it "
            "on the CPU, or use fp16 / bf16 on a GPU"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in skip:
            continue
        precision = output if module is head else kind
        if precision is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if precision == INT8:
            replacement = Int8WeightLinear(module.weight, module.bias)
        else:
            replacement = Int4WeightLinear(module.weight, module.bias, group_size=group_size)
        setattr(parent, child, replacement)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every Linear, the output projection included, to weight-only int8 (see :func:`quantize_weights`)."""
    return quantize_weights(model, INT8)


def quantize_int4(model: nn.Module, group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """Every Linear to weight-only int4, the output projection to int8 (see :func:`quantize_weights`)."""
    return quantize_weights(model, INT4, group_size=group_size)


def weight_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights: ``total`` (every parameter and buffer held) and ``per_token`` (what one decode
    step reads: everything but the input embedding table, of which a step reads one row)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = embeddings.weight if embeddings is not None else None
    seen: set[int] = set()
    total = per_token = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        n = tensor.numel() * tensor.element_size()
        total += n
        if tensor is not table:
            per_token += n
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and table is not None and getattr(head, "weight", None) is table:
        per_token += table.numel() * table.element_size()  # tied: the output projection reads the whole table
    return {"total": total, "per_token": per_token}

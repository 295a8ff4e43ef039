"""KV storage precision: how a layer stores its keys and values (``CachePolicy.kv_dtype``).

A codec turns ``(batch, kv_heads, q, head_dim)`` floating-point keys or values into per-slot tensors (the codes and,
for integer storage, per-token scales) and back. Every tensor it makes has the slot layout ``(batch, kv_heads, q,
...)``, so eviction gathers codes, scales and bookkeeping alike and never re-quantizes anything.

* ``auto``/``fp32``/``bf16``/``fp16``: a cast (``auto`` = the model's dtype).
* ``int8``: asymmetric round-to-nearest per token and KV head (one fp16 scale and one fp16 zero point per
  ``head_dim`` channels): 1 byte a channel + 4 bytes a token and head.
* ``int4``: the same with 15 levels per group of 32 channels, two codes packed per byte: 0.5 byte a channel + 4 bytes
  per group. Keys are quantized per token (not per channel as in KIVI) because a per-channel scale spans many tokens,
  and those tokens are evicted one by one.
* ``k8v4``: int8 keys, int4 values. Keys carry the softmax's logits and suffer most from 4 bits (SmolLM2, full cache,
  1k tokens: int4 +1.6 to +6.5% PPL, k8v4 +0.3 to +0.9%, int8 +0.1%); values are averaged and tolerate it.

Before quantization each vector is turned by a block-diagonal Hadamard transform (orthogonal, as in QuaRot): it
spreads outlier channels over the group, which halves int4's error on SmolLM2's keys; decoding turns it back.

The affine math is torchao's ``quantize_affine`` with ``MappingType.ASYMMETRIC`` (tests check the codes against it);
it is written out here because torchao's primitives cost ~10x more per call, and a decode step quantizes one token
in every layer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

KV_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8", "k8v4", "int4")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT4_GROUP = 32
_SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24  # the smallest fp16 subnormal: a constant group decodes to its zero point


@dataclass(frozen=True)
class FloatCodec:
    """Storage in a floating-point dtype: a cast on the way in and out."""

    dtype: torch.dtype

    def encode(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-slot parts of ``x`` and what they decode to in ``dtype``."""
        stored = x.to(self.dtype)
        return {"": stored}, stored.to(dtype)

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts[""].to(dtype)

    def fields(self, head_dim: int) -> dict[str, tuple[int, torch.dtype]]:
        """Per-slot tensors of one key or value: suffix -> (trailing size, dtype)."""
        return {"": (head_dim, self.dtype)}


@functools.lru_cache(maxsize=16)
def hadamard(n: int, device: torch.device) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order ``n`` (a power of two): orthogonal and symmetric, so it
    is its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device)


@dataclass(frozen=True)
class IntCodec:
    """Asymmetric integer storage with ``bits`` per channel and one scale + zero point per ``group`` channels, of the
    vector turned by a block-diagonal Hadamard transform (blocks of ``block`` channels; 1 = none) first."""

    bits: int
    group: int
    block: int = 1

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _turn(self, x: torch.Tensor) -> torch.Tensor:
        if self.block == 1:
            return x
        h = hadamard(self.block, x.device)
        if self.block == x.shape[-1]:
            return x @ h
        return (x.unflatten(-1, (-1, self.block)) @ h).flatten(-2)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n_groups, group)`` of ``(..., channels)``, or ``x`` itself when one group spans every channel
        (its scales then keep a trailing dim of 1, the layout of the per-slot scale tensors)."""
        return x if x.shape[-1] == self.group else x.unflatten(-1, (-1, self.group))

    def _ungrouped(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return x if channels == self.group else x.flatten(-2)

    def encode(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-slot parts of ``x`` and what they decode to in ``dtype`` (computed on the way, bit for bit
        what :meth:`decode` gives: the write path of a decode step runs this once per layer, so it is lean)."""
        channels = x.shape[-1]
        grouped = self._grouped(self._turn(x if x.dtype == torch.float32 else x.float()))
        low_min, high = torch.aminmax(grouped, dim=-1, keepdim=True)
        low = low_min.to(_SCALE_DTYPE)
        low_f = low.float()
        scale = high.sub_(low_f).div_(self.levels).clamp_(min=_MIN_SCALE).to(_SCALE_DTYPE)
        scale_f = scale.float()
        codes_f = (grouped - low_f).div_(scale_f).round_().clamp_(0, self.levels)
        decoded = self._turn(self._ungrouped(torch.addcmul(low_f, codes_f, scale_f), channels))
        codes = self._ungrouped(codes_f.to(torch.uint8), channels)
        if self.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        if channels != self.group:
            low, scale = low.squeeze(-1), scale.squeeze(-1)
        return {"": codes, "_scale": scale, "_zero": low}, decoded if decoded.dtype == dtype else decoded.to(dtype)

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        codes = parts[""]
        if self.bits == 4:
            codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
        channels = codes.shape[-1]
        scale, zero = parts["_scale"].float(), parts["_zero"].float()
        if channels != self.group:
            scale, zero = scale[..., None], zero[..., None]
        out = torch.addcmul(zero, self._grouped(codes.to(torch.float32)), scale)
        return self._turn(self._ungrouped(out, channels)).to(dtype)

    def fields(self, head_dim: int) -> dict[str, tuple[int, torch.dtype]]:
        n_groups = head_dim // self.group
        return {
            "": (head_dim * self.bits // 8, torch.uint8),
            "_scale": (n_groups, _SCALE_DTYPE),
            "_zero": (n_groups, _SCALE_DTYPE),
        }


Codec = FloatCodec | IntCodec


def make_codec(kv_dtype: str, model_dtype: torch.dtype, head_dim: int, kind: str = "keys") -> Codec:
    """The codec of ``kv_dtype`` for the ``kind`` ("keys" or "values") of a model computing in ``model_dtype`` with
    ``head_dim`` channels per head."""
    if kv_dtype == "auto":
        return FloatCodec(model_dtype)
    if kv_dtype in FLOAT_DTYPES:
        return FloatCodec(FLOAT_DTYPES[kv_dtype])
    block = head_dim & -head_dim  # the largest power of two dividing head_dim
    if kv_dtype == "k8v4":
        kv_dtype = "int8" if kind == "keys" else "int4"
    if kv_dtype == "int8":  # lossless enough without the transform (SmolLM2: +0.1% PPL either way)
        return IntCodec(8, head_dim)
    if kv_dtype == "int4":
        group = INT4_GROUP if head_dim % INT4_GROUP == 0 else head_dim
        if head_dim % 2:
            raise ValueError(f"int4 storage packs two channels per byte; head_dim {head_dim} is odd")
        return IntCodec(4, group, block)
    raise ValueError(f"unknown kv_dtype {kv_dtype!r}; expected one of {KV_DTYPES}")


def slot_nbytes(codec: Codec, head_dim: int) -> int:
    """Bytes of one key or value of one slot and KV head (codes + scales)."""
    return sum(size * torch.empty(0, dtype=dtype).element_size() for size, dtype in codec.fields(head_dim).values())

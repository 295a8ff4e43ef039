"""Exact re-rotation of cached keys when position rolling moves them to new positions.

RoPE rotates each pair of rotary dims by ``position * inv_freq``; rotations compose, so a key rotated at position
``p`` becomes the key rotated at ``p + delta`` after one more rotation by ``delta * inv_freq``. That holds for every
RoPE whose frequencies do not depend on the sequence length (default, linear, llama3, yarn; yarn's attention factor
scales cos and sin equally and so commutes with the extra rotation). Dynamic NTK and LongRoPE change the
frequencies with the length, so a delta rotation would not be exact: those are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def _find_rotary(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
    return None


@dataclass
class RotaryDelta:
    """Rotates the rotary part of keys by a per-slot position delta, in fp32, with the model's own frequencies.

    Attributes:
        inv_freq: ``(rotary_dim // 2,)`` inverse frequencies (already scaled for linear/llama3/yarn).
    """

    inv_freq: torch.Tensor

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    @classmethod
    def from_model(cls, model: nn.Module) -> RotaryDelta:
        """Read the frequencies of the model's rotary embedding; refuse RoPE types where a delta is inexact."""
        rope_type = _rope_type(model.config.get_text_config())
        if rope_type not in EXACT_ROPE_TYPES:
            raise ValueError(
                f"position rolling needs a RoPE whose frequencies do not depend on the sequence length; "
                f"{rope_type!r} is not supported (supported: {', '.join(EXACT_ROPE_TYPES)}). Use rolling=False."
            )
        rotary = _find_rotary(model)
        if rotary is None:
            raise ValueError(
                f"{type(model).__name__} has no rotary embedding (no `inv_freq` buffer): position rolling needs "
                "RoPE. Use rolling=False."
            )
        return cls(inv_freq=rotary.inv_freq.detach().float().clone())

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Return ``keys`` rotated by ``delta`` positions.

        Args:
            keys: ``(batch, kv_heads, n, head_dim)``.
            delta: ``(batch, kv_heads, n)`` integer position change per slot.
        """
        r = self.rotary_dim
        inv_freq = self.inv_freq.to(keys.device)
        angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq  # (b, h, n, r/2)
        cos, sin = angles.cos(), angles.sin()
        rot = keys[..., :r].float()
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        # rotate_half convention (Llama, Qwen2, Mistral, GPT-NeoX): pairs are (i, i + r/2).
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(keys.dtype)
        if r == keys.shape[-1]:
            return out
        return torch.cat((out, keys[..., r:]), dim=-1)

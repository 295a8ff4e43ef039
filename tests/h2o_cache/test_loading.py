"""Model loading options: dtype names, the bundled model's one-time conversion (the weight-only int8 / int4
layers: test_weights.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from h2o_cache import loading
from h2o_cache.loading import INT4, INT8, resolve_dtype


def test_dtype_names():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype(INT8, "cpu") is torch.float32  # weight-only: fp32 activations, bf16 inside the kernels
    assert resolve_dtype(INT4, "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_processes_starting_together_convert_the_bundled_model_once(tmp_path, monkeypatch):
    """Two loaders on an empty cache (xdist workers, replicas sharing a volume): one converts, the other waits and
    finds the checkpoint. The fake conversion waits (1 s at most) for a second one to start, so a loader that does
    not wait is caught every time: both would convert and the second rename would fail."""
    conversions, second_started = [], threading.Event()

    class FakeModel:
        def __init__(self):
            self.config = SimpleNamespace()

        def save_pretrained(self, path):
            path.mkdir(parents=True)
            (path / "config.json").write_text("{}")

    class FakeTokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer_config.json").write_text("{}")

    def fake_model(*args, **kwargs):
        conversions.append(threading.get_ident())
        if len(conversions) > 1:
            second_started.set()
        second_started.wait(timeout=1.0)
        return FakeModel()

    monkeypatch.setattr(loading, "bundled_gguf_path", lambda: tmp_path / "x.gguf")
    # the module's names, not transformers' classes: other tests' threads may load models meanwhile
    monkeypatch.setattr(loading, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=fake_model))
    monkeypatch.setattr(loading, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: FakeTokenizer()))
    start = threading.Barrier(2)

    def convert():
        start.wait()
        return loading._convert_bundled(tmp_path / "cache")

    with ThreadPoolExecutor(2) as pool:
        targets = [f.result() for f in [pool.submit(convert) for _ in range(2)]]
    assert targets == [tmp_path / "cache" / "SmolLM2-135M-Instruct"] * 2
    assert len(conversions) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["SmolLM2-135M-Instruct"]

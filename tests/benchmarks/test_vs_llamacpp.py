"""benchmarks/vs_llamacpp.py: where llama-server is looked for (in order), and the smoke run end to end on real
server processes (ours on a tiny random Llama; llama-server on the bundled GGUF when a binary is found)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from benchmarks import llamacpp, vs_llamacpp


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def no_builder(*args, **kwargs):
    raise AssertionError("must not build")


def test_finder_order(tmp_path):
    named = executable(tmp_path / "named" / "llama-server")
    on_path = executable(tmp_path / "path" / "llama-server")
    root = tmp_path / "cache"
    cached = executable(llamacpp.cached_binary(root))

    def which(name):
        return str(on_path)

    def find(env, which, build=False, builder=no_builder, cuda=False):
        return llamacpp.find_llama_server(env=env, which=which, root=root, build=build, cuda=cuda, builder=builder)

    # 1. $LLAMA_SERVER wins over everything, and a bad one is an error rather than a silent fallback
    assert find({"LLAMA_SERVER": str(named)}, which) == llamacpp.Found(named, "$LLAMA_SERVER")
    with pytest.raises(llamacpp.LlamaServerNotFound, match="not an executable"):
        find({"LLAMA_SERVER": str(tmp_path / "missing")}, which)
    # 2. PATH, then 3. the cached build
    assert find({}, which) == llamacpp.Found(on_path, "PATH")
    assert find({"LLAMA_SERVER": " "}, lambda name: None) == llamacpp.Found(cached, "cache")
    # the CUDA build has its own cache folder
    with pytest.raises(llamacpp.LlamaServerNotFound):
        find({}, lambda name: None, cuda=True)
    # 4. nothing: an error that says how to get one, or a build when asked for
    cached.unlink()
    with pytest.raises(llamacpp.LlamaServerNotFound) as missing:
        find({}, lambda name: None)
    message = str(missing.value)
    assert "--build" in message and "LLAMA_SERVER=" in message and "--ours-only" in message

    built = []

    def builder(where, cuda=False):
        built.append((where, cuda))
        return executable(llamacpp.cached_binary(where, cuda))

    assert find({}, lambda name: None, build=True, builder=builder) == llamacpp.Found(cached, "built")
    assert built == [(root, False)]
    # once built, the cache answers without building again
    assert find({}, lambda name: None, build=True) == llamacpp.Found(cached, "cache")


def test_cmake_args():
    x86 = llamacpp.cmake_args(machine="x86_64")
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in x86  # would download the web UI at build time
    assert any("-mno-amx-int8" in a for a in x86)  # ggml's AMX kernels crash on this project's CPU
    assert not any("amx" in a for a in llamacpp.cmake_args(machine="aarch64"))
    assert "-DGGML_CUDA=ON" in llamacpp.cmake_args(cuda=True) and "-DGGML_CUDA=ON" not in x86


def test_stream_timing_and_percentiles():
    s = vs_llamacpp.Stream(10.0, [10.5, 10.6, 10.8, 10.9], "abcd", {}, "length", None, None)
    assert s.ttft == pytest.approx(0.5)
    assert s.tpot_median == pytest.approx(0.1) and s.tpot_mean == pytest.approx(0.4 / 3)
    assert vs_llamacpp.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert vs_llamacpp.percentile([1.0, 2.0], 95) == pytest.approx(1.95)


@pytest.mark.process
def test_smoke(tmp_path):
    """Two weight precisions side by side (one server each), both policies in the single stream, the default one in
    the chats; llama.cpp too where a binary is found."""
    argv = ["--smoke", "--chats", "2", "--dtype", "fp32,bf16", "--chat-policies", "default", "--out", str(tmp_path)]
    vs_llamacpp.main(argv)
    result = json.loads((tmp_path / "vs_llamacpp.json").read_text())
    with_llama = result["meta"]["llama_device"] is not None
    llama = {"llama.cpp"} if with_llama else set()
    single = result["single"]
    assert {r["engine"] for r in single} == {"ours@fp32", "ours-full@fp32", "ours@bf16", "ours-full@bf16"} | llama
    assert {r["context"] for r in single} == {64, 128}
    for record in result["single_records"]:
        assert record["completion_tokens"] == 8 and record["tpot_s"] > 0  # forced length on every engine
        assert abs(record["prompt_tokens"] - (record["context"] - 16)) <= 2
    chats = result["chats"]
    assert {c["engine"] for c in chats} == {"ours@fp32", "ours@bf16"} | llama
    for chat in chats:
        assert chat["generated_tokens"] == 2 * 2 * 8 and chat["tokens_per_s"] > 0
        assert chat["kv_per_session"] > 0 and chat["rss_idle"] > 0
    ours = next(c for c in chats if c["engine"] == "ours@bf16")
    assert ours["policy"] and len(ours["cache_tokens_seen"]) == 2
    assert ours["label"].startswith("ours bf16, default")
    markdown = (tmp_path / "vs_llamacpp.md").read_text()
    assert "### Single stream" in markdown and "### Concurrent chats" in markdown
    if not with_llama:
        assert any("without llama.cpp" in note for note in result["notes"])

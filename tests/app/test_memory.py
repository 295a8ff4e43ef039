"""Freed memory goes back to the OS when the engine goes idle, so the process's RSS follows what sessions hold."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch

from app import engine as engine_module
from app import memory
from tests.app.conftest import generate, wait_until


@pytest.mark.skipif(memory._malloc_trim() is None, reason="no glibc malloc_trim here")
def test_release_gives_fragmented_free_heap_memory_back():
    """Small tensors freed around survivors stay in glibc's arenas (RSS does not drop) until released."""
    process = psutil.Process()
    base = process.memory_info().rss
    blocks = [torch.ones(25_000) for _ in range(2000)]  # 100 KB each: heap, not mmap
    survivors = blocks[::10]
    del blocks
    gc.collect()
    retained = process.memory_info().rss - base
    assert memory.release_freed_memory()
    after = process.memory_info().rss - base
    assert retained > 100 * 2**20 and after < retained / 2, (retained, after)
    assert len(survivors) == 200


def test_the_engine_releases_memory_when_it_goes_idle(serve, monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: calls.append(1) or True)
    server = serve()
    with server.client() as client:
        generate(client, "idle", "hello", max_new_tokens=6, temperature=0)
        generate(client, "idle", "again", max_new_tokens=6, temperature=0)
    wait_until(lambda: len(calls) >= 2)  # once after each turn (the worker goes idle after the reply is sent)
    assert len(calls) < 12

"""Giving freed memory back to the operating system when the engine goes idle.

A turn's prefill activations and its decoded working copy are freed when the turn ends, but glibc's allocator keeps
freed heap memory in its arenas, so the process's resident set would grow with what turns once used rather than with
what sessions hold (benchmarks/results/session_bytes.md measures both). ``malloc_trim(0)`` returns the free pages;
elsewhere (macOS, musl) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_memory() -> bool:
    """Return the allocator's free memory to the OS; whether anything could be released."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))

"""Every Prometheus metric of the server, in one registry per app (no per-session labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# One scale from a fast GPU (a few ms per token) to a slow CPU with a long prompt (tens of seconds to first token).
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
SNAPSHOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

OUTCOMES = ("stop", "length", "cancelled", "error", "rejected", "conflict", "invalid")
"""`h2o_requests_total` outcomes: the finish reasons, a failed generation, 429 (queue or session limit),
409 (session busy) and other 4xx."""


class Metrics:
    """The server's metrics, in a registry of their own (with the default process, platform and GC collectors)
    so several apps in one process (tests) keep separate counts. Session gauges are computed at scrape time from
    the live sessions, so they can never drift from the truth; the engine's worker sets the pool's after every
    round (the pool is the worker's alone)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.kv_cache_tokens = Gauge("h2o_kv_cache_tokens", "KV cache tokens kept over live sessions", registry=r)
        self.kv_cache_bytes = Gauge("h2o_kv_cache_bytes", "Session memory: bytes the resident sessions' KV caches "
                                    "hold (stored keys and values, scales, scores, positions)", registry=r)
        self.kv_pool_bytes = Gauge("h2o_kv_pool_bytes", "Bytes of the batching pool's shared KV cache: the rows of "
                                   "the sessions decoding in it and their decoded working copy", registry=r)
        self.sessions_active = Gauge("h2o_sessions_active", "Sessions resident in memory", registry=r)
        self.sessions_stored = Gauge("h2o_sessions_stored", "Sessions with a snapshot on disk", registry=r)
        self.sessions_restored = Counter("h2o_sessions_restored", "Sessions loaded back from their snapshot",
                                         registry=r)
        self.sessions_evicted = Counter("h2o_sessions_evicted", "Idle sessions dropped from memory (kept on disk)",
                                        registry=r)
        self.sessions_expired = Counter("h2o_sessions_expired", "Sessions deleted after their idle TTL", registry=r)
        self.snapshot_write_seconds = Histogram("h2o_snapshot_write_seconds", "Time to write one session snapshot "
                                                "durably", buckets=SNAPSHOT_BUCKETS_S, registry=r)
        self.conversation_reuse = Counter(
            "h2o_conversation_reuse", "Stateless OpenAI requests by how their conversation was found: hit (a stored "
            "session continued, only the new turn fed), miss (a new conversation), rebuild (a history no session "
            "holds as it is now: a regenerate, an edit, another replica's chat; prefilled into a new session)",
            ["outcome"], registry=r)
        for outcome in ("hit", "miss", "rebuild"):
            self.conversation_reuse.labels(outcome)
        self.snapshot_errors = Counter("h2o_snapshot_errors", "Snapshots that failed to write or to verify",
                                       ["kind"], registry=r)
        for kind in ("write", "corrupt"):
            self.snapshot_errors.labels(kind)
        self.gpu_allocated = Gauge("h2o_gpu_memory_allocated_bytes", "GPU memory allocated by tensors (0 on CPU)",
                                   registry=r)
        self.gpu_reserved = Gauge("h2o_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator (0 on CPU)",
                                  registry=r)
        self.ttft = Histogram("h2o_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram("h2o_time_per_output_token_seconds", "Mean time per output token after the first, "
                              "one observation per request", buckets=TPOT_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("h2o_prompt_tokens", "Prompt tokens fed (turn deltas only)", registry=r)
        self.generation_tokens = Counter("h2o_generation_tokens", "Tokens sampled", registry=r)
        self.requests = Counter("h2o_requests", "Generation requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.requests_running = Gauge("h2o_requests_running", "Generations being advanced", registry=r)
        self.requests_waiting = Gauge("h2o_requests_waiting", "Generations queued for a slot", registry=r)
        self.cache_evictions = Counter("h2o_cache_evictions", "KV cache tokens evicted", registry=r)
        self.gpu_allocated.set_function(lambda: _cuda_bytes(torch.cuda.memory_allocated))
        self.gpu_reserved.set_function(lambda: _cuda_bytes(torch.cuda.memory_reserved))

    def track_sessions(self, sessions: Callable[[], Iterable], stored: Callable[[], int] = lambda: 0) -> None:
        """Compute the session gauges at scrape from `sessions()` (the resident ones: objects with cache_tokens
        and cache_bytes) and `stored()` (how many have a snapshot)."""
        self.kv_cache_tokens.set_function(lambda: sum(s.cache_tokens for s in sessions()))
        self.kv_cache_bytes.set_function(lambda: sum(s.cache_bytes for s in sessions()))
        self.sessions_active.set_function(lambda: sum(1 for _ in sessions()))
        self.sessions_stored.set_function(lambda: stored())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _cuda_bytes(read: Callable[[], int]) -> float:
    return float(read()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0

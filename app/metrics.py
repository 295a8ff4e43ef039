"""Every Prometheus metric of the server, in one registry per app (no per-session labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version

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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# One scale from a fast GPU (a few ms per token) to a slow CPU with a long prompt (tens of seconds to first token).
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
SNAPSHOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
)
"""End-to-end, queue, prefill and decode times: from a queued turn that starts at once to a long reply on a CPU."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

REJECTION_REASONS = ("queue_full", "too_many_sessions", "too_many_requests", "shutting_down", "not_ready")
"""`h2o_requests_rejected_total` reasons: the `type` of every 429/503 a turn can get with Retry-After
(app.errors.retry_later); each is also counted in h2o_requests_total{outcome="rejected"}."""
BUILD_INFO_LABELS = ("version", "model", "policy", "kv_dtype", "device")

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
        self.kv_cache_bytes = Gauge(
            "h2o_kv_cache_bytes",
            "Session memory: bytes the resident sessions' KV caches "
            "hold (stored keys and values, scales, scores, positions)",
            registry=r,
        )
        self.kv_pool_bytes = Gauge(
            "h2o_kv_pool_bytes",
            "Bytes of the batching pool's shared KV cache: the rows of "
            "the sessions decoding in it and their decoded working copy",
            registry=r,
        )
        self.sessions_active = Gauge("h2o_sessions_active", "Sessions resident in memory", registry=r)
        self.sessions_stored = Gauge("h2o_sessions_stored", "Sessions with a snapshot on disk", registry=r)
        self.sessions_restored = Counter(
            "h2o_sessions_restored", "Sessions loaded back from their snapshot", registry=r
        )
        self.sessions_evicted = Counter(
            "h2o_sessions_evicted", "Idle sessions dropped from memory (kept on disk)", registry=r
        )
        self.sessions_expired = Counter("h2o_sessions_expired", "Sessions deleted after their idle TTL", registry=r)
        self.snapshot_write_seconds = Histogram(
            "h2o_snapshot_write_seconds",
            "Time to write one session snapshot durably",
            buckets=SNAPSHOT_BUCKETS_S,
            registry=r,
        )
        self.conversation_reuse = Counter(
            "h2o_conversation_reuse",
            "Stateless OpenAI requests by how their conversation was found: hit (a stored "
            "session continued, only the new turn fed), miss (a new conversation), rebuild (a history no session "
            "holds as it is now: a regenerate, an edit, another replica's chat; prefilled into a new session)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("hit", "miss", "rebuild"):
            self.conversation_reuse.labels(outcome)
        self.snapshot_errors = Counter(
            "h2o_snapshot_errors", "Snapshots that failed to write or to verify", ["kind"], registry=r
        )
        for kind in ("write", "corrupt"):
            self.snapshot_errors.labels(kind)
        self.gpu_allocated = Gauge(
            "h2o_gpu_memory_allocated_bytes", "GPU memory allocated by tensors (0 on CPU)", registry=r
        )
        self.gpu_reserved = Gauge(
            "h2o_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator (0 on CPU)", registry=r
        )
        self.ttft = Histogram(
            "h2o_time_to_first_token_seconds", "Request arrival to first token", buckets=TTFT_BUCKETS_S, registry=r
        )
        self.tpot = Histogram(
            "h2o_time_per_output_token_seconds",
            "Mean time per output token after the first, one observation per request",
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("h2o_prompt_tokens", "Prompt tokens fed (turn deltas only)", registry=r)
        self.generation_tokens = Counter("h2o_generation_tokens", "Tokens sampled", registry=r)
        self.requests = Counter("h2o_requests", "Generation requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.requests_running = Gauge("h2o_requests_running", "Generations being advanced", registry=r)
        self.requests_waiting = Gauge("h2o_requests_waiting", "Generations queued for a slot", registry=r)
        self.cache_evictions = Counter("h2o_cache_evictions", "KV cache tokens evicted", registry=r)

        # After vLLM's set (vllm:e2e_request_latency_seconds, request_queue_time_seconds ...), one per turn.
        def per_turn(name: str, documentation: str) -> Histogram:
            return Histogram(name, documentation, buckets=REQUEST_BUCKETS_S, registry=r)

        self.e2e_latency = per_turn(
            "h2o_e2e_request_latency_seconds",
            "Turn submitted to its end (last token, or cancelled), one observation per finished turn",
        )
        self.queue_time = per_turn(
            "h2o_request_queue_time_seconds",
            "Turn submitted to first scheduled (taken from the waiting queue by the worker)",
        )
        self.prefill_time = per_turn(
            "h2o_request_prefill_time_seconds", "First scheduled to first token (the prompt's prefill)"
        )
        self.decode_time = per_turn("h2o_request_decode_time_seconds", "First token to last token of a turn")
        self.inter_token_latency = Histogram(
            "h2o_inter_token_latency_seconds",
            "Time between two consecutive tokens of a turn, observed for every token after the first",
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.decode_batch_size = Histogram(
            "h2o_decode_batch_size",
            "Generations that sampled a token in one "
            "scheduler step (batched, the decoding ones share one forward), one "
            "observation per step that sampled any",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.kv_cache_capacity_bytes = Gauge(
            "h2o_kv_cache_capacity_bytes",
            "The KV bytes the configuration allows the resident sessions: resident "
            "session limit (H2O_MAX_RESIDENT_SESSIONS with a snapshot dir, else H2O_MAX_SESSIONS) x per-session "
            "maximum (H2O_MAX_SESSION_BYTES, else a full session of the default policy on the loaded model); 0 "
            "while unknown",
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "h2o_kv_cache_usage_ratio",
            "h2o_kv_cache_bytes / h2o_kv_cache_capacity_bytes "
            "(NaN while the capacity is unknown; above 1 when sessions chose policies "
            "larger than the default)",
            registry=r,
        )
        self.requests_rejected = Counter(
            "h2o_requests_rejected", "Turns refused with Retry-After (429/503) by reason", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.requests_rejected.labels(reason)
        self.build_info = BuildInfo()
        r.register(self.build_info)
        self.gpu_allocated.set_function(lambda: _cuda_bytes(torch.cuda.memory_allocated))
        self.gpu_reserved.set_function(lambda: _cuda_bytes(torch.cuda.memory_reserved))

    def track_sessions(self, sessions: Callable[[], Iterable], stored: Callable[[], int] = lambda: 0) -> None:
        """Compute the session gauges at scrape from `sessions()` (the resident ones: objects with cache_tokens
        and cache_bytes) and `stored()` (how many have a snapshot)."""
        self.kv_cache_tokens.set_function(lambda: sum(s.cache_tokens for s in sessions()))
        self.kv_cache_bytes.set_function(lambda: sum(s.cache_bytes for s in sessions()))
        self.sessions_active.set_function(lambda: sum(1 for _ in sessions()))
        self.sessions_stored.set_function(lambda: stored())

    def track_kv_capacity(self, capacity: Callable[[], int], used: Callable[[], float]) -> None:
        """Compute h2o_kv_cache_capacity_bytes and h2o_kv_cache_usage_ratio at scrape: `capacity()` bytes (0 while
        unknown), `used()` bytes."""
        self.kv_cache_capacity_bytes.set_function(capacity)

        def ratio() -> float:
            limit = capacity()
            return used() / limit if limit else float("nan")

        self.kv_cache_usage.set_function(ratio)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class BuildInfo(Collector):
    """`h2o_build_info{version,model,policy,kv_dtype,device} 1`, its labels read at scrape (the device is known
    once the model has loaded)."""

    def __init__(self) -> None:
        self.labels: Callable[[], dict[str, str]] = lambda: {"version": package_version()}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = self.labels()
        family = GaugeMetricFamily(
            "h2o_build_info",
            "The server's version, model, default cache policy and KV storage, and device; always 1",
            labels=BUILD_INFO_LABELS,
        )
        family.add_metric([str(labels.get(name, "")) for name in BUILD_INFO_LABELS], 1.0)
        yield family


def package_version() -> str:
    try:
        return version("h2o-serve")
    except PackageNotFoundError:
        return "unknown"


def _cuda_bytes(read: Callable[[], int]) -> float:
    return float(read()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0

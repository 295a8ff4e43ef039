"""Cache policies as data: how many sink, recent and heavy-hitter tokens a layer keeps, and how scores are pooled.

Names round-trip through :meth:`CachePolicy.parse` / :attr:`CachePolicy.name`:

* ``full`` (alias ``baseline``): keep everything (the reference).
* ``streaming_{sink}_{window}``: StreamingLLM (arXiv 2309.17453): the first ``sink`` tokens + the newest
  ``window - sink`` tokens.
* ``h2o_{sink}_{recent}_{capacity}``: H2O (arXiv 2306.14048): ``sink`` first tokens, ``recent`` newest tokens and
  ``capacity - sink - recent`` heavy hitters ranked by accumulated attention.

A name may end in a storage precision other than the model's own: ``h2o_4_64_1024_int8``, ``streaming_4_1024_int4``,
``full_bf16`` (see :mod:`h2o_cache.quant`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from h2o_cache.quant import KV_DTYPES
from h2o_cache.scorers import DEFAULT_DECAY, SCORERS

DEFAULT_SCORE_MODE = "mean"
DEFAULT_SLACK = 64
DEFAULT_CHUNK = 512

_NAME = re.compile(
    r"^(?:(full|baseline)|streaming_(-?\d+)_(-?\d+)|h2o_(-?\d+)_(-?\d+)_(-?\d+))(?:_(" + "|".join(KV_DTYPES) + "))?$"
)
OPTIONS = ("score_mode", "decay", "slack", "chunk_size", "rolling", "kv_dtype")
"""Policy fields that a name does not carry, settable as keyword options."""


@dataclass(frozen=True)
class CachePolicy:
    """What a bounded cache keeps.

    Attributes:
        kind: ``"full"``, ``"streaming"`` or ``"h2o"``.
        n_sink: first tokens always kept (attention sinks).
        n_recent: newest tokens always kept.
        capacity: tokens kept after an eviction (``None`` for ``full``).
        score_mode: how heavy hitters are ranked, a rule of :mod:`h2o_cache.scorers`: ``"sum"`` summed attention
            (the H2O paper); ``"mean"`` divided by the number of queries that saw the token, which stops old tokens
            winning just because they are old; ``"ema"`` decayed by ``decay`` per new token, so attention that
            recent queries pay counts most; ``"tova"`` the newest query's attention only (TOVA); ``"keydiff"`` the
            keys least similar to the mean key (KeyDiff; no attention weights, so plain SDPA).
        decay: per-token decay of the ``ema`` score.
        slack: extra tokens the cache may hold before it is cut back to ``capacity`` in one gather (0 = every step).
        chunk_size: prompt tokens per forward during prefill, so long prompts run in bounded memory.
        rolling: reassign positions inside the cache (re-rotating kept keys), so positions never exceed
            ``capacity + slack``; off keeps original positions.
        kv_dtype: how keys and values are stored: ``"auto"`` (the model's dtype), ``"fp32"``, ``"bf16"``,
            ``"fp16"``, ``"int8"``, ``"k8v4"`` (int8 keys, int4 values) or ``"int4"`` (see :mod:`h2o_cache.quant`).
            Scores stay fp32.
    """

    kind: Literal["full", "streaming", "h2o"] = "full"
    n_sink: int = 0
    n_recent: int = 0
    capacity: int | None = None
    score_mode: str = DEFAULT_SCORE_MODE
    decay: float = DEFAULT_DECAY
    slack: int = DEFAULT_SLACK
    chunk_size: int = DEFAULT_CHUNK
    rolling: bool = True
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        for field in ("n_sink", "n_recent", "slack", "chunk_size", "capacity"):
            value = getattr(self, field)
            if field == "capacity" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
        if not isinstance(self.rolling, bool):
            raise ValueError(f"rolling must be True or False, got {self.rolling!r}")
        if not isinstance(self.decay, (int, float)) or isinstance(self.decay, bool):
            raise ValueError(f"decay must be a number, got {self.decay!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {self.kv_dtype!r}; expected one of {KV_DTYPES}")
        if self.kind not in ("full", "streaming", "h2o"):
            raise ValueError(f"unknown policy kind {self.kind!r}; expected 'full', 'streaming' or 'h2o'")
        if self.score_mode not in SCORERS:
            raise ValueError(f"unknown score_mode {self.score_mode!r}; expected one of {tuple(SCORERS)}")
        for field in ("n_sink", "n_recent", "slack"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.kind == "full":
            if self.capacity is not None or self.n_sink or self.n_recent:
                raise ValueError("the full policy takes no sink, recent or capacity")
            return
        if self.capacity is None or self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.kind == "streaming" and self.n_sink + self.n_recent != self.capacity:
            raise ValueError(
                f"streaming keeps sink + recent = window tokens; got sink={self.n_sink}, "
                f"recent={self.n_recent}, window={self.capacity}"
            )
        if self.kind == "streaming" and self.n_sink >= self.capacity:
            raise ValueError(f"streaming window ({self.capacity}) must exceed the sink count ({self.n_sink})")
        if self.kind == "h2o" and self.capacity <= self.n_sink + self.n_recent:
            raise ValueError(
                f"h2o capacity ({self.capacity}) must exceed sink + recent ({self.n_sink} + {self.n_recent}) "
                "to leave room for heavy hitters"
            )

    @classmethod
    def full(cls, **options) -> CachePolicy:
        _check_options(options)
        return cls(kind="full", **options)

    @classmethod
    def streaming(cls, n_sink: int, window: int, **options) -> CachePolicy:
        _check_options(options)
        if window <= n_sink:
            raise ValueError(f"streaming window ({window}) must exceed the sink count ({n_sink})")
        return cls(kind="streaming", n_sink=n_sink, n_recent=window - n_sink, capacity=window, **options)

    @classmethod
    def h2o(cls, n_sink: int, n_recent: int, capacity: int, **options) -> CachePolicy:
        _check_options(options)
        return cls(kind="h2o", n_sink=n_sink, n_recent=n_recent, capacity=capacity, **options)

    @classmethod
    def parse(cls, name: str, default_kv_dtype: str = "auto", **options) -> CachePolicy:
        """Build a policy from its name (``full``, ``baseline``, ``streaming_8_256``, ``h2o_8_32_256``, any of them
        with a ``_<kv_dtype>`` suffix); ``options`` set the remaining fields (score_mode, decay, slack, chunk_size,
        rolling, kv_dtype). ``default_kv_dtype`` is the storage when neither the name nor the options say (a
        server's default for sessions that do not choose)."""
        match = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"unknown cache policy {name!r}; expected 'full', 'baseline', 'streaming_<sink>_<window>' "
                f"or 'h2o_<sink>_<recent>_<capacity>', optionally ending in _<kv_dtype> ({'/'.join(KV_DTYPES)})"
            )
        if match.group(7):
            if options.get("kv_dtype", match.group(7)) != match.group(7):
                raise ValueError(f"{name!r} names kv_dtype {match.group(7)!r}, the options {options['kv_dtype']!r}")
            options = {**options, "kv_dtype": match.group(7)}
        else:
            options = {"kv_dtype": default_kv_dtype, **options}
        if match.group(1):
            return cls.full(**options)
        if match.group(2):
            return cls.streaming(int(match.group(2)), int(match.group(3)), **options)
        return cls.h2o(int(match.group(4)), int(match.group(5)), int(match.group(6)), **options)

    @property
    def name(self) -> str:
        suffix = "" if self.kv_dtype == "auto" else f"_{self.kv_dtype}"
        if self.kind == "full":
            return "full" + suffix
        if self.kind == "streaming":
            return f"streaming_{self.n_sink}_{self.capacity}{suffix}"
        return f"h2o_{self.n_sink}_{self.n_recent}_{self.capacity}{suffix}"

    @property
    def n_heavy(self) -> int:
        """Heavy-hitter slots: what is left of capacity after sinks and the recent window."""
        return 0 if self.capacity is None else self.capacity - self.n_sink - self.n_recent

    @property
    def needs_scores(self) -> bool:
        return self.kind == "h2o"

    @property
    def max_tokens(self) -> int | None:
        """Most tokens a layer holds once a forward call returns (``None``: unbounded)."""
        return None if self.capacity is None else self.capacity + self.slack

    def replace(self, **changes) -> CachePolicy:
        _check_options(changes, allowed=[f.name for f in dataclasses.fields(self)])
        return dataclasses.replace(self, **changes)


def _check_options(options: dict, allowed: tuple[str, ...] | list[str] = OPTIONS) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown policy option(s) {unknown}; the options are {list(allowed)}")

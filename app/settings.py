"""Server configuration, read from `H2O_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.protocol import MAX_API_KEY_CHARS
from h2o_cache.loading import CHOICES as DTYPE_CHOICES
from h2o_cache.loading import WEIGHT_DTYPES
from h2o_cache.quant import KV_DTYPES

DEFAULT_KV_DTYPE = "k8v4"
"""How sessions store keys and values unless they choose: int8 keys, int4 values. With the default policy a full
SmolLM2 session holds 6.8 MB, a quarter of the 27.2 MB it held in fp32 before (benchmarks/README.md)."""

OTHER_VARIABLES = frozenset({"H2O_MODEL_CACHE", "H2O_TORCH_CUDA", "H2O_ROUTER_LISTEN", "H2O_UPSTREAMS"})
"""``H2O_*`` variables that are not server settings: the converted-weights folder (h2o_cache.loading), the CUDA
build switch of scripts/bootstrap.sh, and the nginx router template's two."""


class Settings(BaseSettings):
    """Every knob of the server; defaults serve SmolLM2-135M-Instruct on CPU (CUDA when present)."""

    model_config = SettingsConfigDict(env_prefix="H2O_", extra="ignore")

    model: str = Field("smollm2", description="'smollm2' (bundled GGUF) or an HF id / local path")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; default: cuda when available")
    dtype: str | None = Field(
        None,
        description="model weights and compute: fp32, bf16, fp16, auto, or the CPU's weight-only int8 / int4 (every "
        "Linear, fp32 activations; h2o_cache.weights, benchmarks/results/weights); default: fp32 on CPU, fp16 on CUDA",
    )

    policy: str = Field(
        "h2o_4_280_560",
        description="cache policy of sessions that do not pick one (with H2O_KV_DTYPE: benchmarks/README.md, bytes "
        "per conversation)",
    )
    policy_slack: int = Field(64, ge=0, description="tokens a cache may overshoot its capacity before eviction")
    max_policy_tokens: int = Field(8192, ge=1, description="largest capacity + slack a session may ask for")
    allow_full_policy: bool = Field(False, description="allow the unbounded 'full' policy")
    kv_dtype: str = Field(
        DEFAULT_KV_DTYPE,
        description="KV storage of sessions whose policy name has no "
        f"_<kv_dtype> suffix and whose request names none: {', '.join(KV_DTYPES)}",
    )
    allowed_kv_dtypes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(KV_DTYPES), description="comma-separated KV storages a session may choose"
    )
    max_session_bytes: int | None = Field(
        None,
        ge=1,
        description="largest KV cache a session may ask for, full size (h2o_cache.budget."
        "session_nbytes for the loaded model); none: only max_policy_tokens bounds it",
    )

    max_message_chars: int = Field(32_000, ge=1, description="longer messages get 413")
    max_new_tokens: int = Field(2048, ge=1, description="upper limit of a request's max_new_tokens")
    default_max_new_tokens: int = Field(256, ge=1)
    max_running: int = Field(16, ge=1, description="generations advanced together (batched: one forward)")
    max_waiting: int = Field(64, ge=0, description="queued generations beyond max_running; more get 429")
    max_sessions: int = Field(1024, ge=1, description="sessions (in memory or on disk); creating more gets 429")
    max_sessions_per_key: int | None = Field(
        None,
        ge=1,
        description="sessions one API key may hold (in memory or on disk); more get 429, so one key "
        "cannot fill H2O_MAX_SESSIONS for the others (none: no per-key limit)",
    )
    session_ttl_s: float = Field(3600.0, ge=0, description="idle sessions older than this are deleted (0: never)")
    snapshot_dir: str | None = Field(None, description="persist sessions here after every turn (none: in memory)")
    max_resident_sessions: int | None = Field(
        None,
        ge=1,
        description="with snapshot_dir: sessions kept in memory, the least recently used idle ones "
        "leave first (default: max_sessions)",
    )
    shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="on SIGTERM, streams may finish this long, then are cancelled (their partial turn is kept)",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_requests_per_key: int = Field(
        16, ge=1, description="with API keys: generations in flight per key; more get 429"
    )
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens per scheduler step, so prefill interleaves")
    batching: bool = Field(
        True, description="one batched forward per step over all decoding sessions (false: one forward per session)"
    )
    max_batch: int = Field(16, ge=1, description="rows of the batched cache pool; more decoding sessions run alone")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503")
    sse_ping_s: float = Field(15.0, gt=0, description="keep-alive comment interval on event streams")

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; when set, every API route needs one of them"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    replica_name: str = Field(default_factory=socket.gethostname, description="sent as X-H2O-Replica")
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: readable lines; json: one JSON object per line (every logger, the request log "
        "included) for log collectors",
    )

    @field_validator("api_keys", "allowed_kv_dtypes", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """A comma-separated list; one that names nothing (`" , "`) is a mistake, not "no keys": refused."""
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
            if value.strip() and not items:
                raise ValueError(f"{value!r} names nothing; leave the variable unset for none")
            return items
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_length(cls, keys: list[str]) -> list[str]:
        """A key longer than the API accepts in a header could never be used."""
        if any(len(key) > MAX_API_KEY_CHARS for key in keys):
            raise ValueError(f"an API key is longer than {MAX_API_KEY_CHARS} characters")
        return keys

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An unknown precision, or a CPU-only one on a GPU, fails at startup with the choices."""
        if value is not None and value not in DTYPE_CHOICES:
            raise ValueError(f"unknown dtype {value!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        device = info.data.get("device") or ""
        if value in WEIGHT_DTYPES and device.startswith("cuda"):
            raise ValueError(f"dtype {value!r} runs on the CPU's weight-only kernels; on {device!r} use fp16 or bf16")
        return value

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """``H2O_*`` variables that name no setting (``H2O_API_KEY`` for ``H2O_API_KEYS``): a typo must not start
        a server with a setting silently off."""
        prefix = cls.model_config["env_prefix"]
        known = {prefix + name.upper() for name in cls.model_fields} | OTHER_VARIABLES
        return sorted(name for name in environ if name.upper().startswith(prefix) and name.upper() not in known)

    @model_validator(mode="after")
    def _check_kv_dtypes(self) -> Settings:
        """Unknown names, or a default that sessions may not use, fail at startup rather than on every request."""
        unknown = [name for name in [self.kv_dtype, *self.allowed_kv_dtypes] if name not in KV_DTYPES]
        if unknown:
            raise ValueError(f"unknown kv_dtype(s) {unknown}; expected {', '.join(KV_DTYPES)}")
        if self.kv_dtype not in self.allowed_kv_dtypes:
            raise ValueError(f"kv_dtype {self.kv_dtype!r} is not among allowed_kv_dtypes {self.allowed_kv_dtypes}")
        return self

"""What the routes share: settings, engine, session store, metrics, and the server's drain and policy checks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from app.engine import Engine
from app.errors import invalid_policy
from app.metrics import Metrics
from app.sessions import SessionStore
from app.settings import Settings
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    sessions: SessionStore
    metrics: Metrics
    draining: bool = False
    """Set on SIGTERM: new turns get 503 while the running ones finish."""
    loop: asyncio.AbstractEventLoop | None = None
    started_at: float = field(default_factory=time.time)

    def begin_drain(self) -> None:
        """Refuse new turns now; cancel those still running after `shutdown_grace_s` (thread- and signal-safe)."""

        def drain() -> None:
            self.draining = True
            self.loop.call_later(self.settings.shutdown_grace_s, self.engine.cancel_all)

        if self.loop is not None:
            self.loop.call_soon_threadsafe(drain)

    def parse_policy(
        self, name: str | None, kv_dtype: str | None = None, default_kv_dtype: str | None = None
    ) -> CachePolicy:
        """The requested (or default) policy, within the server's limits; ApiError 422 otherwise. Its KV storage is
        `kv_dtype`, else the name's `_<kv_dtype>` suffix, else `default_kv_dtype` (default: H2O_KV_DTYPE)."""
        s = self.settings
        options = {} if kv_dtype is None else {"kv_dtype": kv_dtype}
        try:
            policy = CachePolicy.parse(
                name or s.policy, slack=s.policy_slack, default_kv_dtype=default_kv_dtype or s.kv_dtype, **options
            )
        except ValueError as exc:
            raise invalid_policy(str(exc)) from exc
        if policy.kv_dtype not in s.allowed_kv_dtypes:
            raise invalid_policy(
                f"kv_dtype {policy.kv_dtype!r} is not allowed on this server; allowed: "
                f"{', '.join(s.allowed_kv_dtypes)} (H2O_ALLOWED_KV_DTYPES)"
            )
        if policy.max_tokens is None and not s.allow_full_policy:
            raise invalid_policy("the unbounded 'full' policy is disabled on this server (H2O_ALLOW_FULL_POLICY)")
        if policy.max_tokens is not None and policy.max_tokens > s.max_policy_tokens:
            raise invalid_policy(
                f"policy {policy.name} holds up to {policy.max_tokens} tokens; this server allows "
                f"{s.max_policy_tokens} (H2O_MAX_POLICY_TOKENS)"
            )
        self._check_bytes(policy)
        return policy

    def _check_bytes(self, policy: CachePolicy) -> None:
        """H2O_MAX_SESSION_BYTES against the bytes a full session of `policy` holds on the loaded model (before the
        model is loaded there is nothing to size: the turn gets 503 anyway)."""
        limit, model = self.settings.max_session_bytes, self.engine.model
        if limit is None or not self.engine.ready:
            return
        if policy.max_tokens is None:
            raise invalid_policy(
                f"policy {policy.name} is unbounded; this server allows a session {limit:,} bytes "
                "of KV cache (H2O_MAX_SESSION_BYTES)"
            )
        nbytes = session_nbytes(model.config, policy, model.dtype)
        if nbytes > limit:
            raise invalid_policy(
                f"policy {policy.name} holds up to {nbytes:,} bytes of KV cache on this model; this "
                f"server allows {limit:,} (H2O_MAX_SESSION_BYTES)"
            )

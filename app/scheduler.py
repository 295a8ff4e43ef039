"""Who runs this step: a pure function of the engine's queues and the batching pool's membership (state in, plan
out), so every scheduling rule is testable without a model, as in vLLM v1's scheduler.

The rules, per step:
- Admission: waiting turns start, first come first served, while fewer than `max_running` run.
- A cancelled turn ends now.
- Prefill: a turn with prompt left is fed a chunk of at most `prefill_chunk` tokens. With batching the step's
  chunks share one budget of `prefill_chunk` tokens, so a long prompt never stalls the decoding streams for long,
  and a turn starts its prefill only while fewer than `max_batch` turns hold (or are prefilling towards) a pool row:
  it waits for a row before its first token rather than mid-stream.
- Decode: with batching, a decoding turn that holds a pool row, or can take one (a bounded policy equal to the
  pool's, any bounded policy while the pool is empty, and a free row), decodes in the pool's one forward; every
  other turn decodes alone on its session's own cache.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, Protocol, TypeVar

from app.settings import Settings
from h2o_cache import CachePolicy


class Schedulable(Hashable, Protocol):
    """What the scheduler reads of a turn (app.generation.Generation)."""

    cancelled: bool
    n_fed: int

    @property
    def n_prompt(self) -> int: ...

    @property
    def policy(self) -> CachePolicy: ...


T = TypeVar("T", bound=Schedulable)


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int
    prefill_chunk: int
    batching: bool
    max_batch: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SchedulerConfig:
        return cls(settings.max_running, settings.prefill_chunk, settings.batching, settings.max_batch)


@dataclass(frozen=True)
class PoolView(Generic[T]):
    """The batching pool as the scheduler sees it: who holds a row, and the policy its rows share."""

    members: frozenset[T] = frozenset()
    policy: CachePolicy | None = None


@dataclass
class StepPlan(Generic[T]):
    """What one step does, in this order: end `cancelled`, feed each `prefill` turn its chunk, move `joins` into
    pool rows, decode each of `alone` on its own cache, then decode all of `pooled` (joins included) in one forward.
    `running` is every turn running this step (the admitted ones last), `admitted` how many of them came from the
    front of the waiting queue."""

    running: list[T]
    admitted: int = 0
    cancelled: list[T] = field(default_factory=list)
    prefill: list[tuple[T, int]] = field(default_factory=list)
    joins: list[T] = field(default_factory=list)
    alone: list[T] = field(default_factory=list)
    pooled: list[T] = field(default_factory=list)


def schedule(config: SchedulerConfig, waiting: Sequence[T], running: Sequence[T], pool: PoolView[T]) -> StepPlan[T]:
    """The plan of the next step (see the module's rules); reads its inputs, changes nothing."""
    admitted = max(0, min(len(waiting), config.max_running - len(running)))
    plan = StepPlan(running=[*running, *islice(waiting, admitted)], admitted=admitted)
    budget = config.prefill_chunk
    seats = sum(1 for t in plan.running if t in pool.members or t.n_fed)
    pool_policy = pool.policy
    rows_taken = len(pool.members)
    for turn in plan.running:
        left = turn.n_prompt - turn.n_fed
        if turn.cancelled:
            plan.cancelled.append(turn)
        elif left > 0 and not config.batching:
            plan.prefill.append((turn, min(config.prefill_chunk, left)))
        elif left > 0:
            if budget <= 0 or (not turn.n_fed and seats >= config.max_batch):
                continue  # waits for the step's prefill budget, or (before its first token) for a row
            seats += not turn.n_fed
            chunk = min(config.prefill_chunk, left)
            budget -= chunk
            plan.prefill.append((turn, chunk))
        elif turn in pool.members:
            plan.pooled.append(turn)
        elif config.batching and fits_pool(turn.policy, pool_policy) and rows_taken < config.max_batch:
            pool_policy, rows_taken = turn.policy, rows_taken + 1
            plan.joins.append(turn)
            plan.pooled.append(turn)
        else:
            plan.alone.append(turn)
    return plan


def fits_pool(policy: CachePolicy, pool_policy: CachePolicy | None) -> bool:
    """A bounded policy equal to the pool's (any bounded one while the pool is empty): rows of one pool share it."""
    return policy.capacity is not None and (pool_policy is None or policy == pool_policy)

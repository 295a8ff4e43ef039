"""The scheduler's rules as a pure function: turns are plain records here, no model, no thread."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from app.scheduler import PoolView, SchedulerConfig, schedule
from h2o_cache import CachePolicy

H2O = CachePolicy.parse("h2o_4_60_128")
STREAMING = CachePolicy.parse("streaming_4_60")
FULL = CachePolicy.parse("full")
BATCHED = SchedulerConfig(max_running=8, prefill_chunk=100, batching=True, max_batch=4)
ALONE = SchedulerConfig(max_running=8, prefill_chunk=100, batching=False, max_batch=4)


@dataclass(eq=False)
class Turn:
    name: str
    n_prompt: int = 10
    n_fed: int = 0
    policy: CachePolicy = field(default=H2O)
    cancelled: bool = False

    def __repr__(self) -> str:
        return self.name


def decoding(name: str, policy: CachePolicy = H2O) -> Turn:
    return Turn(name, n_prompt=10, n_fed=10, policy=policy)


def names(turns) -> list[str]:
    return [t.name for t in turns]


def test_waiting_turns_start_first_come_first_served_up_to_max_running():
    running = [decoding(f"r{i}") for i in range(6)]
    waiting = deque(Turn(f"w{i}") for i in range(4))
    plan = schedule(BATCHED, waiting, running, PoolView())
    assert plan.admitted == 2 and names(plan.running) == [*names(running), "w0", "w1"]
    assert len(waiting) == 4 and len(running) == 6  # the plan only reads its inputs
    full = schedule(BATCHED, waiting, [decoding(f"r{i}") for i in range(8)], PoolView())
    assert full.admitted == 0


def test_without_batching_each_turn_gets_its_own_chunk_and_decodes_alone():
    turns = [Turn("long", n_prompt=250), Turn("rest", n_prompt=250, n_fed=200), decoding("d1"), decoding("d2")]
    plan = schedule(ALONE, [], turns, PoolView())
    assert [(t.name, n) for t, n in plan.prefill] == [("long", 100), ("rest", 50)]
    assert names(plan.alone) == ["d1", "d2"] and not plan.pooled and not plan.joins


def test_batched_prefill_shares_one_budget_per_step():
    turns = [Turn("a", n_prompt=60), Turn("b", n_prompt=300), Turn("c", n_prompt=30)]
    plan = schedule(BATCHED, [], turns, PoolView())
    # a takes 60 of the 100; b still finds budget and takes a whole chunk; nothing is left for c.
    assert [(t.name, n) for t, n in plan.prefill] == [("a", 60), ("b", 100)]


def test_a_new_prefill_waits_while_every_pool_row_is_held_or_promised():
    members = [decoding(f"m{i}") for i in range(3)]
    started = Turn("started", n_prompt=300, n_fed=100)  # holds the fourth seat
    fresh = Turn("fresh")
    plan = schedule(BATCHED, [], [*members, started, fresh], PoolView(frozenset(members), H2O))
    assert [(t.name, n) for t, n in plan.prefill] == [("started", 100)]
    assert names(plan.pooled) == ["m0", "m1", "m2"] and not plan.joins


def test_decoding_turns_join_the_pool_while_rows_and_policy_allow():
    member = decoding("member")
    turns = [
        member,
        decoding("same"),
        decoding("other", STREAMING),
        decoding("unbounded", FULL),
        decoding("same2"),
        decoding("same3"),
        decoding("late"),
    ]
    plan = schedule(BATCHED, [], turns, PoolView(frozenset([member]), H2O))
    assert names(plan.joins) == ["same", "same2", "same3"]
    assert names(plan.pooled) == ["member", "same", "same2", "same3"]
    assert names(plan.alone) == ["other", "unbounded", "late"]  # another policy, no bound, no row left


def test_an_empty_pool_takes_the_first_bounded_policy():
    plan = schedule(BATCHED, [], [decoding("f", FULL), decoding("s", STREAMING), decoding("h")], PoolView())
    assert names(plan.joins) == ["s"] and names(plan.alone) == ["f", "h"]


def test_cancelled_turns_end_whatever_they_were_doing():
    member = decoding("member")
    member.cancelled = True
    prefilling = Turn("prefilling", n_fed=3, cancelled=True)
    plan = schedule(BATCHED, [], [member, prefilling, decoding("d")], PoolView(frozenset([member]), H2O))
    assert names(plan.cancelled) == ["member", "prefilling"]
    assert names(plan.joins) == ["d"] and names(plan.pooled) == ["d"] and not plan.prefill

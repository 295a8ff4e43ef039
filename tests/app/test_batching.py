"""Continuous batching through the engine API: batched and per-session forwards give the same tokens (greedy and
seeded sampling), with rows of different lengths that evict mid-batch, sessions joining and leaving mid-generation,
a full pool (new turns wait for a row), and turns that leave the pool and come back."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch

from app.engine import Engine
from app.metrics import Metrics
from app.sampling import SamplingParams
from app.sessions import Session
from app.settings import Settings
from app.slot_pool import SlotPool
from h2o_cache import CachePolicy, make_cache
from h2o_cache.weights import quantize_int8
from tests.app.conftest import SMALL_POLICY, SMALL_SLACK

# Different lengths: the first turns end at different fills, and the long one evicts while it prefills.
CONVERSATIONS = {
    "short": ["hi", "and then?"],
    "medium": ["tell me a story about a cat and a dog", "go on"],
    "long": [" ".join(["the quick brown fox jumps over the lazy dog"] * 6), "shorter now"],
}
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 1.0, "top_p": 0.9, "top_k": 50}


def converse(
    model,
    conversations: dict[str, list[str]],
    sampling: dict,
    max_new: dict[str, int],
    stagger_s: dict[str, float] | None = None,
    policies: dict[str, str] | None = None,
    **settings,
) -> tuple[dict[str, list[list[int]]], dict]:
    """Run every conversation at once on a fresh engine (turn after turn within a session); the token ids of
    each turn, and the sessions' cache counters."""
    engine = Engine(
        Settings(policy=SMALL_POLICY, policy_slack=SMALL_SLACK, max_running=16, **settings), Metrics(), preloaded=model
    )
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    policies = policies or {}
    sessions = {
        sid: Session(id=sid, policy=CachePolicy.parse(policies.get(sid, SMALL_POLICY), slack=SMALL_SLACK))
        for sid in conversations
    }

    async def one(sid: str) -> list[list[int]]:
        await asyncio.sleep((stagger_s or {}).get(sid, 0.0))
        turns = []
        for i, message in enumerate(conversations[sid]):
            seed = sum(map(ord, sid)) + i
            params = SamplingParams(max_new_tokens=max_new[sid], seed=seed, **sampling)
            generation = engine.submit(sessions[sid], [{"role": "user", "content": message}], params)
            async for _ in generation:
                pass
            turns.append(list(generation.output_ids))
        return turns

    async def everyone() -> list[list[list[int]]]:
        return await asyncio.gather(*(one(sid) for sid in conversations))

    try:
        outputs = dict(zip(conversations, asyncio.run(everyone())))
    finally:
        engine.stop()
    counters = {sid: (s.cache_tokens, s.cache_tokens_seen, s.evicted_tokens) for sid, s in sessions.items()}
    return outputs, counters


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to split among threads: on a loaded machine the hand-offs cost 8x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch_sizes(monkeypatch) -> list[int]:
    """Rows fed in each batched forward."""
    sizes = []
    real = SlotPool.forward

    def recording(self, generations):
        sizes.append(len(generations))
        return real(self, generations)

    monkeypatch.setattr(SlotPool, "forward", recording)
    return sizes


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_equals_per_session(tiny_model, sampling, batch_sizes):
    max_new = {"short": 30, "medium": 12, "long": 20}  # rows leave at different steps; all evict mid-batch
    alone, alone_counters = converse(tiny_model, CONVERSATIONS, sampling, max_new, batching=False)
    assert not batch_sizes
    batched, counters = converse(tiny_model, CONVERSATIONS, sampling, max_new)
    assert batched == alone
    assert counters == alone_counters
    assert all(evicted > 0 for _, _, evicted in counters.values())
    assert max(batch_sizes) == 3 and min(batch_sizes) == 1


def test_sessions_join_and_leave_mid_generation(tiny_model, batch_sizes):
    conversations = {f"s{i}": [f"message number {i} " * (i + 1)] * 2 for i in range(5)}
    max_new = {f"s{i}": 8 + 7 * i for i in range(5)}
    stagger = {f"s{i}": 0.05 * i for i in range(5)}
    alone, _ = converse(tiny_model, conversations, GREEDY, max_new, stagger, batching=False)
    batched, _ = converse(tiny_model, conversations, GREEDY, max_new, stagger)
    assert batched == alone
    grew_after_shrinking = any(
        a < b for i, (a, b) in enumerate(zip(batch_sizes, batch_sizes[1:])) if any(x > a for x in batch_sizes[: i + 1])
    )
    assert grew_after_shrinking, batch_sizes


def test_a_full_pool_holds_new_turns_back_until_a_row_frees(tiny_model, batch_sizes):
    conversations = {f"s{i}": [f"hello {i}", "again"] for i in range(5)}
    max_new = {f"s{i}": 6 + 5 * i for i in range(5)}
    alone, _ = converse(tiny_model, conversations, GREEDY, max_new, batching=False)
    batched, _ = converse(tiny_model, conversations, GREEDY, max_new, max_batch=2)
    assert batched == alone
    assert max(batch_sizes) == 2


def test_a_session_with_another_policy_decodes_alone(tiny_model, batch_sizes):
    conversations = {"a": ["hi there", "more"], "b": ["hello", "more"], "c": ["hey", "more"]}
    max_new = {"a": 10, "b": 14, "c": 12}
    policies = {"b": "streaming_4_24"}
    alone, _ = converse(tiny_model, conversations, GREEDY, max_new, policies=policies, batching=False)
    batched, _ = converse(tiny_model, conversations, GREEDY, max_new, policies=policies)
    assert batched == alone
    assert max(batch_sizes) == 2  # a and c share the pool, b never joins it


def test_pool_grows_by_doubling_and_shrinks_when_a_quarter_is_used(tiny_model):
    model, _ = tiny_model
    pool = SlotPool(model, max_rows=8)

    class Gen:  # what the pool needs of a generation: a session with a cache
        def __init__(self, n_tokens: int):
            self.session = Session(id="x", policy=CachePolicy.parse(SMALL_POLICY, slack=SMALL_SLACK))
            self.session.cache = make_cache(model, self.session.policy)
            self.session.cache_tokens_seen = n_tokens
            with torch.inference_mode():
                model(torch.arange(1, n_tokens + 1)[None], past_key_values=self.session.cache, use_cache=True)

    gens = [Gen(5 + i) for i in range(6)]
    sizes = []
    for g in gens:
        assert pool.join(g) is not None
        sizes.append(pool.n_rows)
    assert sizes == [1, 2, 4, 4, 8, 8]
    assert [pool.cache.row_tokens(pool.rows[g]) for g in gens] == [5 + i for i in range(6)]
    for g in gens[:4]:
        pool.leave(g)
        assert g.session.cache.kept_tokens() == g.session.cache_tokens_seen
        assert g.session.cache.get_seq_length() == g.session.cache_tokens_seen
    assert pool.n_rows == 4 and pool.members.count(None) == 2
    assert [pool.cache.row_tokens(pool.rows[g]) for g in gens[4:]] == [9, 10]
    pool.leave(gens[4])
    pool.drop(gens[5])
    assert pool.cache is None and not pool.rows


def test_int8_weights_run_batched(tiny_model):
    model, tokenizer = tiny_model
    int8 = quantize_int8(copy.deepcopy(model)), tokenizer
    conversations = {"a": ["hi there"], "b": ["hello, how are you today?"]}
    max_new = {"a": 8, "b": 8}
    alone, _ = converse(int8, conversations, GREEDY, max_new, batching=False)
    batched, _ = converse(int8, conversations, GREEDY, max_new)
    assert batched == alone and all(len(turns[0]) == 8 for turns in batched.values())

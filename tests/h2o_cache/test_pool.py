"""A pool of rows (one per session) gives every row what it would get alone, evictions included."""

from __future__ import annotations

import pytest
import torch

from h2o_cache import H2OCache, cache_state, make_cache, restore_cache

from .models import VOCAB, tiny_model

POLICIES = ["h2o_4_6_24", "streaming_4_24", "h2o_4_6_24_int8", "streaming_4_24_int4"]


def _alone(model, cache, token: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits = [], []
    for _ in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
        token = int(out.argmax())
        tokens.append(token)
        logits.append(out)
    return tokens, logits


def _copy(model, cache: H2OCache) -> H2OCache:
    return restore_cache(model, *cache_state(cache))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("rolling", [True, False])
def test_batched_rows_equal_single_sessions(policy, rolling):
    model = tiny_model("llama")
    torch.manual_seed(3)
    sessions, first = [], []
    with torch.no_grad():
        for n in (20, 35, 9):  # different fills; two rows evict inside the batch, at different steps
            cache = make_cache(model, policy, slack=5, chunk_size=16, rolling=rolling)
            out = model(torch.randint(0, VOCAB, (1, n)), past_key_values=cache, use_cache=True)
            sessions.append(cache)
            first.append(int(out.logits[0, -1].argmax()))
        alone = [_alone(model, _copy(model, c), t, 30) for c, t in zip(sessions, first)]

        pool = H2OCache.pool(model, sessions[0].policy, batch=4, rotary=sessions[0].layers[0].rotary)
        rows = [2, 0, 3]  # row 1 stays free and is fed padding
        for row, cache in zip(rows, sessions):
            pool.insert(row, cache)
        tokens = torch.zeros(4, 1, dtype=torch.long)
        mask = torch.tensor([[1], [0], [1], [1]])
        for row, token in zip(rows, first):
            tokens[row, 0] = token
        got_tokens, got_logits = [[] for _ in rows], [[] for _ in rows]
        for _ in range(30):
            logits = model(tokens, attention_mask=mask, past_key_values=pool, use_cache=True).logits[:, -1]
            for i, row in enumerate(rows):
                tokens[row, 0] = int(logits[row].argmax())
                got_tokens[i].append(int(tokens[row, 0]))
                got_logits[i].append(logits[row])
        assert pool.layers[0].length <= 24 + 5
    for i, (want_tokens, want_logits) in enumerate(alone):
        assert got_tokens[i] == want_tokens, i
        torch.testing.assert_close(torch.stack(got_logits[i]), torch.stack(want_logits), rtol=1e-4, atol=1e-5)
    assert pool.evicted_tokens > 0


def test_extracted_row_continues_like_the_session_alone():
    model = tiny_model("llama")
    with torch.no_grad():
        short, long = (make_cache(model, "h2o_4_6_24", slack=5) for _ in range(2))
        model(torch.randint(0, VOCAB, (1, 12)), past_key_values=short, use_cache=True)
        model(torch.randint(0, VOCAB, (1, 40)), past_key_values=long, use_cache=True)
        reference = _alone(model, _copy(model, long), 7, 20)
        pool = H2OCache.pool(model, long.policy, batch=2, rotary=long.layers[0].rotary)
        pool.insert(0, short)
        pool.insert(1, long)  # longer than the pool: row 0 shifts and gains padding
        out = model(torch.tensor([[5], [7]]), past_key_values=pool, use_cache=True).logits[1, -1]
        moved = pool.extract(1)
        pool.release(1)
        assert pool.row_tokens(1) == 0 and pool.row_tokens(0) == 13
        tokens, logits = _alone(model, moved, int(out.argmax()), 19)
    assert [int(out.argmax())] + tokens == reference[0]
    torch.testing.assert_close(torch.stack([out] + logits), torch.stack(reference[1]), rtol=1e-4, atol=1e-5)


def test_pool_rows_cut_alone_and_leave_with_a_session_sized_buffer():
    """Rows that reach their budget at different steps: each cut touches only its row, the pool's length stays under
    capacity + 2 x slack (its headroom), and a row that leaves gets the buffer a session has (capacity + slack)."""
    model = tiny_model("llama")
    policy = dict(slack=6, chunk_size=16)
    with torch.no_grad():
        sessions = [make_cache(model, "h2o_4_6_24", **policy) for _ in range(3)]
        for cache, n in zip(sessions, (10, 20, 28)):
            model(torch.randint(0, VOCAB, (1, n)), past_key_values=cache, use_cache=True)
        pool = H2OCache.pool(model, sessions[0].policy, batch=3, rotary=sessions[0].layers[0].rotary)
        for row, cache in enumerate(sessions):
            pool.insert(row, cache)
        layer = pool.layers[0]
        lengths, cuts = [], set()
        for _ in range(40):
            before = list(layer.row_evicted)
            model(torch.randint(0, VOCAB, (3, 1)), past_key_values=pool, use_cache=True)
            cut = [r for r in range(3) if layer.row_evicted[r] > before[r]]
            cuts.add(len(cut))
            lengths.append(layer.length)
        moved = pool.extract(0)
    assert 1 in cuts  # rows were cut one at a time
    assert max(lengths) <= 24 + 2 * 6 and layer.n_slots == 24 + 2 * 6
    assert all(lyr.n_slots == 24 + 6 for lyr in moved.layers)

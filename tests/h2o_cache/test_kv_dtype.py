"""Storage precision (``kv_dtype``): codes against a plain reference, exactness where storage loses nothing or only
a cast, the documented error bound of integer storage, no drift under position rolling, and memory in pages."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from h2o_cache import CachePolicy, H2OLayer, RotaryDelta, make_cache
from h2o_cache.budget import session_nbytes
from h2o_cache.cache import PAGE
from h2o_cache.quant import make_codec

from .models import VOCAB, tiny_model

INTEGER = {"int8": (8, 64, False), "int4": (4, 32, True)}  # bits, group of the 64-channel heads below, Hadamard
# Documented bound (docs/library.md, "KV storage precision"): the largest logit error of integer storage against fp32
# storage, relative to the logits' standard deviation, with eviction and rolling, on the tiny models.
LOGIT_BOUND = {"int8": 0.02, "k8v4": 0.1, "int4": 0.2}


def _plain_quantize(
    x: torch.Tensor, bits: int, group: int, turn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each vector times the 64x64 Hadamard matrix (Kronecker powers of [[1, 1], [1, -1]], over 8) if ``turn``,
    then one group at a time: zero point = fp16 minimum, scale = fp16 (max - zero) / levels, codes rounded."""
    levels = 2**bits - 1
    h = torch.ones(1, 1)
    for _ in range(6):
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    flat = (x @ (h / 8) if turn else x).reshape(-1, x.shape[-1])  # in fp32, as stored keys are
    codes = torch.empty(flat.shape, dtype=torch.int64)
    scales, zeros = [], []
    for r, row in enumerate(flat):
        for g0 in range(0, row.numel(), group):
            chunk = row[g0 : g0 + group].double()
            zero = chunk.min().half().double()
            scale = max(((chunk.max() - zero) / levels).item(), 2.0**-24)
            scale = torch.tensor(scale).half().double()
            codes[r, g0 : g0 + group] = ((chunk - zero) / scale).round().clamp(0, levels).long()
            scales.append(scale)
            zeros.append(zero)
    return codes.reshape(x.shape), torch.stack(scales), torch.stack(zeros)


@pytest.mark.parametrize("kv_dtype", INTEGER)
def test_codes_match_a_plain_reference_and_decode_within_half_a_step(kv_dtype):
    bits, group, turn = INTEGER[kv_dtype]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64) * torch.linspace(0.1, 8, 64)  # channels of very different range, as keys have
    x[0, 0, 0] = 0.0  # a zero vector (padding) decodes to zero
    codec = make_codec(kv_dtype, torch.float32, 64)
    parts, decoded = codec.encode(x, torch.float32)
    assert torch.equal(decoded, codec.decode(parts, torch.float32))  # the write path's shortcut is exact
    codes = parts[""].long()
    if bits == 4:  # two codes per byte, low nibble first
        assert parts[""].shape[-1] == 32
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    want, scales, zeros = _plain_quantize(x, bits, group, turn)
    assert (codes != want).float().mean() < 1e-3  # the same codes but where fp32 and fp64 round a tie apart
    assert torch.equal(parts["_scale"].double().flatten(), scales)
    assert torch.equal(parts["_zero"].double().flatten(), zeros)
    error = (decoded - x).norm(dim=-1)  # the transform is orthogonal: norms carry over
    half_step = 0.5 * parts["_scale"].float().repeat_interleave(group, dim=-1)
    assert (error <= half_step.norm(dim=-1) * 1.001 + 1e-5).all()
    assert error[0, 0, 0] == 0


def test_fp32_storage_of_an_fp32_model_is_the_default_path():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 40))
    logits = []
    for kv_dtype in ("auto", "fp32"):
        cache = make_cache(model, "h2o_2_6_20", slack=4, kv_dtype=kv_dtype)
        with torch.no_grad():
            logits.append(model(ids, past_key_values=cache, use_cache=True).logits)
        assert all(layer.direct and layer.working_nbytes() == 0 for layer in cache.layers)
    assert torch.equal(*logits)


@pytest.mark.parametrize("kv_dtype,cast", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("policy", ["full", "h2o_2_6_64", "streaming_4_64"])
def test_half_storage_equals_casting_the_full_cache(monkeypatch, kv_dtype, cast, policy):
    """Nothing evicted: storing keys and values in bf16/fp16 gives the logits of a full cache whose keys and values
    are rounded to that dtype (an fp64 model, so the rounding is the only difference)."""
    model = tiny_model("llama", dtype=torch.float64)
    torch.manual_seed(1)
    prompt, steps = torch.randint(0, VOCAB, (1, 30)), torch.randint(0, VOCAB, (12,))
    original = DynamicCache.update

    def rounded(self, key_states, value_states, *args, **kwargs):
        keys, values = original(self, key_states.to(cast).double(), value_states.to(cast).double(), *args, **kwargs)
        return keys, values

    def run(cache) -> torch.Tensor:
        with torch.no_grad():
            out = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
            for token in steps:
                out.append(model(token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(out)

    got = run(make_cache(model, policy, kv_dtype=kv_dtype, chunk_size=16))
    model.set_attn_implementation("sdpa")
    exact = run(DynamicCache(config=model.config))
    monkeypatch.setattr(DynamicCache, "update", rounded)
    want = run(DynamicCache(config=model.config))
    # the H2O attention path takes its softmax in fp32 (the probabilities are its scores): agreement to ~1e-7
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (want - exact).abs().max() > 1e-5  # the rounding is far above that tolerance


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("kv_dtype", LOGIT_BOUND)
def test_integer_storage_within_the_documented_bound_with_eviction_and_in_a_batch(family, kv_dtype):
    model = tiny_model(family)
    torch.manual_seed(2)
    ids = torch.randint(1, VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a left-padded second row
    steps = torch.randint(1, VOCAB, (25, 2, 1))
    logits = {}
    for dtype in ("auto", kv_dtype):
        cache = make_cache(model, "h2o_2_6_20", slack=4, chunk_size=16, kv_dtype=dtype)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]]
            for token in steps:
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
                out.append(model(token, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1])
        assert cache.evicted_tokens > 0
        logits[dtype] = torch.stack(out)
        mask = mask[:, :40]
    error = (logits[kv_dtype] - logits["auto"]).abs().max()
    assert 0 < error <= LOGIT_BOUND[kv_dtype] * logits["auto"].std()


def _drive_layer(kv_dtype: str, steps: int) -> tuple[H2OLayer, dict[int, torch.Tensor], RotaryDelta]:
    """A rolling H2O layer fed ``steps`` decode steps the way a model feeds it (keys rotated to their rolled
    position); returns it with the un-rotated fp32 key of every token, by original position."""
    torch.manual_seed(4)
    rotary = RotaryDelta(inv_freq=1.0 / (10_000 ** (torch.arange(0, 64, 2).float() / 64)))
    layer = H2OLayer(CachePolicy.parse("h2o_2_4_16", slack=8, score_mode="sum", kv_dtype=kv_dtype), rotary)
    raw: dict[int, torch.Tensor] = {}
    zero = torch.zeros(1, 2, 1, dtype=torch.int64)
    for t in range(steps):
        layer.begin_forward(None, [], 1)
        key = torch.randn(1, 2, 1, 64) * torch.linspace(0.5, 4, 64)
        raw[t] = key
        position = zero + (layer.row_valid[0] if layer.is_initialized else 0)
        layer.update(rotary.rotate(key, position), torch.randn(1, 2, 1, 64))
        layer.attend(torch.randn(1, 4, 1, 64), None)
    return layer, raw, rotary


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_rolled_keys_stay_as_close_as_freshly_stored_keys_over_10000_steps(kv_dtype):
    """After 10,000 steps (thousands of evictions, kept keys re-rotated at each), every kept key is as close to
    its exact value at its current position as the key was when it was stored: rolling adds no error."""
    layer, raw, rotary = _drive_layer(kv_dtype, 10_000)
    positions = layer.slot("position")[0]  # (heads, n) original positions
    now = torch.arange(layer.length).expand_as(positions)  # rolled: rank among the kept slots
    exact = torch.stack([torch.stack([raw[int(p)][0, h, 0] for p in row]) for h, row in enumerate(positions)])
    exact = rotary.rotate(exact[None], now[None])[0]
    error = (layer.keys[0].float() - exact).norm(dim=-1)
    codec = make_codec(kv_dtype, torch.float32, 64)
    stored = rotary.rotate(exact[None], (layer.slot("rot_pos")[0] - now)[None])[0] if kv_dtype != "auto" else exact
    fresh = (codec.encode(stored, torch.float32)[1] - stored).norm(dim=-1)  # its error when stored
    assert (layer.seen - positions[:, 2]).min() > 1000  # the oldest heavy hitters survived many cuts
    assert (error <= fresh * 1.001 + 1e-4 * exact.norm(dim=-1)).all()


def test_a_short_session_holds_only_its_pages_and_release_keeps_the_logits():
    model = tiny_model("llama")
    ids, steps = torch.randint(0, VOCAB, (1, 100)), torch.randint(0, VOCAB, (40,))
    policy = CachePolicy.parse("h2o_4_64_512_int4", slack=64)
    kept, released = make_cache(model, policy), make_cache(model, policy)
    with torch.no_grad():
        for cache in (kept, released):
            model(ids, past_key_values=cache, use_cache=True)
        assert kept.layers[0].n_slots == 2 * PAGE
        assert kept.nbytes() == session_nbytes(model.config, policy, torch.float32, 100)
        assert kept.working_nbytes() > 0
        released.release_working()
        assert released.working_nbytes() == 0 and released.nbytes() == kept.nbytes()
        for token in steps:
            a = model(token.view(1, 1), past_key_values=kept, use_cache=True).logits
            b = model(token.view(1, 1), past_key_values=released, use_cache=True).logits
            assert torch.equal(a, b)
        model(torch.randint(0, VOCAB, (1, 600)), past_key_values=kept, use_cache=True)
        assert kept.layers[0].n_slots == 512  # cut back to capacity: the prefill chunk's pages are freed
        for token in steps:
            model(token.view(1, 1), past_key_values=kept, use_cache=True)
    assert kept.layers[0].n_slots == 512 + 64
    assert kept.nbytes() == session_nbytes(model.config, policy, torch.float32)


@pytest.mark.parametrize(
    "policy,options",
    [
        ("h2o_4_16_64", {}),
        ("h2o_4_16_64_bf16", {}),
        ("h2o_4_16_64_int8", {}),
        ("h2o_4_16_64_k8v4", {}),
        ("streaming_4_64_int4", {}),
        ("h2o_4_16_64_int4", {"score_mode": "keydiff"}),
        ("full_int8", {}),
        ("h2o_4_16_64_k8v4", {"rolling": False}),
    ],
)
@pytest.mark.parametrize("n_tokens", [30, 100, 300])
def test_the_capacity_formula_is_what_a_cache_holds(policy, options, n_tokens):
    model = tiny_model("llama")
    cache = make_cache(model, policy, slack=16, **options)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, n_tokens)), past_key_values=cache, use_cache=True)
        for token in torch.randint(0, VOCAB, (20,)):  # decode past the budget: a bounded cache is full now
            model(token.view(1, 1), past_key_values=cache, use_cache=True)
    want = session_nbytes(model.config, cache.policy, torch.float32, n_tokens + 20)
    assert cache.nbytes() == want

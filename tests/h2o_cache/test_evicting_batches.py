"""With eviction: a left-padded `generate` batch gives each row what it gives alone, and half precision tracks fp32."""

from __future__ import annotations

import pytest
import torch

from h2o_cache import make_cache

from .models import VOCAB, tiny_model

LENGTHS = [37, 20, 29]
GENERATE = dict(
    max_new_tokens=10,
    min_new_tokens=10,
    do_sample=False,
    output_logits=True,
    return_dict_in_generate=True,
    pad_token_id=0,
)  # min_new_tokens: no row stops early at EOS alone


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize(
    "policy,rolling",
    [
        ("h2o_2_6_20", True),
        ("h2o_2_6_20", False),
        ("streaming_4_20", True),
        ("h2o_2_6_20_int8", True),
        ("h2o_2_6_20_int4", False),
        ("streaming_4_20_int4", True),
    ],
)
def test_left_padded_generate_with_eviction_matches_each_row_alone(family, policy, rolling):
    model = tiny_model(family)
    torch.manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,)) for n in LENGTHS]
    ids = torch.zeros(len(rows), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, -len(row) :], mask[r, -len(row) :] = row, 1
    with torch.no_grad():
        cache = make_cache(model, policy, rolling=rolling, slack=4)
        batch = model.generate(ids, attention_mask=mask, past_key_values=cache, **GENERATE)
        assert cache.evicted_tokens > 0
        for r, row in enumerate(rows):
            alone = model.generate(
                row[None], past_key_values=make_cache(model, policy, rolling=rolling, slack=4), **GENERATE
            )
            assert torch.equal(batch.sequences[r, -10:], alone.sequences[0, -10:])
            torch.testing.assert_close(
                torch.stack(batch.logits)[:, r], torch.stack(alone.logits)[:, 0], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_with_eviction_and_rolling_tracks_fp32(family, dtype, tolerance):
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 40))
    logits = {}
    for dt in (torch.float32, dtype):
        model = tiny_model(family, dtype=dt)
        cache = make_cache(model, "h2o_2_6_20", slack=4, chunk_size=16)
        with torch.no_grad():
            out = [model(ids, past_key_values=cache, use_cache=True).logits]
            for token in torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3)):
                out.append(model(token.view(1, 1), past_key_values=cache, use_cache=True).logits)
        assert cache.kept_tokens() <= 24 and cache.evicted_tokens > 0
        logits[dt] = torch.cat(out, 1).float()
    torch.testing.assert_close(logits[dtype], logits[torch.float32], rtol=tolerance, atol=tolerance)

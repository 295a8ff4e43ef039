"""Position rolling: a delta rotation of a cached key equals the key computed fresh at the new position."""

from __future__ import annotations

import pytest
import torch

from h2o_cache import RotaryDelta, make_cache

from .models import tiny_model

ROPES = {
    "default": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    "llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
            "rope_theta": 500000.0,
        }
    },
    "yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "rope_theta": 10000.0,
        }
    },
}


def _rotary_keys(model, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Keys as the model itself rotates them at ``positions`` (its rotary module + apply_rotary_pos_emb)."""
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    cos, sin = rotary(raw, positions[None])
    _, k = module.apply_rotary_pos_emb(raw, raw, cos, sin)
    return k


@pytest.mark.parametrize("family,rope", [("llama", rope) for rope in ROPES] + [("gpt_neox", "default")])
def test_delta_rotation_equals_fresh_rotation(family, rope):
    model = tiny_model(family, **ROPES[rope])
    delta = RotaryDelta.from_model(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert delta.rotary_dim == (head_dim // 4 if family == "gpt_neox" else head_dim)
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 50, head_dim)
    old = torch.randint(0, 3000, (50,))
    new = torch.randint(0, 300, (50,))
    moved = delta.rotate(_rotary_keys(model, raw, old), (new - old).expand(1, 2, 50))
    torch.testing.assert_close(moved, _rotary_keys(model, raw, new), rtol=1e-4, atol=1e-4)


def test_rope_whose_frequencies_depend_on_length_is_refused():
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic"):
        make_cache(model, "h2o_4_8_64")
    make_cache(model, "h2o_4_8_64", rolling=False)  # original positions need no re-rotation
    make_cache(model, "full")  # nothing is ever evicted, so nothing is re-rotated


def test_rolled_positions_stay_within_capacity_plus_slack():
    model = tiny_model("llama")
    seen_positions = []
    rotary = model.model.rotary_emb
    hook = rotary.register_forward_hook(
        lambda mod, args, kwargs, out: seen_positions.append(int(kwargs["position_ids"].max())), with_kwargs=True
    )
    cache = make_cache(model, "h2o_2_4_16", slack=4, chunk_size=8)
    with torch.no_grad():
        model(torch.randint(0, 90, (1, 100)), past_key_values=cache, use_cache=True)
        for _ in range(50):
            model(torch.randint(0, 90, (1, 1)), past_key_values=cache, use_cache=True)
    hook.remove()
    assert max(seen_positions) < 16 + 8  # capacity + max(slack, chunk)
    assert cache.get_seq_length() == 150

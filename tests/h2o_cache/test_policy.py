"""Policy names round-trip and bad configurations say what is wrong."""

from __future__ import annotations

import pytest

from h2o_cache import CachePolicy


@pytest.mark.parametrize("name", ["full", "streaming_8_256", "h2o_8_32_256", "h2o_4_16_128"])
def test_name_round_trips(name):
    policy = CachePolicy.parse(name)
    assert policy.name == name
    assert CachePolicy.parse(policy.name) == policy


def test_baseline_is_full_and_sizes_derive():
    assert CachePolicy.parse("baseline") == CachePolicy.parse("full")
    h2o = CachePolicy.parse("h2o_8_32_256", slack=16)
    assert (h2o.n_sink, h2o.n_recent, h2o.capacity, h2o.n_heavy, h2o.max_tokens) == (8, 32, 256, 216, 272)
    streaming = CachePolicy.parse("streaming_8_256")
    assert (streaming.n_recent, streaming.n_heavy, streaming.needs_scores) == (248, 0, False)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("h2o_8_32_40", {}, "must exceed sink \\+ recent"),
        ("h2o_8_32_20", {}, "must exceed sink \\+ recent"),
        ("streaming_8_8", {}, "must exceed the sink count"),
        ("h2o_-1_2_3", {}, "n_sink must be >= 0, got -1"),
        ("h2o_4_-2_16", {}, "n_recent must be >= 0"),
        ("h2o_8_32_256", {"bogus": 1}, "unknown policy option.*bogus"),
        ("h2o_8_32_256", {"slack": 1.5}, "slack must be an integer"),
        ("h2o_8_32_256", {"rolling": "no"}, "rolling must be True or False"),
        ("h2o_8_32_256", {"decay": "0.9"}, "decay must be a number"),
        ("lru_8", {}, "unknown cache policy"),
        ("h2o_8_32_256", {"slack": -1}, "slack must be >= 0"),
        ("h2o_8_32_256", {"chunk_size": 0}, "chunk_size must be >= 1"),
        ("h2o_8_32_256", {"score_mode": "max"}, "unknown score_mode"),
        ("h2o_8_32_256", {"decay": 1.5}, "decay must be in"),
    ],
)
def test_bad_configurations_raise_value_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        CachePolicy.parse(name, **options)


def test_replace_refuses_unknown_options_too():
    with pytest.raises(ValueError, match="unknown policy option.*bogus"):
        CachePolicy.parse("h2o_8_32_256").replace(bogus=1)


@pytest.mark.parametrize(
    ("name", "options", "kv_dtype"),
    [
        ("h2o_8_32_256", {}, "k8v4"),  # neither the name nor the options say: the default
        ("h2o_8_32_256_int4", {}, "int4"),  # the name's suffix wins over the default
        ("h2o_8_32_256_auto", {}, "auto"),
        ("h2o_8_32_256", {"kv_dtype": "fp16"}, "fp16"),  # so do the options
    ],
)
def test_default_kv_dtype_applies_only_when_nothing_names_one(name, options, kv_dtype):
    assert CachePolicy.parse(name, default_kv_dtype="k8v4", **options).kv_dtype == kv_dtype

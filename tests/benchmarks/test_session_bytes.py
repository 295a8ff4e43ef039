"""benchmarks/session_bytes.py end to end on a real server process (a tiny random Llama with SmolLM2's tokenizer)."""

from __future__ import annotations

import json

import pytest

from benchmarks import session_bytes

pytestmark = pytest.mark.process


def test_session_bytes_smoke(tmp_path):
    session_bytes.main(["--smoke", "--sessions", "2", "--kv-dtypes", "int8", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "session_bytes.json").read_text())
    (storage,) = result["results"]
    short, full = storage["sessions"]["short"], storage["sessions"]["full"]
    assert storage["policy"].endswith("_int8") and 90 <= short["tokens"] <= 128 < full["tokens"]
    for kind in (short, full):
        assert set(kind["cache_bytes"]) == {kind["formula"]}  # what the server reports is the capacity formula
    assert 4 * max(short["cache_bytes"]) < max(full["cache_bytes"]) < result["before_bytes"] / 2
    assert storage["gauge"] == 2 * (short["formula"] + full["formula"])
    assert storage["largest"] >= max(full["cache_bytes"])  # at rest a full session holds at most the formula's
    assert (tmp_path / "session_bytes.md").read_text().count("| int8 |") == 3  # short, full, largest

"""End to end on the real SmolLM2-135M-Instruct: loaded by the server itself, sensible multi-turn answers."""

import time

import pytest

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import generate, run_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_server():
    yield from run_server(create_app(Settings(model="smollm2", policy="h2o_8_120_256", policy_slack=32)))


def test_smollm2_answers_across_turns(smollm2_server):
    with smollm2_server.client() as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "SmolLM2 did not load"
            time.sleep(0.2)
        tokens, done = generate(
            client, "france", "What is the capital of France? Answer in one sentence.", temperature=0, max_new_tokens=40
        )
        _, second = generate(
            client,
            "france",
            "What is the capital of Germany? Answer in one sentence.",
            temperature=0,
            max_new_tokens=40,
        )
        session = client.get("/sessions/france").json()
    answer = "".join(t["text"] for t in tokens)
    assert "Paris" in answer
    assert done["finish_reason"] == "stop"  # the model ended its turn itself
    assert "Berlin" in session["messages"][-1]["content"]
    assert second["usage"]["prompt_tokens"] < done["usage"]["prompt_tokens"]
    print(
        f"\nSmolLM2: ttft {done['ttft_s']:.3f}s / {second['ttft_s']:.3f}s, "
        f"tpot {done['tpot_s'] * 1000:.1f} / {second['tpot_s'] * 1000:.1f} ms"
    )

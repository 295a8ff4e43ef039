"""Scheduler behaviour over HTTP: fair interleaving, end-of-turn and stop strings, failures, session limits."""

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import app.engine
import app.output_processor
from tests.app.conftest import generate, sse_events, wait_until


def timed_tokens(server, session_id: str, max_new_tokens: int, started: threading.Event | None = None) -> list[float]:
    times = []
    with (
        server.client() as client,
        client.stream(
            "POST",
            f"/sessions/{session_id}/generate",
            json={"message": "go", "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens},
        ) as response,
    ):
        for event, _ in sse_events(response):
            if event == "token":
                times.append(time.monotonic())
                if started is not None:
                    started.set()
    return times


def test_concurrent_sessions_interleave_token_by_token(server, gate):
    # a is long and b short; a is held at its next step until b is queued, so no timing guess is involved.
    engine = server.app.state.server.engine
    a_started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(timed_tokens, server, "fair-a", 400, a_started)
        assert a_started.wait(60)
        gate.close()
        second = pool.submit(timed_tokens, server, "fair-b", 30)
        wait_until(lambda: len(engine.in_flight()) == 2)
        gate.open()
        a, b = first.result(), second.result()
    assert len(a) == 400 and len(b) == 30
    # Round-robin: b is not queued behind a's 400 tokens; after its prefill every one of its tokens is decoded in
    # the same forward as one of a's (one token each per step), and it ends while a still runs.
    assert sum(rows == 2 and tokens == 1 for rows, tokens in gate.forwards) == 29
    assert a[0] < b[0] and b[-1] < a[-1]


def test_stop_string_ends_the_reply_without_emitting_it(server):
    body = {"max_new_tokens": 16, "temperature": 0}
    with server.client() as client:
        full = client.post("/sessions/stop-ref/generate", json={"message": "hi", "stream": False, **body}).json()
        stop = full["text"][len(full["text"]) // 2 :][:3]
        prefix = full["text"][: full["text"].index(stop)]
        tokens, done = generate(client, "stop", "hi", stop=["never-there", stop], **body)
    assert done["finish_reason"] == "stop"
    assert "".join(t["text"] for t in tokens) == prefix
    assert done["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


@pytest.fixture
def eos_model(tiny_model):
    """The tiny model, made to always predict the end-of-turn token."""
    model, tokenizer = tiny_model
    model = copy.deepcopy(model)

    def favour_eos(module, inputs, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., tokenizer.eos_token_id] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_eos)
    return model, tokenizer


def test_end_of_turn_token_ends_the_reply_unless_min_new_tokens(serve, eos_model):
    server = serve(preloaded=eos_model)
    with server.client() as client:
        tokens, done = generate(client, "eos", "hi", temperature=0)
        held_tokens, held = generate(client, "eos", "again", temperature=0, min_new_tokens=5)
        session = client.get("/sessions/eos").json()
    assert (done["finish_reason"], done["usage"]["completion_tokens"], tokens) == ("stop", 1, [])
    assert held["finish_reason"] == "stop" and held["usage"]["completion_tokens"] == 6 and len(held_tokens) == 5
    # The end-of-turn token closes the assistant message: the next turn's delta does not repeat it.
    assert session["messages"][1] == {"role": "assistant", "content": ""}
    assert held["cache_tokens_seen"] == done["cache_tokens_seen"] + held["usage"]["prompt_tokens"] + 5


def test_a_failure_mid_turn_reports_an_error_and_rolls_the_session_back(serve, monkeypatch):
    server = serve(policy="h2o_4_60_128")
    with server.client() as client:
        _, first = generate(client, "fail", "hello", max_new_tokens=4)
        before = client.get("/sessions/fail").json()
        real_sample = app.output_processor.sample
        calls = []

        def failing_sample(*args):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return real_sample(*args)

        monkeypatch.setattr(app.output_processor, "sample", failing_sample)
        with client.stream("POST", "/sessions/fail/generate", json={"message": "boom", "max_new_tokens": 4}) as r:
            events = list(sse_events(r))
        monkeypatch.setattr(app.output_processor, "sample", real_sample)
        rolled_back = client.get("/sessions/fail").json()
        _, after = generate(client, "fail", "again", max_new_tokens=4)
        session = client.get("/sessions/fail").json()
    assert [e for e, _ in events] == ["token", "error"]
    assert "injected failure" in events[-1][1]["error"]["message"]
    assert rolled_back["turns"] == 1 and rolled_back["messages"] == before["messages"]
    assert rolled_back["cache_tokens"] == 0
    # The rebuilt cache re-reads the kept history once: the whole first turn plus the new message.
    assert after["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert session["turns"] == 2 and [m["content"] for m in session["messages"] if m["role"] == "user"] == [
        "hello",
        "again",
    ]


def test_the_session_limit_answers_429(serve):
    server = serve(max_sessions=1)
    with server.client() as client:
        generate(client, "only", "hi", max_new_tokens=2)
        refused = client.post("/sessions/another/generate", json={"message": "hi"})
        assert client.get("/sessions/another").status_code == 404
        generate(client, "only", "still works", max_new_tokens=2)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "too_many_sessions"
    assert "retry-after" in refused.headers


def test_a_fault_outside_any_turn_ends_the_round_and_the_engine_keeps_serving(server, monkeypatch):
    """A bug in the scheduler itself (not in one turn's step) fails that step's turns; the worker lives on."""
    real, raised = app.engine.schedule, []

    def broken_once(*args):
        if not raised:
            raised.append(True)
            raise RuntimeError("the round broke")
        return real(*args)

    monkeypatch.setattr(app.engine, "schedule", broken_once)
    with server.client() as client:
        failed = client.post(
            "/sessions/round-fault/generate", json={"message": "hi", "max_new_tokens": 4, "stream": False}
        )
        assert failed.status_code == 500 and "the round broke" in failed.json()["error"]["message"]
        assert generate(client, "round-fault", "again", max_new_tokens=4)[1]["finish_reason"] == "length"

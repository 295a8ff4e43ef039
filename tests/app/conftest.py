"""Fixtures for the server tests: a tiny random-weight Llama with SmolLM2's tokenizer, and real uvicorn servers
on ephemeral ports."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.main import create_app
from app.settings import Settings
from h2o_cache.loading import resolve_model_path, tiny_llama
from loadtest.streams import sse_events as parse_sse

# A small policy so a few short turns fill the cache and force evictions.
SMALL_POLICY = "h2o_4_8_32"
SMALL_SLACK = 8


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer and chat template, from the locally converted model (no download)."""
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """h2o_cache.loading.tiny_llama, with the session's tokenizer."""
    return tiny_llama()[0], tokenizer


class Gate:
    """Holds the model's forwards while closed, so a test decides when the engine may take its next step instead of
    guessing how fast the machine is; records each forward as (rows fed a token, tokens per row)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forwards: list[tuple[int, int]] = []
        self._open = threading.Event()
        self._open.set()
        self._handle = model.register_forward_pre_hook(self._hold, with_kwargs=True)

    def _hold(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rows, tokens = kwargs["input_ids"].shape
        mask = kwargs.get("attention_mask")  # the batching pool's idle rows are masked out
        self.forwards.append((int(mask[:, -1].sum()) if mask is not None else rows, tokens))
        assert self._open.wait(60), "a test left the gate closed"

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self._open.set()
        self._handle.remove()


@pytest.fixture
def gate(tiny_model) -> Iterator[Gate]:
    """A Gate on the tiny model every test server here runs."""
    held = Gate(tiny_model[0])
    yield held
    held.remove()


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll `condition` until it holds (a gate for state the test cannot be told about directly)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


@dataclass
class Server:
    url: str
    app: object

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def run_server(app, timeout_s: float = 30) -> Iterator[Server]:
    """Serve `app` with uvicorn on 127.0.0.1:<ephemeral> in a thread until the generator is closed."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


@pytest.fixture
def serve(tiny_model) -> Iterator[Callable[..., Server]]:
    """Start a server on the tiny model with settings overrides; stopped at the end of the test."""
    running = []

    def start(preloaded=None, **overrides) -> Server:
        settings = Settings(
            **{"policy": SMALL_POLICY, "policy_slack": SMALL_SLACK, "replica_name": "test-replica", **overrides}
        )
        gen = run_server(create_app(settings, preloaded=preloaded or tiny_model))
        running.append(gen)
        return next(gen)

    yield start
    for gen in running:
        gen.close()


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[Server]:
    """One shared server on the tiny model with the small policy."""
    settings = Settings(policy=SMALL_POLICY, policy_slack=SMALL_SLACK, replica_name="test-replica")
    yield from run_server(create_app(settings, preloaded=tiny_model))


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict | str]]:
    """(event, data) pairs of a text/event-stream (loadtest.streams parses it), data JSON-decoded when it is JSON."""
    for event, text in parse_sse(response.iter_bytes()):
        try:
            yield event, json.loads(text)
        except json.JSONDecodeError:
            yield event, text


def generate(client: httpx.Client, session_id: str, message: str, **body) -> tuple[list[dict], dict]:
    """One streamed turn: (token events, done event). Fails the test on an error event."""
    tokens, done = [], None
    with client.stream("POST", f"/sessions/{session_id}/generate", json={"message": message, **body}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(response):
            assert event != "error", data
            if event == "token":
                tokens.append(data)
            elif event == "done":
                done = data
    assert done is not None, "stream ended without a done event"
    return tokens, done


def scrape(client: httpx.Client) -> dict[str, float]:
    """GET /metrics parsed with prometheus_client's parser: {sample name with sorted labels: value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_for_metric(client: httpx.Client, name: str, value: float, timeout_s: float = 10) -> None:
    wait_until(lambda: scrape(client).get(name) == value, timeout_s)

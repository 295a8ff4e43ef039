"""Locust users for h2o-serve: multi-turn chats that hold a server-side session.

* `SessionChatUser` chats through ``POST /sessions/{id}/generate`` (native SSE: ``token`` events, then ``done``).
* `OpenAIChatUser` chats through ``POST /v1/chat/completions`` with ``stream: true`` and the ``X-Session-Id`` header.

A user deletes its session (``DELETE /sessions/{id}``) when it moves on to a new one and when it stops.

Every streamed reply is reported three times, so locust's stats and CSV carry the latencies users feel:
the request itself (``POST``, send -> end of stream), ``TTFT`` (send -> first token) and ``TPOT`` (mean gap between
the following tokens; replies of one token report no TPOT). All times are measured on the client.

Environment: ``LOCUST_MAX_NEW_TOKENS`` (default 32), ``LOCUST_TURNS`` (turns per session before a user starts a new
one, default 6), ``H2O_API_KEY`` (sent as a bearer token when the server requires keys).
"""

from __future__ import annotations

import os
import time
import uuid

import requests
from gevent import GreenletExit
from locust import HttpUser, between, task

# Locust puts the locustfile's folder on sys.path, so the sibling module imports by its bare name.
from streams import StreamError, read_native, read_openai

MAX_NEW_TOKENS = int(os.environ.get("LOCUST_MAX_NEW_TOKENS", "32"))
TURNS = int(os.environ.get("LOCUST_TURNS", "6"))
API_KEY = os.environ.get("H2O_API_KEY", "")

PROMPTS = (
    "Hi! Can you tell me a short fact about the moon?",
    "Interesting. How far away is it from the earth?",
    "And how long would it take to get there by car?",
    "Which planet in the solar system is the largest?",
    "Name three of its moons, please.",
    "Thanks. Summarise what we talked about in one sentence.",
    "Write a haiku about the sea.",
    "What is the boiling point of water at sea level?",
)


class _ChatUser(HttpUser):
    abstract = True
    wait_time = between(0.2, 1.0)

    session_id: str | None = None

    def on_start(self) -> None:
        self.new_session()

    def on_stop(self) -> None:
        self.end_session()

    def new_session(self) -> None:
        self.end_session()
        self.session_id = uuid.uuid4().hex
        self.turn = 0

    def end_session(self) -> None:
        """Delete the finished session (as a well-behaved client does), so long runs stay under the server's
        session limit instead of waiting for the idle TTL."""
        if self.session_id is not None and self.turn > 0:
            with self.client.delete(
                f"/sessions/{self.session_id}", headers=self.headers(), name="/sessions/[id]", catch_response=True
            ) as response:
                # 404: the server already dropped it (TTL, restart); nothing left to clean up.
                if response.status_code in (204, 404):
                    response.success()
        self.session_id = None

    def next_prompt(self) -> str:
        if self.turn >= TURNS:
            self.new_session()
        prompt = PROMPTS[self.turn % len(PROMPTS)]
        self.turn += 1
        return prompt

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}

    def stream(self, path: str, name: str, body: dict, headers: dict[str, str], read) -> None:
        """POST `body`, read the whole stream with `read`, report the request, TTFT and TPOT under `name`."""
        start = time.perf_counter()
        with self.client.post(
            path, json=body, headers=headers, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                times = read(response)
            except (StreamError, ValueError, requests.RequestException) as exc:
                response.failure(f"{type(exc).__name__}: {exc}")
                return
            except GreenletExit:
                # Locust kills users still running at the end of --stop-timeout; count the cut reply, or it would
                # vanish from the stats.
                response.failure("interrupted: the run ended before the reply did")
                raise
            # With stream=True locust timed only the headers; report the whole stream instead.
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            response.success()
        if not times:
            return  # an immediate end of turn: nothing to time
        fire = self.environment.events.request.fire
        fire(
            request_type="TTFT",
            name=name,
            response_time=(times[0] - start) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
        if len(times) > 1:
            tpot_ms = (times[-1] - times[0]) / (len(times) - 1) * 1000
            fire(
                request_type="TPOT",
                name=name,
                response_time=tpot_ms,
                response_length=len(times),
                exception=None,
                context={},
            )


class SessionChatUser(_ChatUser):
    """Chats over `TURNS` turns in one session through the native streaming route."""

    weight = 3

    @task
    def chat_turn(self) -> None:
        body = {"message": self.next_prompt(), "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.7, "stream": True}
        self.stream(
            f"/sessions/{self.session_id}/generate", "/sessions/[id]/generate", body, self.headers(), read_native
        )


class OpenAIChatUser(_ChatUser):
    """Chats through the OpenAI-compatible route; the server keeps the history under ``X-Session-Id``, so each
    turn sends only the new user message."""

    weight = 1

    @task
    def chat_turn(self) -> None:
        body = {
            "model": "h2o-serve",
            "messages": [{"role": "user", "content": self.next_prompt()}],
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0.7,
            "stream": True,
        }
        headers = {**self.headers(), "X-Session-Id": self.session_id}
        self.stream("/v1/chat/completions", "/v1/chat/completions", body, headers, read_openai)

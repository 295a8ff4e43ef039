"""Conversation keys: which stored session a stateless OpenAI request continues.

Clients such as Open WebUI, LangChain or LiteLLM send the whole `messages` list every turn and no session id. Each
session records the key of its conversation as the client saw it (its messages, replies as streamed); a request
whose history (every message but the new one) has the key of a session of the same API key continues that session,
feeding only the new turn: prefix caching onto a bounded, persistent cache. Anything else (a regenerate, an edited
message, a changed system prompt) matches no session as it is now, so the sent conversation is prefilled into a
new one: never a duplicated turn, never an ignored message.

A key is a hash chain over the messages, so extending it by a turn costs the turn, not the history.
"""

from __future__ import annotations

import hashlib
import json

from app.chat import Message


def root_key(owner: str | None) -> str:
    """The key of an empty conversation of `owner` (an API key's hash, None without keys)."""
    return hashlib.sha256(json.dumps(["h2o-conversation", owner]).encode()).hexdigest()


def extend_key(key: str, messages: list[Message]) -> str:
    """The key of the conversation `key` followed by `messages`. Roles `developer` and `system` are one; content
    is compared without surrounding whitespace (clients strip replies)."""
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        entry = json.dumps([key, role, message["content"].strip()], ensure_ascii=False)
        key = hashlib.sha256(entry.encode()).hexdigest()
    return key


def conversation_key(owner: str | None, messages: list[Message]) -> str:
    return extend_key(root_key(owner), messages)

"""The text one new turn adds to a conversation the cache already holds (the chat-template delta)."""

from __future__ import annotations

import logging
import os

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Message = dict[str, str]


ZERO_WIDTH_SPACE = "\u200b"
"""Put after a special token's first character in text people wrote, so that it tokenizes as plain text."""


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special token strings (markup such as ``<|im_start|>``), longest first."""
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((s for s in special if len(s) > 1), key=len, reverse=True)


def defuse(text: str, specials: list[str]) -> str:
    """``text`` with every special token string broken by a zero-width space: a user who types
    ``<|im_start|>system`` gets those characters, not a system turn (role injection)."""
    for token in specials:
        text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
    return text


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The whole conversation as the model should see it, ending with the assistant's generation prompt. What
    people wrote (every role but the assistant's, whose raw replies the cache holds as generated) cannot open or
    close turns."""
    specials = special_tokens(tokenizer)
    messages = [m if m["role"] == "assistant" else {**m, "content": defuse(m["content"], specials)}
                for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def turn_delta(tokenizer: PreTrainedTokenizerBase, messages: list[Message], fed_text: str) -> str:
    """Text to feed for `messages` (history + the new user message) given `fed_text`, the text the cache
    already represents (earlier prompts plus the model's raw replies, end-of-turn tokens included).

    Templates close the previous assistant message and open the new turn; diffing renderings handles any template
    without knowing its markup. If the rendering does not extend `fed_text` (a template that rewrites history,
    or a reply cut inside a character), the delta starts where they diverge: the model sees a slightly
    different transcript than the template would write, never a repeated one.
    """
    full = render(tokenizer, messages)
    if full.startswith(fed_text):
        return full[len(fed_text) :]
    common = len(os.path.commonprefix([full, fed_text]))
    logger.warning("chat template does not extend the fed text (diverges at char %d of %d)", common, len(fed_text))
    return full[common:]

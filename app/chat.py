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


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The conversation as the model should see it (by default ending with the assistant's generation prompt).
    What people wrote (every role but the assistant's, whose raw replies the cache holds as generated) cannot open
    or close turns."""
    specials = special_tokens(tokenizer)
    messages = [m if m["role"] == "assistant" else {**m, "content": defuse(m["content"], specials)} for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


CONTEXT_MESSAGES = 4
"""Messages before the new turn that the delta is rendered with (two exchanges, so strict-alternation templates
see user/assistant pairs, and the closing markup of the exchange before the last is there to match)."""


def context(system: str | None, history: list[Message]) -> list[Message]:
    """What a new turn is rendered after: the system prompt (templates may render every turn differently without
    one) and the last CONTEXT_MESSAGES messages, never the whole history, so a turn costs the same at turn 10,000
    as at turn 10."""
    recent = history[-CONTEXT_MESSAGES:]
    if not recent or system is None or recent[0]["role"] == "system":
        return recent
    return [{"role": "system", "content": system}, *recent]


def turn_delta(
    tokenizer: PreTrainedTokenizerBase, before: list[Message], new: list[Message], fed_prompt: str, fed_reply: str
) -> str:
    """Text to feed for the `new` messages, given `before` (see `context`) and what the cache holds at its end:
    `fed_prompt`, the last turn's fed text, then `fed_reply`, the model's raw reply (end-of-turn token included);
    both empty when the cache is empty (the whole rendering is fed).

    Templates close the previous assistant message and open the new turn; finding the last turn's fed text in a
    rendering of `before` and reading on handles any template without knowing its markup. Where the rendering
    does not continue with `fed_reply` (a reply cut inside a character, a template that trims), the delta starts
    where they diverge: the model sees a slightly different transcript than the template would write, never a
    repeated one.
    """
    full = render(tokenizer, before + new)
    if not fed_prompt and not fed_reply:
        return full
    previous = render(tokenizer, before, add_generation_prompt=False)
    reply_len = len(before[-1]["content"]) if before and before[-1]["role"] == "assistant" else 0
    at = previous.rfind(fed_prompt, 0, max(len(previous) - reply_len, 0))
    if at < 0 or not full.startswith(previous[: at + len(fed_prompt)]):
        common = len(os.path.commonprefix([full, previous]))
        logger.warning("chat template does not render the last turn's prompt again; feeding from char %d", common)
        return full[common:]
    reply_at = at + len(fed_prompt)
    matched = len(os.path.commonprefix([full[reply_at:], fed_reply]))
    if matched < len(fed_reply):
        logger.warning(
            "chat template does not extend the fed reply (diverges at char %d of %d)", matched, len(fed_reply)
        )
    return full[reply_at + matched :]

"""Request and response bodies of the HTTP API (native and OpenAI-compatible), validated by pydantic."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SESSION_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
SESSION_ID_RULE = "[A-Za-z0-9_.-]{1,128}, not . or .."
DOT_SEGMENTS = frozenset({".", ".."})
"""Ids the pattern allows but a URL path cannot name (clients resolve them away, RFC 3986). Ids never reach the
filesystem: snapshot files are named by a hash of the id."""


def valid_session_id(session_id: str) -> bool:
    return re.fullmatch(SESSION_ID_PATTERN, session_id) is not None and session_id not in DOT_SEGMENTS


MAX_STOP_STRINGS = 8
"""Stop strings a request may send (each is checked against the text after every token), on every route."""
MAX_STOP_CHARS = 256
"""Characters in one stop string: after every token the held-back tail is matched against each prefix of each stop
string, so the work per token grows with the square of their length."""
MAX_POLICY_CHARS = 64
"""Characters in a policy name (`h2o_4_256_512_int8` has 18; a name is parsed, and echoed in errors)."""
MAX_LEGACY_LOGPROBS = 5
"""Alternatives per position the legacy completion's `logprobs` may ask for (OpenAI's limit)."""
MAX_TOP_LOGPROBS = 20
"""Alternatives per position `top_logprobs` may ask for (OpenAI's limit)."""
MAX_API_KEY_CHARS = 1024
"""Characters in an API key (`X-API-Key`, or `Authorization: Bearer <key>` with its 7 more); the server refuses to
start with a longer one configured."""
MAX_CLIENT_ID_CHARS = 64
"""Characters in an `X-H2O-Client` id (the web chat sends a random UUID)."""
MAX_KV_DTYPE_CHARS = 16
"""Characters in a kv_dtype (the names, h2o_cache.quant.KV_DTYPES, are far shorter)."""
MAX_MODEL_CHARS = 256
"""Characters in the OpenAI `model` field (ignored: the server serves one model, but echoed in the reply)."""
MAX_USER_CHARS = 256
"""Characters in the OpenAI `user` field (the session id when X-Session-Id is absent: then 128, SESSION_ID_RULE)."""
MAX_CHAT_MESSAGES = 1024
"""Messages in one chat completion request. Only the last (and a leading system message) is used today: the
server keeps the history; generous so that a client may resend a long history."""
MAX_CONTENT_PARTS = 256
"""Text parts in one message's content list (they are joined into one string)."""
MAX_NAME_CHARS = 64
"""Characters in a chat message's `name` (OpenAI's participant name; ignored)."""

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]

FinishReason = Literal["stop", "length", "cancelled"]


class SamplingFields(BaseModel):
    """Sampling parameters shared by the native and the OpenAI request; limits that depend on settings are
    checked by the routes."""

    max_new_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_new_tokens")
    min_new_tokens: int = Field(0, ge=0, description="the end-of-turn token is suppressed until this many")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: bool = Field(False, description="each token's log-probability under the model (before sampling settings)")
    top_logprobs: int = Field(
        0,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="with `logprobs`: this many most likely tokens at each position, with theirs",
    )

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> SamplingFields:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    system: str | None = Field(
        None,
        description="system prompt; only on a session's first turn (the server's "
        "max_message_chars applies, as to `message`)",
    )
    stream: bool = True
    policy: str | None = Field(
        None,
        max_length=MAX_POLICY_CHARS,
        description="cache policy, only when this request creates the session; a name may end "
        "in _<kv_dtype> (h2o_4_256_512_int8)",
    )
    kv_dtype: str | None = Field(
        None,
        max_length=MAX_KV_DTYPE_CHARS,
        description="how the new session stores keys and values: auto (the model's dtype), "
        "fp32, bf16, fp16, int8, k8v4 (int8 keys, int4 values) or int4; default: the policy "
        "name's suffix, else the server's H2O_KV_DTYPE",
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="prompt tokens fed in this turn (the new turn's delta)")
    completion_tokens: int
    cached_tokens: int = Field(
        0, description="tokens of the conversation the session's cache had seen before this turn, not fed again"
    )


class TurnResult(BaseModel):
    """The `done` event of a stream, and (with `text`) the non-streaming response."""

    finish_reason: FinishReason
    usage: Usage
    cache_tokens: int = Field(description="tokens the session's cache holds after this turn")
    cache_tokens_seen: int = Field(description="tokens the session has processed in all")
    cache_budget: int | None = Field(description="most tokens the cache can hold (None: unbounded)")
    ttft_s: float
    tpot_s: float
    text: str | None = None
    logprobs: list[TokenEvent] | None = Field(None, description="non-streaming, with `logprobs`: every token event")


class Logprob(BaseModel):
    token_id: int
    token: str = Field(description="the token's own text")
    logprob: float


class TokenEvent(BaseModel):
    text: str = Field(
        description="text this token adds to the reply (held back while it may start a stop string "
        "or ends inside a character)"
    )
    token_id: int
    logprob: Logprob | None = Field(None, description="with `logprobs`: the sampled token's")
    top_logprobs: list[Logprob] | None = Field(None, description="with `top_logprobs`: the most likely tokens")


class SessionInfo(BaseModel):
    id: str
    policy: str
    kv_dtype: str
    turns: int
    cache_tokens: int
    cache_tokens_seen: int
    cache_budget: int | None
    evicted_tokens: int
    cache_bytes: int = Field(
        description="bytes the session's cache holds (codes, scales, scores, positions; whole "
        "pages), as of its last step"
    )
    busy: bool
    created_at: float
    updated_at: float


class SessionDetail(SessionInfo):
    messages: list[dict[str, str]]


class SessionList(BaseModel):
    sessions: list[SessionInfo]


def _join_text_parts(content: object) -> object:
    """OpenAI's content may be a list of parts; text parts are joined, anything else (images, audio) refused. An
    assistant message that only called tools has none (null)."""
    if content is None:
        return ""
    if not isinstance(content, list):
        return content
    if len(content) > MAX_CONTENT_PARTS:
        raise ValueError(f"content has {len(content)} parts; at most {MAX_CONTENT_PARTS} are allowed")
    if not all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
    return "".join(part["text"] for part in content)


class ChatMessage(BaseModel):
    """Other fields (tool_calls, tool_call_id ...) are ignored: a history may hold them, the model sees the text."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[str, BeforeValidator(_join_text_parts)] = Field(
        description="the server's max_message_chars applies to the messages used (the last, a leading system one)"
    )
    name: str | None = Field(None, max_length=MAX_NAME_CHARS, description="ignored")


UNSUPPORTED_OPENAI_FIELDS: dict[str, object] = {
    "tools": [],
    "functions": [],
    "tool_choice": "none",
    "function_call": "none",
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "audio": None,
    "prediction": None,
    "web_search_options": None,
}
"""OpenAI request fields this server does not implement, with the value that asks for nothing (accepted)."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = Field(description="json_object and json_schema (constrained decoding) are not supported")


class OpenAIRequest(SamplingFields):
    """What OpenAI's chat and completion requests share. `null` is accepted for every field OpenAI types as
    nullable (the default applies); a field this server does not implement, asking for something, is a 422 naming
    it; other unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    unsupported: ClassVar[dict[str, object]] = UNSUPPORTED_OPENAI_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_unsupported(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        for name, neutral in cls.unsupported.items():
            if data.get(name) not in (None, neutral):
                raise ValueError(f"`{name}` is not supported by this server")
        return {name: value for name, value in data.items() if value is not None}

    model: str = Field("h2o-serve", max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="one choice per request")
    user: str | None = Field(
        None, max_length=MAX_USER_CHARS, description="OpenAI's end-user id; ignored (it does not name a session)"
    )


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's chat request (see app.api.chat_completions for how the messages are used)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(OpenAIRequest):
    """OpenAI's legacy text completion: the prompt is fed as it is (no chat template) to a cache of this request
    only. `logprobs` is the number of alternatives (0-5), in the legacy format."""

    unsupported: ClassVar[dict[str, object]] = {**UNSUPPORTED_OPENAI_FIELDS, "suffix": "", "best_of": 1}

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list of one string is accepted; token-id prompts are not)"
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)

    @model_validator(mode="after")
    def _legacy_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's log-probabilities) is not supported")
        return self

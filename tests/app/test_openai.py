"""The OpenAI-compatible endpoint, driven by the official `openai` client (sync and async) and LangChain's
`ChatOpenAI`, the way front-ends call it: the whole conversation every turn, no session id."""

import asyncio

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from tests.app.conftest import scrape

GREEDY = {"model": "tiny", "max_tokens": 6, "temperature": 0}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_sessions(server) -> dict[str, dict]:
    """The sessions stateless requests made, with their messages."""
    with server.client() as http:
        ids = [s["id"] for s in http.get("/sessions").json()["sessions"] if s["id"].startswith("chat-")]
        return {i: http.get(f"/sessions/{i}").json() for i in ids}


def reuse(server) -> dict[str, float]:
    with server.client() as http:
        metrics = scrape(http)
    return {o: metrics[f'h2o_conversation_reuse_total{{outcome="{o}"}}'] for o in ("hit", "miss", "rebuild")}


def test_streaming_and_non_streaming_agree_on_an_explicit_session(client, server):
    request = {**GREEDY, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    stream = client.chat.completions.create(**request, stream=True, extra_headers={"X-Session-Id": "oa-stream"})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"

    whole = client.chat.completions.create(**request, extra_headers={"X-Session-Id": "oa-whole"})
    assert whole.choices[0].message.content == streamed != ""
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(
        **{**request, "messages": [{"role": "user", "content": "More"}]}, extra_headers={"X-Session-Id": "oa-whole"}
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= whole.usage.prompt_tokens + 7 and second.usage.prompt_tokens > cached  # whole conversation
    with server.client() as http:
        session = http.get("/sessions/oa-whole").json()
    assert session["turns"] == 2
    assert [m["content"] for m in session["messages"] if m["role"] == "user"] == ["Hi", "More"]


def test_a_stateless_chat_continues_one_session_and_feeds_only_the_new_turn(client, server):
    before, counts = set(chat_sessions(server)), reuse(server)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    session_ids = set()
    for turn in range(3):
        raw = client.chat.completions.with_raw_response.create(**GREEDY, messages=history)
        reply = raw.parse()
        session_ids.add(raw.headers["X-Session-Id"])  # the session the turn ran in
        history += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": f"and {turn}?"},
        ]
        if turn:
            assert reply.usage.prompt_tokens_details.cached_tokens > 0
            assert reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens < 20  # the new turn
    (new,) = set(chat_sessions(server)) - before
    session = chat_sessions(server)[new]
    assert session["turns"] == 3 and session["messages"] == history[:-1] and session_ids == {new}
    assert reuse(server) == {**counts, "hit": counts["hit"] + 2, "miss": counts["miss"] + 1}


def test_a_regenerate_an_edit_and_a_new_system_prompt_never_duplicate_or_ignore_a_message(client, server):
    history, before = [{"role": "user", "content": "Name a colour"}], set(chat_sessions(server))
    first = client.chat.completions.create(**GREEDY, messages=history).choices[0].message.content
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Another one"}]
    second = client.chat.completions.create(**GREEDY, messages=history).choices[0].message.content
    (original,) = set(chat_sessions(server)) - before
    before, counts = chat_sessions(server), reuse(server)

    variants = {
        "regenerate": history,
        "edit": [{"role": "user", "content": "Name a fruit"}, *history[1:]],
        "system": [{"role": "developer", "content": "Answer in French."}, *history],
    }
    for name, messages in variants.items():
        reply = client.chat.completions.create(**GREEDY, messages=messages).choices[0].message.content
        (new,) = set(chat_sessions(server)) - set(before)
        session = chat_sessions(server)[new]
        expected = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        assert session["messages"] == [*expected, {"role": "assistant", "content": reply}], name
        before = chat_sessions(server)
    assert reuse(server) == {**counts, "rebuild": counts["rebuild"] + 3}
    left = chat_sessions(server)[original]  # the original conversation is left as it was
    assert left["turns"] == 2 and left["messages"] == [*history, {"role": "assistant", "content": second}]


def test_user_is_an_end_user_id_not_a_session(client, server):
    before = set(chat_sessions(server))
    for _ in range(2):
        client.chat.completions.create(**GREEDY, messages=[{"role": "user", "content": "Hi"}], user="person-1")
    assert len(set(chat_sessions(server)) - before) == 2


def test_async_streaming_with_usage_and_the_models_list(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            models = await aclient.models.list()
            (model,) = models.data
            assert (await aclient.models.retrieve(model.id)).id == model.id
            history = [{"role": "user", "content": "Hi"}]
            for _ in range(2):
                stream = await aclient.chat.completions.create(
                    **{**GREEDY, "model": model.id},
                    messages=history,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [c async for c in stream]
                assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
                text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
                history += [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
            return chunks[-1].usage

    usage = asyncio.run(run())
    assert usage.completion_tokens == 6 and usage.prompt_tokens_details.cached_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + 6


def test_langchain_chat_openai_holds_a_stateless_conversation(server):
    llm = ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=5, max_retries=0
    )
    messages = [SystemMessage("You are terse."), HumanMessage("Hi")]
    before, counts = set(chat_sessions(server)), reuse(server)
    for turn in range(2):
        messages += [llm.invoke(messages), HumanMessage(f"again {turn}")]
    assert isinstance(messages[2], AIMessage) and messages[2].usage_metadata["output_tokens"] == 5
    (new,) = set(chat_sessions(server)) - before
    assert chat_sessions(server)[new]["turns"] == 2
    assert reuse(server)["hit"] == counts["hit"] + 1
    regenerated = llm.invoke(messages[:4])  # the last question asked again
    edited = llm.invoke([messages[0], HumanMessage("Hello"), *messages[2:]])
    sessions = chat_sessions(server)
    contents = sorted(
        [m["content"] for m in s["messages"] if m["role"] == "user"] for i, s in sessions.items() if i not in before
    )
    assert contents == sorted([["Hi", "again 0"], ["Hi", "again 0"], ["Hello", "again 0", "again 1"]])
    assert reuse(server)["rebuild"] == counts["rebuild"] + 2 and regenerated.content is not None and edited.content


def test_nullable_fields_take_null_and_unimplemented_ones_are_refused(client, server):
    reply = client.chat.completions.create(
        model="tiny",
        max_tokens=2,
        temperature=None,
        top_p=None,
        seed=None,
        stop=None,
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert reply.choices[0].finish_reason == "length"
    tool_history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "So?"},
    ]
    assert client.chat.completions.create(model="tiny", max_tokens=2, messages=tool_history).choices
    for field, value in {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "logit_bias": {"1": 5},
        "frequency_penalty": 0.5,
        "response_format": {"type": "json_object"},
    }.items():
        with pytest.raises(openai.UnprocessableEntityError, match=field):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], **{field: value})
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_errors_arrive_as_openai_errors(client, server):
    before = set(chat_sessions(server))
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=3)
    with pytest.raises(openai.UnprocessableEntityError, match="last message"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "Hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="not empty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ""}])
    with pytest.raises(openai.UnprocessableEntityError, match="only text content"):
        client.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
        )
    with pytest.raises(openai.UnprocessableEntityError, match="at most 8 items"):  # as the native route
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], stop=[f"s{i}" for i in range(9)]
        )
    with pytest.raises(openai.UnprocessableEntityError, match="X-Session-Id"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], extra_headers={"X-Session-Id": "../x"}
        )
    assert set(chat_sessions(server)) == before  # none of the rejected requests created a session


def test_text_content_parts_are_joined(client, server):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": parts}],
        max_tokens=2,
        extra_headers={"X-Session-Id": "oa-parts"},
    )
    with server.client() as http:
        assert http.get("/sessions/oa-parts").json()["messages"][0] == {"role": "user", "content": "Hello, there"}


def test_logprobs_on_the_chat_route_and_the_native_route(client, server):
    reply = client.chat.completions.create(
        **GREEDY, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:  # greedy: the sampled token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    stream = client.chat.completions.create(
        **GREEDY, messages=[{"role": "user", "content": "Hi"}], logprobs=True, stream=True
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    assert all(e.top_logprobs == [] for e in streamed)
    assert (
        client.chat.completions.create(**GREEDY, messages=[{"role": "user", "content": "Hi"}]).choices[0].logprobs
        is None
    )
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs"):
        client.chat.completions.create(**GREEDY, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)
    with server.client() as http:
        native = http.post(
            "/sessions/native-logprobs/generate",
            json={
                "message": "Hi",
                "temperature": 0,
                "max_new_tokens": 6,
                "stream": False,
                "logprobs": True,
                "top_logprobs": 2,
            },
        ).json()
    assert [e["logprob"]["logprob"] for e in native["logprobs"]] == pytest.approx([e.logprob for e in content])
    assert all(len(e["top_logprobs"]) == 2 for e in native["logprobs"])


def test_legacy_completions_feed_the_prompt_as_it_is_and_store_nothing(client, server, tokenizer):
    before = set(chat_sessions(server))
    with server.client() as http:
        listed = {s["id"] for s in http.get("/sessions").json()["sessions"]}
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens == len(
        tokenizer("Once upon a time").input_ids
    )
    logprobs = done.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == done.choices[0].text and logprobs.text_offset[0] == 0
    streamed = client.completions.create(
        model="tiny",
        prompt=["Once upon a time"],
        max_tokens=5,
        temperature=0,
        stream=True,
        echo=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon a time" + done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5
    for field, value in {"suffix": "end", "best_of": 2, "logit_bias": {"1": 1}}.items():
        with pytest.raises(openai.UnprocessableEntityError, match=field):
            client.completions.create(model="tiny", prompt="x", **{field: value})
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt=[1, 2, 3])
    with server.client() as http:
        assert {s["id"] for s in http.get("/sessions").json()["sessions"]} == listed
    assert set(chat_sessions(server)) == before

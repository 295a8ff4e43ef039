"""The OpenAI-compatible endpoint, driven by the official `openai` client."""

import openai
import pytest


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_streaming_and_non_streaming_agree_and_keep_session_history(client, server):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    stream = client.chat.completions.create(**request, stream=True, extra_headers={"X-Session-Id": "oa-stream"})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"

    whole = client.chat.completions.create(**request, user="oa-whole")
    assert whole.choices[0].message.content == streamed != ""
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8

    history = [*request["messages"], {"role": "assistant", "content": streamed}, {"role": "user", "content": "More"}]
    second = client.chat.completions.create(**{**request, "messages": history}, user="oa-whole")
    assert second.usage.prompt_tokens < whole.usage.prompt_tokens  # only the new turn was fed
    with server.client() as http:
        session = http.get("/sessions/oa-whole").json()
    assert session["turns"] == 2
    assert [m["content"] for m in session["messages"] if m["role"] == "user"] == ["Hi", "More"]


def test_a_session_id_is_required(client):
    with pytest.raises(openai.UnprocessableEntityError, match="X-Session-Id"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])


def test_errors_arrive_as_openai_errors(client, server):
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], user="oa-bad",
                                       temperature=3)
    with pytest.raises(openai.UnprocessableEntityError, match="last message"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "Hi"}],
                                       user="oa-bad")
    with pytest.raises(openai.UnprocessableEntityError, match="not empty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ""}], user="oa-bad")
    with pytest.raises(openai.UnprocessableEntityError, match="only text content"):
        client.chat.completions.create(model="tiny", user="oa-bad", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(openai.UnprocessableEntityError, match="at most 8 items"):  # as the native route
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], user="oa-bad",
                                       stop=[f"s{i}" for i in range(9)])
    with server.client() as http:
        assert http.get("/sessions/oa-bad").status_code == 404  # none of the rejected requests created it


def test_text_content_parts_are_joined(client, server):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=2,
                                   user="oa-parts")
    with server.client() as http:
        assert http.get("/sessions/oa-parts").json()["messages"][0] == {"role": "user", "content": "Hello, there"}

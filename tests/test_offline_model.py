"""The offline model, driven by the real ``openai`` client over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageParam,
    ChatCompletionUserMessageParam,
)

from pipeline.offline_model import (
    OfflineModelServer,
    compose_answer,
    count_prompt_tokens,
)

MODEL = "offline"


@pytest.fixture
async def server() -> AsyncIterator[OfflineModelServer]:
    async with OfflineModelServer(token_delay_ms=1) as srv:
        yield srv


@pytest.fixture
async def client(server: OfflineModelServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="offline", max_retries=0) as c:
        yield c


def user(text: str) -> ChatCompletionUserMessageParam:
    return {"role": "user", "content": text}


async def stream_text(
    client: openai.AsyncOpenAI,
    messages: list[ChatCompletionMessageParam],
    *,
    max_tokens: int | None = None,
    include_usage: bool = False,
) -> tuple[list[ChatCompletionChunk], list[str]]:
    """All chunks and the content deltas of one streamed completion."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        stream=True,
        max_tokens=max_tokens if max_tokens is not None else openai.omit,
        stream_options={"include_usage": True} if include_usage else openai.omit,
    )
    chunks = [chunk async for chunk in stream]
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    return chunks, deltas


async def test_lists_the_model(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in page.data] == [(MODEL, "model", "offline")]


async def test_stream_and_non_stream_give_the_same_text(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        user("hello there offline model"),
    ]
    completion = await client.chat.completions.create(model=MODEL, messages=messages)
    chunks, deltas = await stream_text(client, messages)

    expected = "".join(compose_answer(MODEL, messages))
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert "".join(deltas) == expected
    assert deltas == compose_answer(MODEL, messages)  # one token per delta
    assert len(deltas) >= 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None
    assert 12 <= len(deltas) <= 40
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(deltas)
    assert completion.usage.prompt_tokens == count_prompt_tokens(messages)


async def test_stream_usage_with_include_usage(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [user("count my tokens please")]
    chunks, deltas = await stream_text(client, messages, include_usage=True)
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(deltas) == len(compose_answer(MODEL, messages))
    assert last.usage.prompt_tokens == count_prompt_tokens(messages) == 4 + 3
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in body)


async def test_no_usage_chunk_without_include_usage(client: openai.AsyncOpenAI) -> None:
    chunks, _ = await stream_text(client, [user("no usage")])
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize("n", [1, 7, 300])
async def test_max_tokens_gives_exactly_n_tokens(client: openai.AsyncOpenAI, n: int) -> None:
    messages: list[ChatCompletionMessageParam] = [user("tell me a long story about streams")]
    chunks, deltas = await stream_text(client, messages, max_tokens=n)
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=n,
    )

    assert deltas == compose_answer(MODEL, messages, max_tokens=n)
    assert len(deltas) == n
    assert chunks[-1].choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "".join(deltas)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == n
    assert len("".join(deltas).split()) == n


async def test_max_tokens_extends_and_truncates_the_natural_answer() -> None:
    messages = [user("prefix check")]
    natural = compose_answer(MODEL, messages)
    assert compose_answer(MODEL, messages, max_tokens=3) == natural[:3]
    assert compose_answer(MODEL, messages, max_tokens=100)[: len(natural)] == natural


async def test_deterministic(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(model=MODEL, messages=[user("same prompt")])
    second = await client.chat.completions.create(model=MODEL, messages=[user("same prompt")])
    other = await client.chat.completions.create(model=MODEL, messages=[user("other prompt")])
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


async def test_text_parts_are_flattened(client: openai.AsyncOpenAI) -> None:
    parts = [{"type": "text", "text": "split"}, {"type": "text", "text": "message"}]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": None},
        {"role": "user", "content": parts},
    ]  # raw dicts: `content: None` is outside the SDK's types but real clients send it
    completion = await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    text = completion.choices[0].message.content
    assert text == "".join(compose_answer(MODEL, messages))
    assert text is not None and text.startswith('You said: "split message".')


async def test_answer_depends_on_earlier_turns(client: openai.AsyncOpenAI) -> None:
    async def answer(earlier: str) -> str:
        messages: list[ChatCompletionMessageParam] = [
            user(earlier),
            {"role": "assistant", "content": "noted"},
            user("what did I say before?"),
        ]
        completion = await client.chat.completions.create(model=MODEL, messages=messages)
        text = completion.choices[0].message.content
        assert text == "".join(compose_answer(MODEL, messages))
        assert text is not None
        return text

    apples = await answer("I like green apples")
    pears = await answer("I like ripe pears")
    assert apples != pears
    assert 'Earlier you said: "I like green apples".' in apples
    assert "This is turn 2." in apples
    assert 'You said: "what did I say before?".' in apples


async def test_unknown_model_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-nope", messages=[user("hi")])
    assert caught.value.code == "model_not_found"
    assert caught.value.status_code == 404


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'{"model": "offline"}', "invalid_body"),
        (b'{"model": "offline", "messages": []}', "invalid_body"),
        (b'{"model": "offline", "messages": [{"role": "user", "content": "x"}], '
         b'"max_tokens": 0}', "invalid_body"),
        (b'{"model": "offline", "messages": [{"role": "user", "content": "x"}], '
         b'"max_tokens": 100001}', "invalid_body"),
        (b'{"model": "offline", "messages": [{"role": "user", "content": "x"}], '
         b'"max_tokens": "7"}', "invalid_body"),
        (b"[1, 2]", "invalid_body"),
    ],
)  # fmt: skip
async def test_bad_body_is_a_400_in_openai_shape(
    server: OfflineModelServer, data: bytes, code: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.base_url}/chat/completions",
            data=data,
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 400
        assert resp.content_type == "application/json"
        body = await resp.json()
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error["param"] is None
    assert error["message"]


async def test_unknown_route_is_a_json_error(server: OfflineModelServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.base_url}/nope") as resp,
    ):
        assert resp.status == 404
        body = await resp.json()
    assert set(body["error"]) == {"message", "type", "code", "param"}


async def test_stream_is_data_frames_only(server: OfflineModelServer) -> None:
    payload = {"model": MODEL, "messages": [user("raw frames")], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.base_url}/chat/completions", json=payload) as resp,
    ):
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    assert frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-1])


async def test_client_disconnect_is_counted(
    server: OfflineModelServer, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[user("a very long answer")], stream=True, max_tokens=100_000
    )
    received = 0
    async for _ in stream:
        received += 1
        if received == 2:
            break
    assert server.stats.active_streams == 1
    await stream.close()

    for _ in range(200):  # bounded: up to about 2 s
        if server.stats.disconnected:
            break
        await asyncio.sleep(0.01)
    assert server.stats.disconnected == 1
    assert server.stats.active_streams == 0
    assert server.stats.completed == 0
    assert server.stats.requests == 1


async def test_stats_count_completed_requests(
    server: OfflineModelServer, client: openai.AsyncOpenAI
) -> None:
    await stream_text(client, [user("one")])
    await client.chat.completions.create(model=MODEL, messages=[user("two")])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=[user("three")])
    assert (server.stats.requests, server.stats.completed, server.stats.disconnected) == (3, 2, 0)
    assert server.stats.active_streams == 0


async def test_server_attributes() -> None:
    server = OfflineModelServer(token_delay_ms=1)
    with pytest.raises(RuntimeError):
        _ = server.port
    async with server:
        assert server.port > 0
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    with pytest.raises(RuntimeError):
        _ = server.stats

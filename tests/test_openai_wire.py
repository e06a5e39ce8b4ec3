"""The OpenAI wire in-process (pytest-aiohttp): a proxy of the model with the pipeline around
it. Client tools, every request parameter forwarded or refused, n choices, logprobs,
structured outputs, ``GET /v1/models/{id}``, and what a dropped stream does to its turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import server
from api.common import OFFLINE, STORE
from api.wire import FORWARDED_PARAMS, REFUSED_PARAMS
from core.config import Settings
from pipeline.offline_model import compose_answer, create_offline_app
from tests.sse_client import assert_wire_rules, read_frames
from tests.test_providers import tiny_server

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
MODEL = "offline"
NOTES = "The launch code is 7421, keep it safe."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "minLength": 3},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 0,
                               "flush_interval_ms": 20, "allow_fs_base": tmp_path / "ws"}
    options.update(overrides)
    return Settings(**options)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text(NOTES + "\n")
    return await aiohttp_client(server.create_app(make_settings(tmp_path)))


@pytest.fixture
async def sdk(client: TestClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x",
                                  max_retries=0) as sdk:
        yield sdk


class Upstream:
    """A stand-in provider: the offline model, recording every request body it gets."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.app = create_offline_app(token_delay_ms=0)

        @web.middleware
        async def record(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
            if request.path == "/v1/chat/completions":
                self.bodies.append(json.loads(await request.read()))
            return await handler(request)

        self.app.middlewares.append(record)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    stand_in = Upstream()
    async with TestServer(stand_in.app, host="127.0.0.1") as test_server:
        yield stand_in, str(test_server.make_url("/v1"))


async def proxied(aiohttp_client: ClientFactory, tmp_path: Path, base_url: str,
                  **overrides: Any) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(
        tmp_path, openai_base_url=base_url, openai_api_key="k", **overrides)))


async def native_events(client: TestClient, request_id: str) -> list[dict[str, Any]]:
    async with client.get(f"/v1/requests/{request_id}/events") as resp:
        assert resp.status == 200
        return assert_wire_rules(await read_frames(resp), trace=False)


async def tool_rows(client: TestClient) -> list[tuple[Any, ...]]:
    store = client.server.app[STORE]
    await store.flush()
    return await store.aquery("SELECT tool, status, params, ok FROM tool_executions ORDER BY started_at")


# -- every parameter reaches the provider, or is a 400 that names it ---------------------------
EVERY_PARAMETER: dict[str, Any] = {
    "temperature": 0.3, "top_p": 0.9, "stop": ["zzz"], "seed": 7,
    "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "strict": True,
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
                   "additionalProperties": False}}},
    "logprobs": True, "top_logprobs": 2, "user": "u-1", "presence_penalty": 0.5,
    "frequency_penalty": -0.5, "logit_bias": {"1234": -100}, "n": 2,
    "metadata": {"team": "qa"}, "store": False, "service_tier": "auto",
    "reasoning_effort": "low", "verbosity": "low", "modalities": ["text"],
    "prediction": {"type": "content", "content": "x"}, "parallel_tool_calls": False,
    "tools": [WEATHER], "tool_choice": "none", "web_search_options": {},
    "prompt_cache_key": "k1", "safety_identifier": "s1", "prompt_cache_retention": "24h",
}


async def test_every_parameter_reaches_the_provider_unchanged(
        aiohttp_client: ClientFactory, tmp_path: Path, upstream: tuple[Upstream, str]) -> None:
    stand_in, base_url = upstream
    assert set(EVERY_PARAMETER) == set(FORWARDED_PARAMS)
    client = await proxied(aiohttp_client, tmp_path, base_url)
    for stream in (False, True):
        stand_in.bodies.clear()
        async with client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "stream": stream, "max_completion_tokens": 50,
            **EVERY_PARAMETER}) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
        (sent,) = stand_in.bodies
        assert {k: sent[k] for k in EVERY_PARAMETER} == EVERY_PARAMETER
        assert sent["max_tokens"] == 50 and sent["stream"] is True
        assert sent["messages"] == ASK


async def test_vendor_extras_are_forwarded_and_null_means_not_given(
        aiohttp_client: ClientFactory, tmp_path: Path, upstream: tuple[Upstream, str]) -> None:
    stand_in, base_url = upstream
    client = await proxied(aiohttp_client, tmp_path, base_url)
    async with client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "top_k": 40, "repetition_penalty": 1.1,
            "temperature": None, "conversation_id": "conv_x", "on_disconnect": "continue"}) as resp:
        assert resp.status == 200, await resp.text()
    (sent,) = stand_in.bodies
    assert sent["top_k"] == 40 and sent["repetition_penalty"] == 1.1
    # Our own extensions and nulls do not reach the provider.
    assert not {"temperature", "conversation_id", "on_disconnect"} & set(sent)


async def test_vendor_extras_are_a_400_when_the_deployer_says_reject(
        aiohttp_client: ClientFactory, tmp_path: Path, upstream: tuple[Upstream, str]) -> None:
    stand_in, base_url = upstream
    client = await proxied(aiohttp_client, tmp_path, base_url, openai_wire_extra_fields="reject")
    async with client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "top_k": 40}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "top_k" and "top_k" in error["message"]
    assert stand_in.bodies == []


@pytest.mark.parametrize(("extra", "param"), [
    *[({name: value}, name) for name, value in {
        "audio": {"voice": "alloy", "format": "wav"}, "functions": [{"name": "f"}],
        "function_call": "auto"}.items()],
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"n": 17}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"temperature": 3}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"stream_options": {"include_usage": True, "colour": "red"}}, "stream_options.colour"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
])
async def test_refused_parameters_are_a_400_naming_them(
        aiohttp_client: ClientFactory, tmp_path: Path, upstream: tuple[Upstream, str],
        extra: dict[str, Any], param: str) -> None:
    stand_in, base_url = upstream
    client = await proxied(aiohttp_client, tmp_path, base_url)
    async with client.post("/v1/chat/completions",
                           json={"model": MODEL, "messages": ASK, **extra}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == param, error
    assert param.split(".")[0] in error["message"]
    assert stand_in.bodies == []  # refused at the door: nothing reached the model
    assert set(REFUSED_PARAMS) == {"audio", "functions", "function_call"}


async def test_the_roundtable_model_refuses_model_parameters(client: TestClient) -> None:
    async with client.post("/v1/chat/completions", json={
            "model": "roundtable", "messages": ASK, "temperature": 0.2}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "temperature"


# -- client tools: the model's calls go back to the client, never run here ----------------------
async def test_a_client_tool_loop_not_streamed(client: TestClient, sdk: openai.AsyncOpenAI) -> None:
    first = await sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.refusal is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]

    follow_up = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    final = await sdk.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == 'The tool get_weather returned: "sunny, 21 degrees".'

    # The native stream and the store see the client's call, marked as the client's.
    request_id = first.id.replace("chatcmpl-", "req_")
    events = await native_events(client, request_id)
    calls = [e for e in events if e["type"] == "tool_call"]
    assert [(e["tool"], e["side"], e["call_id"], e["params"]) for e in calls] == [
        ("get_weather", "client", call.id, arguments)]
    assert not [e for e in events if e["type"] == "tool_result"]
    deltas = [e for e in events if e["type"] == "tool_call_delta"]
    assert (deltas[0]["call_id"], deltas[0]["name"]) == (call.id, "get_weather")
    assert "".join(e["arguments"] for e in deltas) == call.function.arguments  # type: ignore[union-attr]
    assert [e["finish_reason"] for e in events if e["type"] == "stream_end"] == ["tool_calls"]
    assert [row[:2] for row in await tool_rows(client)] == [("get_weather", "client")]


async def test_a_client_tool_call_streams_as_openai_deltas(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", stream=True,  # type: ignore[list-item]
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    heads = [d.tool_calls[0] for d in deltas if d.tool_calls and d.tool_calls[0].id]
    pieces = [d.tool_calls[0].function.arguments for d in deltas  # type: ignore[union-attr]
              if d.tool_calls and not d.tool_calls[0].id]
    assert [(h.index, h.type, h.function.name) for h in heads] == [(0, "function", "get_weather")]  # type: ignore[union-attr]
    assert len([p for p in pieces if p]) == 3  # as the model streamed them (in three pieces)
    arguments = (heads[0].function.arguments or "") + "".join(pieces)  # type: ignore[union-attr, arg-type]
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].choices == []


async def test_tool_choice_forced_none_and_absent(sdk: openai.AsyncOpenAI) -> None:
    other = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
    plain = [{"role": "user", "content": "Tell me something."}]
    forced = await sdk.chat.completions.create(
        model=MODEL, messages=plain, tools=[WEATHER, other],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "lookup"}})
    assert [c.function.name for c in forced.choices[0].message.tool_calls or []] == ["lookup"]  # type: ignore[union-attr]
    none = await sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                             tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == "".join(compose_answer(MODEL, ASK))
    absent = await sdk.chat.completions.create(model=MODEL, messages=plain, tools=[WEATHER])  # type: ignore[list-item]
    assert absent.choices[0].finish_reason == "stop"  # not named, not required: text


async def test_the_server_workspace_is_never_touched_by_openai_callers(
        client: TestClient, sdk: openai.AsyncOpenAI) -> None:
    asked = [{"role": "user", "content": "read the file notes.txt"}]
    plain = await sdk.chat.completions.create(model=MODEL, messages=asked)  # type: ignore[arg-type]
    assert NOTES not in (plain.choices[0].message.content or "")
    read = {"type": "function", "function": {"name": "fs_read", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
    mine = await sdk.chat.completions.create(model=MODEL, messages=asked, tools=[read])  # type: ignore[arg-type, list-item]
    (call,) = mine.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"path": "notes.txt"}  # type: ignore[union-attr]
    rows = await tool_rows(client)
    assert [(tool, status, ok) for tool, status, _, ok in rows] == [("fs_read", "client", None)]
    # The native wire keeps its agent loop.
    async with client.post("/v1/orchestrate", json={"messages": asked}) as resp:
        events = assert_wire_rules(await read_frames(resp), trace=False)
    assert [e["ok"] for e in events if e["type"] == "tool_result"] == [True]


async def test_tool_messages_in_a_stored_conversation_do_not_break_it(
        sdk: openai.AsyncOpenAI) -> None:
    first = await sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    conversation = (await sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK)).headers["X-Conversation-Id"]  # type: ignore[arg-type]
    call = (first.choices[0].message.tool_calls or [])[0]
    loop = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "rain"}]
    second = await sdk.chat.completions.create(model=MODEL, messages=loop, tools=[WEATHER],  # type: ignore[arg-type, list-item]
                                               extra_body={"conversation_id": conversation})
    assert second.choices[0].message.content == 'The tool get_weather returned: "rain".'
    third = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "and tomorrow?"}],
        extra_body={"conversation_id": conversation})
    assert (third.choices[0].message.content or "").startswith('You said: "and tomorrow?".')


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "x"},
    {"role": "user", "content": "x", "tool_call_id": "c"},
    {"role": "user"},
    {"role": "function", "name": "f", "content": "x"},
])
async def test_malformed_tool_messages_are_a_400(client: TestClient, message: dict[str, Any]) -> None:
    async with client.post("/v1/chat/completions",
                           json={"model": MODEL, "messages": [message]}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"].startswith("messages.0")


# -- the offline model's parameters through the wire --------------------------------------------
async def test_n_choices_streamed_and_not(sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.chat.completions.create(model=MODEL, messages=ASK, n=3)  # type: ignore[arg-type]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert texts[0] == "".join(compose_answer(MODEL, ASK))
    assert len(set(texts)) == 3
    stream = await sdk.chat.completions.create(model=MODEL, messages=ASK, n=3, stream=True)  # type: ignore[arg-type]
    parts: dict[int, list[str]] = {}
    finishes: dict[int, str | None] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            parts.setdefault(choice.index, []).append(choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert ["".join(parts[i]) for i in range(3)] == texts
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}


async def test_seed_stop_and_logprobs(sdk: openai.AsyncOpenAI) -> None:
    seeded = [await sdk.chat.completions.create(model=MODEL, messages=ASK, seed=seed)  # type: ignore[arg-type]
              for seed in (1, 1, 2)]
    contents = [r.choices[0].message.content for r in seeded]
    assert contents[0] == contents[1] != contents[2]
    cut = await sdk.chat.completions.create(model=MODEL, messages=ASK, stop=[" This is"])  # type: ignore[arg-type]
    assert cut.choices[0].message.content == 'You said: "What is the weather in Paris? Use get_weather.".'
    assert cut.choices[0].finish_reason == "stop"
    for stream in (False, True):
        if stream:
            chunks = [c async for c in await sdk.chat.completions.create(
                model=MODEL, messages=ASK, logprobs=True, top_logprobs=2, stream=True)]  # type: ignore[arg-type]
            items = [item for c in chunks if c.choices and c.choices[0].logprobs
                     for item in c.choices[0].logprobs.content or []]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = await sdk.chat.completions.create(model=MODEL, messages=ASK, logprobs=True,  # type: ignore[arg-type]
                                                       top_logprobs=2)
            assert answer.choices[0].logprobs is not None
            items = answer.choices[0].logprobs.content or []
            text = answer.choices[0].message.content or ""
        assert "".join(item.token for item in items) == text
        assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in items)


class Forecast(pydantic.BaseModel):
    city: str
    days: list[int]
    windy: bool


async def test_structured_outputs_parse_a_pydantic_model(sdk: openai.AsyncOpenAI) -> None:
    parsed = await sdk.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast)  # type: ignore[arg-type]
    assert isinstance(parsed.choices[0].message.parsed, Forecast)
    as_object = await sdk.chat.completions.create(model=MODEL, messages=ASK,  # type: ignore[arg-type]
                                                  response_format={"type": "json_object"})
    assert json.loads(as_object.choices[0].message.content or "") == {
        "answer": "".join(compose_answer(MODEL, ASK))}


# -- models -----------------------------------------------------------------------------------
async def test_get_one_model(sdk: openai.AsyncOpenAI) -> None:
    model = await sdk.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "offline")
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


# -- disconnects ----------------------------------------------------------------------------------
async def left_early(client: TestClient, **extra: Any) -> str:
    """Start a long streamed answer, read three chunks, leave; the request id."""
    resp = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "stream": True, "max_tokens": 400, **extra})
    request_id = resp.headers["X-Request-Id"]
    seen = 0
    async for _ in resp.content:
        seen += 1
        if seen >= 6:  # three chunks, each a data line and a blank line
            break
    resp.close()
    return request_id


async def until(condition: Callable[[], bool]) -> None:
    """Wait (10 s at most) for something the model's server notices a moment later."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never held")


async def status_of(client: TestClient, request_id: str) -> dict[str, Any]:
    for _ in range(200):
        async with client.get(f"/v1/requests/{request_id}") as resp:
            body: dict[str, Any] = await resp.json()
        if body["status"] != "running":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError("the turn never ended")


async def test_a_dropped_stream_cancels_its_turn_by_default(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path, offline_token_delay_ms=5)))
    offline = client.server.app[OFFLINE]
    request_id = await left_early(client)
    body = await status_of(client, request_id)
    assert body["status"] == "cancelled"
    await until(lambda: offline.stats.disconnected == 1)
    assert offline.stats.completed == 0
    # The partial answer is kept: a prefix of the whole answer, shorter than it.
    partial = body["response"]["content"]
    whole = "".join(compose_answer(MODEL, ASK, max_tokens=400))
    assert body["response"]["status"] == "cancelled"
    assert partial and whole.startswith(partial) and len(partial) < len(whole)


async def test_on_disconnect_continue_per_request_and_per_deployment(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path, offline_token_delay_ms=1)))
    body = await status_of(client, await left_early(client, on_disconnect="continue"))
    assert body["status"] == "completed"
    other = await aiohttp_client(server.create_app(make_settings(
        tmp_path / "b", offline_token_delay_ms=1, openai_wire_on_disconnect="continue")))
    assert (await status_of(other, await left_early(other)))["status"] == "completed"
    assert (await status_of(other, await left_early(other, on_disconnect="cancel")))["status"] == "cancelled"


async def test_a_client_that_leaves_a_non_streamed_answer_cancels_it_too(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path, offline_token_delay_ms=5)))
    offline = client.server.app[OFFLINE]
    orchestrator = client.server.app[server.ORCHESTRATOR]
    asking = asyncio.ensure_future(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "max_tokens": 2000}))
    for _ in range(200):  # until the model is streaming to the server
        if offline.stats.active_streams:
            break
        await asyncio.sleep(0.02)
    (turn,) = orchestrator.live.values()
    asking.cancel()  # the client gives up and closes its connection
    with pytest.raises(asyncio.CancelledError):
        await asking
    async with asyncio.timeout(10):
        result = await turn.result
    assert result.status == "cancelled"
    await until(lambda: offline.stats.disconnected == 1)
    assert offline.stats.completed == 0


async def test_a_model_refusal_reaches_the_client_as_refusal(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    async def refusing(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta in ({"role": "assistant", "refusal": ""}, {"refusal": "I can't"},
                      {"refusal": " help with that."}):
            body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(body)}\n\n".encode())
        end = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        return response

    async with tiny_server(refusing) as url:
        client = await aiohttp_client(server.create_app(make_settings(
            tmp_path, openai_base_url=url, openai_api_key="k", models=[MODEL])))
        async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x",
                                      max_retries=0) as sdk:
            whole = await sdk.chat.completions.create(model=MODEL, messages=ASK)  # type: ignore[arg-type]
            chunks = [c async for c in await sdk.chat.completions.create(
                model=MODEL, messages=ASK, stream=True)]  # type: ignore[arg-type]
    assert (whole.choices[0].message.content, whole.choices[0].message.refusal) == (
        None, "I can't help with that.")
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices) == \
        "I can't help with that."
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


async def test_a_parameter_the_provider_refuses_is_the_clients_400(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    async def strict(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        unknown = sorted(set(body) - {"model", "messages", "stream", "stream_options"})
        return web.json_response({"error": {
            "message": f"Unrecognized request argument supplied: {unknown[0]}",
            "type": "invalid_request_error", "param": None, "code": None}}, status=400)

    async with tiny_server(strict) as url:
        client = await aiohttp_client(server.create_app(make_settings(
            tmp_path, openai_base_url=url, openai_api_key="k", models=[MODEL],
            model_max_retries=0)))
        async with client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": ASK, "top_k": 5}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert error["code"] == "upstream_refused"
    assert error["message"].endswith("Unrecognized request argument supplied: top_k")

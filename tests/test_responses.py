"""The Responses wire in-process (pytest-aiohttp) with the official ``openai`` client
(``AsyncOpenAI`` pointed at the test server) and the offline model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI
from openai.types.responses import Response

import server
from core.config import Settings
from pipeline.offline_model import compose_answer

MODEL = "offline"
ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"db_path": tmp_path / "events.duckdb",
                               "offline_token_delay_ms": 1, "flush_interval_ms": 20}
    options.update(overrides)
    return Settings(**options)


def answer(messages: list[dict[str, str]], *, max_tokens: int | None = None) -> str:
    return "".join(compose_answer(MODEL, messages, max_tokens=max_tokens))


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(tmp_path)))


@pytest.fixture
async def sdk(client: TestClient) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused",
                           max_retries=0) as sdk:
        yield sdk


async def raw_events(client: TestClient, path: str) -> list[dict[str, Any]]:
    """The Responses SSE of ``path`` as dicts, checking the framing: ``event:`` equals the
    data's type, no ``id:`` lines, no comments."""
    async with client.get(path) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.text()
    events: list[dict[str, Any]] = []
    import json
    for block in body.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert [line.split(":", 1)[0] for line in lines] == ["event", "data"], block
        data = json.loads(lines[1].removeprefix("data: "))
        assert lines[0] == f"event: {data['type']}"
        events.append(data)
    return events


# -- create, non-streamed ---------------------------------------------------------------
async def test_create_answers_a_response_object_and_retrieve_returns_the_same(
        sdk: AsyncOpenAI, client: TestClient) -> None:
    created = await sdk.responses.create(model=MODEL, input="hello there",
                                         instructions="Be brief.", metadata={"k": "v"})

    expected = answer([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "hello there"}])
    assert created.id.startswith("resp_")
    assert created.object == "response"
    assert created.status == "completed"
    assert created.output_text == expected
    assert [item.type for item in created.output] == ["message"]
    assert created.instructions == "Be brief."
    assert created.metadata == {"k": "v"}
    assert created.usage is not None
    assert created.usage.output_tokens == len(compose_answer(MODEL, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]))
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    assert created.error is None and created.incomplete_details is None
    retrieved = await sdk.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()
    # The turn underneath is an ordinary request of the store.
    request_id = "req_" + created.id.removeprefix("resp_")
    row = await client.app[server.STORE].request_row(request_id)
    assert row is not None and (row["kind"], row["status"]) == ("responses", "completed")


async def test_items_input_and_previous_response_id_continue_the_conversation(
        sdk: AsyncOpenAI) -> None:
    first = await sdk.responses.create(model=MODEL, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "my name is Ada"}]}])
    second = await sdk.responses.create(model=MODEL, previous_response_id=first.id, input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "who am I?"}]}])

    history = [{"role": "user", "content": "my name is Ada"},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "who am I?"}]
    assert second.output_text == answer(history)
    assert "This is turn 2" in second.output_text
    assert second.previous_response_id == first.id
    # Only the latest response of a conversation can be continued (no branching).
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model=MODEL, previous_response_id=first.id, input="again")
    assert caught.value.code == "previous_response_not_latest"


async def test_assistant_output_text_items_are_history_given_by_the_client(
        sdk: AsyncOpenAI) -> None:
    items: list[Any] = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "uno"}]},
        {"role": "user", "content": "two"},
    ]
    response = await sdk.responses.create(model=MODEL, input=items)
    assert response.output_text == answer([
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"}])


async def test_max_output_tokens_makes_the_response_incomplete(sdk: AsyncOpenAI) -> None:
    response = await sdk.responses.create(model=MODEL, input="count", max_output_tokens=4)

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == answer([{"role": "user", "content": "count"}], max_tokens=4)
    assert response.usage is not None and response.usage.output_tokens == 4
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]


# -- streams --------------------------------------------------------------------------------
async def test_a_stream_is_the_whole_event_family_and_replays_identically(
        sdk: AsyncOpenAI, client: TestClient) -> None:
    stream = await sdk.responses.create(model=MODEL, input="stream it", stream=True)
    live = [event.model_dump(exclude_unset=True) async for event in stream]

    text = answer([{"role": "user", "content": "stream it"}])
    deltas = [e for e in live if e["type"] == "response.output_text.delta"]
    assert [e["type"] for e in live] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * len(deltas),
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in live] == list(range(len(live)))
    assert "".join(e["delta"] for e in deltas) == text
    final = Response.model_validate(live[-1]["response"])
    assert final.status == "completed" and final.output_text == text
    # From the store (the turn has ended): the same events, the same numbers.
    rid = final.id
    assert await raw_events(client, f"/v1/responses/{rid}?stream=true") == live
    for n in (0, 3, len(live) - 2, len(live) - 1):
        resumed = await sdk.responses.retrieve(rid, stream=True, starting_after=n)
        assert [e.model_dump(exclude_unset=True) async for e in resumed] == live[n + 1:]


async def test_the_stream_helper_accumulates_the_final_response(sdk: AsyncOpenAI) -> None:
    async with sdk.responses.stream(model=MODEL, input="help me") as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()

    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == answer([{"role": "user", "content": "help me"}])
    assert (await sdk.responses.retrieve(final.id)).output_text == final.output_text


async def test_resume_follows_a_live_background_response_without_gap_or_repeat(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path,
                                                                  offline_token_delay_ms=15)))
    async with AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x",
                           max_retries=0) as sdk:
        created = await sdk.responses.create(model=MODEL, input="slowly", background=True,
                                             max_output_tokens=40)
        assert created.status == "in_progress" and created.background is True
        head: list[dict[str, Any]] = []
        async with await sdk.responses.retrieve(created.id, stream=True) as first:
            async for event in first:
                head.append(event.model_dump(exclude_unset=True))
                if len(head) == 8:
                    break  # the client leaves mid-stream; the response runs on
        tail_stream = await sdk.responses.retrieve(created.id, stream=True,
                                                   starting_after=head[-1]["sequence_number"])
        tail = [event.model_dump(exclude_unset=True) async for event in tail_stream]
        whole = await raw_events(client, f"/v1/responses/{created.id}?stream=true")

    assert head + tail == whole
    assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
    assert whole[-1]["type"] == "response.incomplete"  # 40 tokens: the limit was reached


async def test_cancel_stops_a_background_response(sdk: AsyncOpenAI, client: TestClient) -> None:
    created = await sdk.responses.create(model=MODEL, input="a long one", background=True,
                                         max_output_tokens=5000)
    cancelled = await sdk.responses.cancel(created.id)

    assert cancelled.status == "cancelled"
    assert (await sdk.responses.retrieve(created.id)).status == "cancelled"
    events = await raw_events(client, f"/v1/responses/{created.id}?stream=true")
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "cancelled"
    # A finished response is answered as it is; a foreground one cannot be cancelled.
    assert (await sdk.responses.cancel(created.id)).status == "cancelled"
    done = await sdk.responses.create(model=MODEL, input="quick")
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.cancel(done.id)
    assert caught.value.code == "not_background"


async def test_concurrent_creates_are_all_stored(sdk: AsyncOpenAI) -> None:
    prompts = [f"question {i}" for i in range(12)]
    created = await asyncio.gather(*(sdk.responses.create(model=MODEL, input=p) for p in prompts))
    retrieved = await asyncio.gather(*(sdk.responses.retrieve(r.id) for r in created))

    assert [r.output_text for r in retrieved] == [answer([{"role": "user", "content": p}])
                                                  for p in prompts]
    assert len({r.id for r in retrieved}) == len(prompts)


async def test_store_false_is_not_retrievable_and_delete_forgets(sdk: AsyncOpenAI) -> None:
    unstored = await sdk.responses.create(model=MODEL, input="secret", store=False)
    assert unstored.status == "completed" and unstored.store is False
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(unstored.id)

    kept = await sdk.responses.create(model=MODEL, input="keep")
    await sdk.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(kept.id)


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "input": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL}, 400, "input"),
    ({"model": MODEL, "input": []}, 400, "input"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image",
                                                              "image_url": "x"}]}]},
     400, "input.0.content.0"),
    ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, 400, "input.0"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, 400, "input.0.role"),
    ({"model": MODEL, "input": "x", "background": True, "store": False}, 400, "background"),
    ({"model": MODEL, "input": "x", "include": ["reasoning.encrypted_content"]}, 400, "include"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_object"}}}, 400,
     "text.format.type"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "nope", "input": "x"}, 404, "model"),
    ({"model": MODEL, "input": "x", "previous_response_id": "resp_unknown"}, 404,
     "previous_response_id"),
])
async def test_bad_requests_are_refused_naming_the_field(
        client: TestClient, body: dict[str, Any], status: int, param: str) -> None:
    async with client.post("/v1/responses", json=body) as resp:
        assert resp.status == status, await resp.text()
        error = (await resp.json())["error"]
    assert error["param"] == param, error


async def test_too_many_input_items_are_refused(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, responses_max_input_items=2)))
    items = [{"role": "user", "content": str(i)} for i in range(3)]
    async with client.post("/v1/responses", json={"model": MODEL, "input": items}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "input" and "RESPONSES_MAX_INPUT_ITEMS" in error["message"]
    async with client.post("/v1/responses", json={"model": MODEL, "input": items[:2]}) as resp:
        assert resp.status == 200


async def test_retrieve_errors(client: TestClient) -> None:
    async with client.get("/v1/responses/resp_nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "response_not_found"
    async with client.get("/v1/responses/resp_" + "x" * 200) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_id"
    async with client.post("/v1/responses", json={"model": MODEL, "input": "x"}) as resp:
        rid = (await resp.json())["id"]
    for bad in ("x", "-2", "1.5"):
        async with client.get(f"/v1/responses/{rid}?stream=true&starting_after={bad}") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "starting_after"


async def test_a_failing_model_is_a_502_and_a_failed_stored_response(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, openai_base_url=dead, openai_api_key="k", models=["m"], default_model="m",
        model_max_retries=0, model_timeout_s=5)))
    async with client.post("/v1/responses", json={"model": "m", "input": "x"}) as resp:
        assert resp.status == 502, await resp.text()
        request_id = resp.headers["X-Request-Id"]
    rid = "resp_" + request_id.removeprefix("req_")
    async with client.get(f"/v1/responses/{rid}") as resp:
        stored = await resp.json()
    assert stored["status"] == "failed"
    assert stored["error"]["code"] == "server_error" and "unreachable" in stored["error"]["message"]
    events = await raw_events(client, f"/v1/responses/{rid}?stream=true")
    assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                           "response.failed"]


def _dead_port() -> int:
    from tests.procs import free_port
    return free_port()  # nothing listens there


# -- function tools: a client tool loop ------------------------------------------------------
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


async def test_a_function_call_and_its_output_make_a_client_tool_loop(
        sdk: AsyncOpenAI, client: TestClient) -> None:
    stream = await sdk.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"}, stream=True)
    events = [event.model_dump(exclude_unset=True) async for event in stream]
    final = Response.model_validate(events[-1]["response"])

    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == calls[0].arguments
    assert isinstance(__import__("json").loads(calls[0].arguments)["city"], str)

    follow = await sdk.responses.create(
        model=MODEL, previous_response_id=final.id, tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert follow.status == "completed"
    assert [item.type for item in follow.output] == ["message"]
    assert follow.output_text  # the model answered after the result
    # The model saw the call and its result in order (the call restored from the first
    # response, since the client sent only its output).
    store = client.app[server.STORE]
    await store.flush()
    [(messages,)] = await store.aquery(
        "SELECT data->'messages' FROM events WHERE request_id = ? AND type = 'llm_call'",
        ["req_" + follow.id.removeprefix("resp_")])
    sent = __import__("json").loads(messages)
    assert [m["role"] for m in sent[-2:]] == ["assistant", "tool"]
    assert sent[-2]["tool_calls"][0]["id"] == calls[0].call_id
    assert sent[-1] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}


async def test_the_servers_own_tools_never_run_for_a_responses_client(
        sdk: AsyncOpenAI, client: TestClient) -> None:
    workspace = client.app[server.SETTINGS].fs_base
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "notes.txt").write_text("The launch code is 7421.")

    response = await sdk.responses.create(model=MODEL, input="read the file notes.txt")

    assert response.status == "completed"
    assert "7421" not in response.output_text
    assert [item.type for item in response.output] == ["message"]
    store = client.app[server.STORE]
    await store.flush()
    rows = await store.aquery(
        "SELECT count(*) FROM events WHERE request_id = ? AND type IN ('tool_call', 'tool_result')",
        ["req_" + response.id.removeprefix("resp_")])
    assert rows == [(0,)]


async def test_aiohttp_session_is_not_needed_for_the_sdk(client: TestClient) -> None:
    """A plain aiohttp POST with stream: true gets SSE (what curl would get)."""
    async with aiohttp.ClientSession() as session, session.post(
            client.make_url("/v1/responses"),
            json={"model": MODEL, "input": "curl me", "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = await resp.text()
    assert body.startswith("event: response.created\ndata: {")
    assert body.rstrip().split("\n")[-2] == "event: response.completed"
    await asyncio.sleep(0)


# -- parameters reach the model (a stand-in upstream records what it gets) ------------------
async def test_every_responses_parameter_reaches_the_provider_in_chat_form(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    from aiohttp.test_utils import TestServer

    from pipeline.offline_model import create_offline_app

    bodies: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            bodies.append(await request.json())
        return await handler(request)

    upstream = create_offline_app(token_delay_ms=0)
    upstream.middlewares.append(record)
    async with TestServer(upstream, host="127.0.0.1") as stand_in:
        client = await aiohttp_client(server.create_app(make_settings(
            tmp_path, openai_base_url=str(stand_in.make_url("/v1")), openai_api_key="k")))
        for stream in (False, True):
            bodies.clear()
            async with client.post("/v1/responses", json={
                    "model": MODEL, "input": "What is the weather in Paris?",
                    "instructions": "Be brief.", "stream": stream, "max_output_tokens": 50,
                    "temperature": 0.3, "top_p": 0.9, "parallel_tool_calls": False,
                    "user": "u-1", "safety_identifier": "s1", "prompt_cache_key": "k1",
                    "tools": [WEATHER], "tool_choice": "none"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            (sent,) = bodies
            assert {k: sent.get(k) for k in ("temperature", "top_p", "parallel_tool_calls", "user",
                                             "safety_identifier", "prompt_cache_key",
                                             "tool_choice", "max_tokens")} == {
                "temperature": 0.3, "top_p": 0.9, "parallel_tool_calls": False, "user": "u-1",
                "safety_identifier": "s1", "prompt_cache_key": "k1", "tool_choice": "none",
                "max_tokens": 50}
            assert sent["tools"] == [{"type": "function", "function": {
                key: value for key, value in WEATHER.items() if key != "type"}}]
            assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is the weather in Paris?"}]


async def test_a_response_whose_record_cannot_be_saved_is_a_503_and_does_not_run_on(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses the response's row: the client gets a 503 with a JSON body, and
    the turn it would have been is cancelled, not left running where nobody can reach it."""
    from core.errors import StoreError

    store = client.app[server.STORE]
    table = store.responses()

    class Refusing:
        async def save(self, record: Any) -> None:
            raise StoreError("disk full")

        def __getattr__(self, name: str) -> Any:
            return getattr(table, name)

    monkeypatch.setattr(store, "responses", lambda: Refusing())
    orchestrator = client.app[server.ORCHESTRATOR]
    started: list[Any] = []
    run = orchestrator.run
    monkeypatch.setattr(orchestrator, "run", lambda *a, **k: started.append(run(*a, **k))
                        or started[-1])
    resp = await client.post("/v1/responses", json={
        "model": MODEL, "input": "Tell me a long story.", "background": True})
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["error"]["code"] == "store_unavailable"
    (turn,) = started
    result = await asyncio.wait_for(turn.result, 10)
    assert result.status == "cancelled"

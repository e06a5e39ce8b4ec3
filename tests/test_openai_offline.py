"""The pieces under the OpenAI wire: the offline model's parameters (schema instances, stop,
seed, n, logprobs, tool_choice), the provider's parsing of n choices, tool-call pieces and
log probabilities over HTTP, and the response harness's client-tools mode (whole event lists)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest
from openai.lib._pydantic import to_strict_json_schema

from core.events import Event
from core.turn import ChatMessage, TurnInput
from pipeline.offline_model import (
    OfflineModelServer,
    compose_answer,
    plan_client_calls,
    schema_instance,
)
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import (
    Delta,
    Finish,
    OpenAIProvider,
    Piece,
    ToolCallPiece,
    ToolCallRequest,
    Usage,
)
from tests.test_tools_loop import Probe, probe_registry

USER = [{"role": "user", "content": "Plan a trip."}]


class Stop(pydantic.BaseModel):
    name: str
    nights: int = pydantic.Field(ge=1, le=14)


class Trip(pydantic.BaseModel):
    title: str = pydantic.Field(min_length=12, max_length=40)
    kind: Literal["city", "beach"]
    stops: list[Stop] = pydantic.Field(min_length=2)
    budget: float | None
    tags: list[str]
    confirmed: bool


SCHEMAS: list[dict[str, Any]] = [
    Trip.model_json_schema(),
    to_strict_json_schema(Trip),
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 5,
                                            "maximum": 6}}, "required": ["n"]},
    {"type": "array", "items": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": -3}]},
     "minItems": 3, "maxItems": 3},
    {"allOf": [{"type": "object", "properties": {"a": {"const": 1}}},
               {"type": "object", "properties": {"b": {"type": ["null", "boolean"]}}}]},
    {"type": "string", "enum": ["x", "y"]},
    {},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_instances_validate_and_are_deterministic(schema: dict[str, Any]) -> None:
    value = schema_instance(schema, seed=b"s")
    jsonschema.validate(value, schema)
    assert schema_instance(schema, seed=b"s") == value


def test_a_pydantic_model_parses_the_instance() -> None:
    assert Trip.model_validate(schema_instance(to_strict_json_schema(Trip))).kind == "city"


def test_client_calls_follow_tool_choice() -> None:
    tools = [{"type": "function", "function": {"name": "a_tool"}},
             {"type": "function", "function": {"name": "book_hotel", "parameters": {
                 "type": "object", "properties": {"nights": {"type": "integer"}}}}}]
    named = [{"role": "user", "content": "please book hotel for me"}]
    assert plan_client_calls(USER, tools, None) == []
    assert [n for n, _ in plan_client_calls(named, tools, None)] == ["book_hotel"]
    assert [n for n, _ in plan_client_calls(USER, tools, "auto")] == ["a_tool"]
    assert [n for n, _ in plan_client_calls(USER, tools, "required")] == ["a_tool"]
    forced = plan_client_calls(USER, tools, {"type": "function", "function": {"name": "book_hotel"}})
    assert [n for n, _ in forced] == ["book_hotel"] and isinstance(forced[0][1]["nights"], int)
    answered = [*named, {"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "x"}]
    assert plan_client_calls(answered, tools, "required") == []  # the tool answered: text


@pytest.fixture
async def offline() -> AsyncIterator[OfflineModelServer]:
    async with OfflineModelServer(token_delay_ms=0) as model:
        yield model


async def test_the_offline_model_is_deterministic_in_every_parameter(
        offline: OfflineModelServer) -> None:
    async with openai.AsyncOpenAI(base_url=offline.base_url, api_key="x") as sdk:
        body: dict[str, Any] = {"model": "offline", "messages": USER, "n": 2, "seed": 5,
                                "stop": ["zz"], "logprobs": True, "top_logprobs": 3,
                                "response_format": {"type": "json_object"}}
        first, again = [(await sdk.chat.completions.create(**body)).model_dump(exclude={"created"})
                        for _ in range(2)]
        assert first == again
        plain = await sdk.chat.completions.create(model="offline", messages=USER)  # type: ignore[arg-type]
        assert plain.choices[0].message.content == "".join(compose_answer("offline", USER))
        stopped = await sdk.chat.completions.create(model="offline", messages=USER, stop="turn")  # type: ignore[arg-type]
        assert stopped.choices[0].message.content == 'You said: "Plan a trip.". This is '
        cut = await sdk.chat.completions.create(
            model="offline", messages=USER, max_tokens=2,  # type: ignore[arg-type]
            response_format={"type": "json_schema",
                             "json_schema": {"name": "t", "schema": Trip.model_json_schema()}})
        assert cut.choices[0].finish_reason == "length"


async def test_the_provider_parses_choices_tool_calls_and_logprobs(
        offline: OfflineModelServer) -> None:
    provider = OpenAIProvider(base_url=offline.base_url, api_key="x")
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
    try:
        pieces = [p async for p in provider.stream_chat(
            model="offline", messages=USER, params={"n": 2, "logprobs": True, "tools": [tool],
                                                    "tool_choice": "required"})]
        calls = [p for p in pieces if isinstance(p, ToolCallRequest)]
        assert [(c.index, c.name) for c in calls] == [(0, "f"), (1, "f")]
        assert all(json.loads(c.arguments_json).keys() == {"q"} for c in calls)
        assert [(p.index, p.reason) for p in pieces if isinstance(p, Finish)] == [
            (0, "tool_calls"), (1, "tool_calls")]
        texts = [p async for p in provider.stream_chat(
            model="offline", messages=USER, params={"n": 2, "logprobs": True})]
        deltas = [p for p in texts if isinstance(p, Delta)]
        assert {d.index for d in deltas} == {0, 1}
        assert all(d.logprobs and d.logprobs[0]["token"] == d.text for d in deltas)
        assert "".join(d.text for d in deltas if d.index == 0) == "".join(
            compose_answer("offline", USER))
    finally:
        await provider.aclose()


class Scripted:
    """A provider that plays one script and records the arguments of its call."""

    name = "scripted"

    def __init__(self, script: Sequence[Piece]) -> None:
        self.script = list(script)
        self.kwargs: list[dict[str, Any]] = []

    async def stream_chat(self, **kwargs: Any) -> AsyncIterator[Piece]:
        self.kwargs.append(kwargs)
        for piece in self.script:
            yield piece

    async def list_models(self) -> list[str]:
        return ["m"]


def dump(events: Sequence[Event]) -> list[dict[str, Any]]:
    out = []
    for event in events:
        data = event.model_dump(exclude={"ts", "duration_ms", "request_id", "seq"})
        if "execution_id" in data:
            data["execution_id"] = "X"
        if data["type"] not in ("llm_call", "route", "memory"):
            out.append(data)
    return out


async def run_turn(provider: Scripted, params: Mapping[str, Any], *, server_tools: bool
                   ) -> list[Event]:
    orchestrator = StreamingOrchestrator(provider=provider, store=None, default_model="m",
                                         tools=probe_registry(Probe()))
    turn = orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content="hi")],
                                      model_params=dict(params), server_tools=server_tools))
    async with asyncio.timeout(10):
        await turn.result
    seen: list[Event] = []
    turn.stream.subscribe(seen.append).dispose()
    return seen


async def test_client_tools_mode_whole_event_list() -> None:
    tool = {"type": "function", "function": {"name": "t_echo"}}
    provider = Scripted([
        ToolCallRequest(id="call_1", name="t_echo", arguments_json='{"key": "k"}'),
        ToolCallRequest(id="call_2", name="t_echo", arguments_json="oops"),
        Finish("tool_calls"), Usage(model="m", prompt_tokens=1, completion_tokens=2, total_tokens=3)])
    events = await run_turn(provider, {"tools": [tool], "temperature": 0}, server_tools=True)
    assert dump(events) == [
        {"type": "request_received", "agent": "assistant", "conversation_id": events[0].conversation_id},  # type: ignore[union-attr]
        {"type": "stream_start", "stream_id": 1, "agent": "assistant", "depth": 0,
         "parent_stream_id": None},
        {"type": "tool_call", "stream_id": 1, "tool": "t_echo", "execution_id": "X",
         "params": {"key": "k"}, "side": "client", "call_id": "call_1"},
        {"type": "tool_call", "stream_id": 1, "tool": "t_echo", "execution_id": "X",
         "params": {"_unparsed_arguments": "oops"}, "side": "client", "call_id": "call_2"},
        {"type": "token_usage", "stream_id": 1, "model": "m", "prompt_tokens": 1,
         "completion_tokens": 2, "total_tokens": 3},
        {"type": "stream_end", "stream_id": 1, "status": "ok", "finish_reason": "tool_calls"},
        {"type": "done", "ok": True, "reason": "completed"},
    ]
    # The client's tools replace the server's, and the parameters go with them.
    assert provider.kwargs[0]["params"] == {"tools": [tool], "temperature": 0}
    assert "tools" not in provider.kwargs[0]


async def test_client_tool_call_pieces_become_tool_call_delta_events() -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    provider = Scripted([
        ToolCallPiece(call_index=0, id="call_1", name="f", arguments=""),
        ToolCallPiece(call_index=0, id=None, name=None, arguments='{"q": 1}'),
        ToolCallRequest(id="call_1", name="f", arguments_json='{"q": 1}'),
        Finish("tool_calls")])
    events = await run_turn(provider, {"tools": [tool]}, server_tools=False)
    assert dump(events)[2:5] == [
        {"type": "tool_call_delta", "stream_id": 1, "index": 0, "call_id": "call_1", "name": "f",
         "arguments": ""},
        {"type": "tool_call_delta", "stream_id": 1, "index": 0, "arguments": '{"q": 1}'},
        {"type": "tool_call", "stream_id": 1, "tool": "f", "execution_id": "X",
         "params": {"q": 1}, "side": "client", "call_id": "call_1"},
    ]
    assert provider.kwargs[0]["tool_call_pieces"] is True


async def test_no_server_tools_when_switched_off_and_n_opens_child_streams() -> None:
    provider = Scripted([Delta("a"), Delta("b", index=1), Finish("stop"), Finish("length", index=1)])
    events = await run_turn(provider, {"n": 2}, server_tools=False)
    assert "tools" not in provider.kwargs[0]
    assert dump(events)[1:] == [
        {"type": "stream_start", "stream_id": 1, "agent": "assistant", "depth": 0,
         "parent_stream_id": None},
        {"type": "text", "stream_id": 1, "delta": "a"},
        {"type": "stream_start", "stream_id": 2, "agent": "assistant", "depth": 1,
         "parent_stream_id": 1, "choice": 1},
        {"type": "text", "stream_id": 2, "delta": "b"},
        {"type": "stream_end", "stream_id": 2, "status": "ok", "finish_reason": "length"},
        {"type": "stream_end", "stream_id": 1, "status": "ok", "finish_reason": "stop"},
        {"type": "done", "ok": True, "reason": "completed"},
    ]
    # With the server's tools on and no client tools, the agent loop offers them.
    offered = Scripted([Delta("a"), Finish("stop")])
    await run_turn(offered, {}, server_tools=True)
    assert [t["function"]["name"] for t in offered.kwargs[0]["tools"]] == ["t_echo", "t_meet", "t_hang"]

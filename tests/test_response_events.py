"""Marble tests of ``to_response_events`` (virtual time) and its fold, ``fold_response``.

Whole event lists are asserted. The SDK's own pydantic types check the shapes: every
event validates as ``openai.types.responses.ResponseStreamEvent`` and every response
object as ``openai.types.responses.Response``.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel
from reactivex import operators as ops
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.recorded import Recorded

from core.events import (
    Done,
    ErrorEvent,
    Event,
    LlmCall,
    Memory,
    RequestReceived,
    Route,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
    ToolResult,
)
from operators import ReplayLog, fold_response, to_response_events

on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe

BASE: dict[str, Any] = {
    "id": "resp_abc", "created_at": 1_700_000_000, "model": "offline", "instructions": None,
    "metadata": {}, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
}
#: The SDK's event class of each ``type`` (its union is discriminated by the SDK, not pydantic).
EVENT_CLASSES: dict[str, type[BaseModel]] = {
    member.model_fields["type"].annotation.__args__[0]: member  # type: ignore[union-attr]
    for member in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
MSG = "msg_abc_0"


def done(*, ok: bool = True, reason: str = "completed") -> Done:
    return Done(ok=ok, duration_ms=1.0, reason=reason)  # type: ignore[arg-type]


def usage(prompt: int, completion: int) -> TokenUsage:
    return TokenUsage(stream_id=1, model="offline", prompt_tokens=prompt,
                      completion_tokens=completion, total_tokens=prompt + completion)


def response(status: str, output: list[dict[str, Any]], *, tokens: tuple[int, int] | None = None,
             error: dict[str, Any] | None = None,
             incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
    used = None
    if tokens is not None:
        used = {"input_tokens": tokens[0],
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": tokens[1], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": sum(tokens)}
    return {**BASE, "object": "response", "status": status, "output": output, "usage": used,
            "error": error, "incomplete_details": incomplete}


def message(text: str, status: str) -> dict[str, Any]:
    return {"id": MSG, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def opening(seq: int = 0) -> list[dict[str, Any]]:
    return [
        {"type": "response.output_item.added", "output_index": 0, "sequence_number": seq,
         "item": {"id": MSG, "type": "message", "status": "in_progress", "role": "assistant",
                  "content": []}},
        {"type": "response.content_part.added", "item_id": MSG, "output_index": 0,
         "content_index": 0, "sequence_number": seq + 1,
         "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}},
    ]


def delta(text: str, seq: int) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "item_id": MSG, "output_index": 0,
            "content_index": 0, "delta": text, "logprobs": [], "sequence_number": seq}


def closing(text: str, status: str, seq: int) -> list[dict[str, Any]]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return [
        {"type": "response.output_text.done", "item_id": MSG, "output_index": 0,
         "content_index": 0, "text": text, "logprobs": [], "sequence_number": seq},
        {"type": "response.content_part.done", "item_id": MSG, "output_index": 0,
         "content_index": 0, "part": part, "sequence_number": seq + 1},
        {"type": "response.output_item.done", "output_index": 0, "item": message(text, status),
         "sequence_number": seq + 2},
    ]


def lifecycle(kind: str, seq: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "response": body, "sequence_number": seq}


def started() -> list[dict[str, Any]]:
    return [lifecycle("response.created", 0, response("in_progress", [])),
            lifecycle("response.in_progress", 1, response("in_progress", []))]


def run(records: list[Recorded[Any]], **options: Any) -> list[Recorded[Any]]:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(records)
    results = scheduler.start(lambda: source.pipe(to_response_events(response=BASE, **options)))
    assert source.subscriptions == [subscribe(200, 200 + records[-1].time)]
    return list(results.messages)


def values(messages: list[Recorded[Any]]) -> list[dict[str, Any]]:
    return [m.value.value for m in messages if m.value.kind == "N"]


def assert_sdk_shapes(events: list[dict[str, Any]]) -> None:
    """Every event parses as the SDK's union member of its type; numbers go 0, 1, 2…"""
    for event in events:
        parsed = EVENT_CLASSES[event["type"]].model_validate(event)
        assert parsed.model_dump(exclude_unset=True) == event
        if "response" in event:
            Response.model_validate(event["response"])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def text_turn() -> list[Recorded[Any]]:
    """A turn with trace events, a nested sub-agent stream and two top-level deltas."""
    return [
        on_next(10, RequestReceived(agent="assistant", conversation_id="c1")),
        on_next(20, Route(route="response")),
        on_next(25, Memory(messages_loaded=2)),
        on_next(30, StreamStart(stream_id=1, agent="assistant")),
        on_next(40, LlmCall(stream_id=1, model="offline", messages=[])),
        on_next(50, Text(stream_id=1, delta="Hel")),
        on_next(60, StreamStart(stream_id=2, agent="sub", depth=1, parent_stream_id=1)),
        on_next(70, Text(stream_id=2, delta="(not the answer)")),
        on_next(80, StreamEnd(stream_id=2, finish_reason="length")),
        on_next(90, Text(stream_id=1, delta="lo")),
        on_next(100, usage(3, 2)),
        on_next(110, StreamEnd(stream_id=1, finish_reason="stop")),
        on_next(120, done()),
        on_completed(130),
    ]


def test_a_text_turn_becomes_the_whole_responses_family() -> None:
    messages = run(text_turn())

    final = response("completed", [message("Hello", "completed")], tokens=(3, 2))
    assert messages == [
        on_next(210, started()[0]),
        on_next(210, started()[1]),
        on_next(250, opening(2)[0]),
        on_next(250, opening(2)[1]),
        on_next(250, delta("Hel", 4)),
        on_next(290, delta("lo", 5)),
        *(on_next(310, event) for event in closing("Hello", "completed", 6)),
        on_next(320, lifecycle("response.completed", 9, final)),
        on_completed(330),
    ]
    assert_sdk_shapes(values(messages))


def test_the_token_limit_makes_the_response_incomplete() -> None:
    messages = run([
        on_next(10, RequestReceived(agent="assistant", conversation_id="c1")),
        on_next(20, StreamStart(stream_id=1, agent="assistant")),
        on_next(30, Text(stream_id=1, delta="cut")),
        on_next(40, usage(4, 1)),
        on_next(50, StreamEnd(stream_id=1, finish_reason="length")),
        on_next(60, done()),
        on_completed(70),
    ])

    final = response("incomplete", [message("cut", "incomplete")], tokens=(4, 1),
                     incomplete={"reason": "max_output_tokens"})
    assert values(messages) == [
        *started(), *opening(2), delta("cut", 4), *closing("cut", "incomplete", 5),
        lifecycle("response.incomplete", 8, final),
    ]
    assert_sdk_shapes(values(messages))


def test_a_failed_turn_is_response_failed_with_the_first_error() -> None:
    messages = run([
        on_next(10, RequestReceived(agent="assistant", conversation_id="c1")),
        on_next(20, StreamStart(stream_id=1, agent="assistant")),
        on_next(30, Text(stream_id=1, delta="par")),
        on_next(40, ErrorEvent(stream_id=1, error="HTTP 500: model down", retryable=True)),
        on_next(45, ErrorEvent(stream_id=None, error="a later one")),
        on_next(50, StreamEnd(stream_id=1, status="error")),
        on_next(60, done(ok=False, reason="error")),
        on_completed(70),
    ])

    final = response("failed", [message("par", "completed")], tokens=(0, 0),
                     error={"code": "server_error", "message": "HTTP 500: model down"})
    assert values(messages) == [
        *started(), *opening(2), delta("par", 4), *closing("par", "completed", 5),
        lifecycle("response.failed", 8, final),
    ]
    assert_sdk_shapes(values(messages))


def test_a_cancelled_turn_keeps_its_partial_output_and_ends_cancelled() -> None:
    messages = run([
        on_next(10, RequestReceived(agent="assistant", conversation_id="c1")),
        on_next(20, StreamStart(stream_id=1, agent="assistant")),
        on_next(30, Text(stream_id=1, delta="half")),
        on_next(40, done(ok=False, reason="cancelled")),
        on_completed(50),
    ])

    final = response("cancelled", [message("half", "incomplete")], tokens=(0, 0))
    assert values(messages) == [
        *started(), *opening(2), delta("half", 4), *closing("half", "incomplete", 5),
        lifecycle("response.failed", 8, final),
    ]
    assert_sdk_shapes(values(messages))


def test_a_client_function_call_becomes_a_function_call_item() -> None:
    fc = "fc_abc_1"
    messages = run([
        on_next(10, RequestReceived(agent="assistant", conversation_id="c1")),
        on_next(20, StreamStart(stream_id=1, agent="assistant")),
        on_next(30, Text(stream_id=1, delta="Let me look.")),
        on_next(40, ToolCall(stream_id=1, tool="get_weather", execution_id="call_1",
                             params={"city": "Paris"})),
        # A server tool (not the client's) is none of the client's business.
        on_next(50, ToolCall(stream_id=1, tool="fs.read", execution_id="x", params={})),
        on_next(60, ToolResult(stream_id=1, tool="fs.read", execution_id="x", ok=True)),
        on_next(70, StreamEnd(stream_id=1, finish_reason="tool_calls")),
        on_next(80, done()),
        on_completed(90),
    ], function_tools=["get_weather"])

    call = {"id": fc, "type": "function_call", "status": "completed", "call_id": "call_1",
            "name": "get_weather", "arguments": '{"city":"Paris"}'}
    final = response("completed", [message("Let me look.", "completed"), call], tokens=(0, 0))
    assert messages[-1] == on_completed(290)
    assert values(messages) == [
        *started(), *opening(2), delta("Let me look.", 4),
        *closing("Let me look.", "completed", 5),
        {"type": "response.output_item.added", "output_index": 1, "sequence_number": 8,
         "item": {**call, "status": "in_progress", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "item_id": fc, "output_index": 1,
         "delta": '{"city":"Paris"}', "sequence_number": 9},
        {"type": "response.function_call_arguments.done", "item_id": fc, "output_index": 1,
         "name": "get_weather", "arguments": '{"city":"Paris"}', "sequence_number": 10},
        {"type": "response.output_item.done", "output_index": 1, "item": call,
         "sequence_number": 11},
        lifecycle("response.completed", 12, final),
    ]
    assert_sdk_shapes(values(messages))


def turn_list() -> list[Event]:
    return [record.value.value for record in text_turn() if record.value.kind == "N"]


def test_numbering_is_a_pure_function_of_the_events_live_late_or_stored() -> None:
    """A subscriber from the start, one that joins the shared turn late (replayed), and the
    fold over the stored list get identical events; ``starting_after=N`` is their suffix."""
    events = turn_list()
    log: ReplayLog[Event] = ReplayLog()
    early: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    log.pipe(to_response_events(response=BASE)).subscribe(early.append)
    for event in events[:6]:
        log.on_next(event)
    log.pipe(to_response_events(response=BASE)).subscribe(late.append)  # joins mid-turn
    for event in events[6:]:
        log.on_next(event)
    log.on_completed()
    snapshot, stored = fold_response(BASE, events)

    assert early == late == stored
    assert snapshot == stored[-1]["response"]
    for n in (-1, 0, 4, 8, 9):
        resumed: list[dict[str, Any]] = []
        log.pipe(to_response_events(response=BASE),
                 ops.filter(lambda e, n=n: e["sequence_number"] > n)).subscribe(resumed.append)
        assert resumed == stored[n + 1:]


def test_the_snapshot_mid_turn_holds_the_partial_output() -> None:
    events = turn_list()[:7]  # up to the sub-agent's stream start: "Hel" written

    snapshot, produced = fold_response(BASE, events)

    assert snapshot == response("in_progress", [message("Hel", "in_progress")])
    assert [e["type"] for e in produced] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta"]
    Response.model_validate(snapshot)


@pytest.mark.parametrize("empty", ["", None])
def test_an_empty_delta_or_no_text_opens_no_message(empty: str | None) -> None:
    records: list[Recorded[Any]] = [
        on_next(10, RequestReceived(agent="assistant", conversation_id="c1")),
        on_next(20, StreamStart(stream_id=1, agent="assistant")),
    ]
    if empty is not None:
        records.append(on_next(30, Text(stream_id=1, delta=empty)))
    records += [on_next(40, StreamEnd(stream_id=1)), on_next(50, done()), on_completed(60)]

    messages = run(records)

    assert values(messages) == [*started(), lifecycle("response.completed", 2,
                                                      response("completed", [], tokens=(0, 0)))]

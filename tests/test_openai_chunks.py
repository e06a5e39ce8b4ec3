"""``to_chat_chunks`` for the faithful OpenAI wire, in virtual time: a client's tool calls,
the ``n`` choices of one model call, and log probabilities; and ``completion_of``, the fold."""

from __future__ import annotations

from typing import Any

from reactivex.testing import ReactiveTest, TestScheduler

from api.openai import completion_of
from core.events import (
    Done,
    RequestReceived,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
    ToolCallDelta,
    ToolResult,
)
from operators import to_chat_chunks

on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
CID, MODEL, CREATED = "chatcmpl-1", "offline", 1_700_000_000
LOGPROB = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}


def chunk(delta: dict[str, Any], finish: str | None = None, *, index: int = 0,
          logprobs: Any = None) -> dict[str, Any]:
    return {"id": CID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                         "logprobs": logprobs}]}


def run(events: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        [on_next(10 * (i + 1), event) for i, event in enumerate(events)]
        + [on_completed(10 * (len(events) + 1))])
    results = scheduler.start(lambda: source.pipe(to_chat_chunks(
        completion_id=CID, model=MODEL, created=CREATED)))
    return [(m.time, m.value.value) for m in results.messages if m.value.kind == "N"]


def head() -> list[Any]:
    return [RequestReceived(agent="assistant", conversation_id="c"),
            StreamStart(stream_id=1, agent="assistant")]


def test_client_tool_calls_become_tool_call_deltas() -> None:
    events = [
        *head(),
        Text(stream_id=1, delta="Let me check."),
        ToolCall(stream_id=1, tool="get_weather", execution_id="e1", params={"city": "Paris"},
                 side="client", call_id="call_a"),
        ToolCall(stream_id=1, tool="lookup", execution_id="e2",
                 params={"_unparsed_arguments": "{not json"}, side="client", call_id="call_b"),
        StreamEnd(stream_id=1, finish_reason="tool_calls"),
        Done(ok=True, duration_ms=1, reason="completed"),
    ]
    assert run(events) == [
        (230, chunk({"role": "assistant", "content": "Let me check."})),
        (240, chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]})),
        (240, chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]})),
        (250, chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                     "function": {"name": "lookup", "arguments": ""}}]})),
        (250, chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{not json"}}]})),
        (270, chunk({}, "tool_calls")),
    ]


def test_streamed_tool_call_pieces_become_argument_deltas() -> None:
    events = [
        *head(),
        ToolCallDelta(stream_id=1, index=0, call_id="call_a", name="f", arguments=""),
        ToolCallDelta(stream_id=1, index=1, call_id=None, name="g", arguments='{"b"'),
        ToolCallDelta(stream_id=1, index=0, arguments='{"a": '),
        ToolCallDelta(stream_id=1, index=0, arguments="1}"),
        ToolCallDelta(stream_id=1, index=1, arguments=": 2}"),
        ToolCall(stream_id=1, tool="f", execution_id="e1", params={"a": 1}, side="client",
                 call_id="call_a"),
        ToolCall(stream_id=1, tool="g", execution_id="e2", params={"b": 2}, side="client",
                 call_id="call_1"),
        StreamEnd(stream_id=1, finish_reason="tool_calls"),
        Done(ok=True, duration_ms=1, reason="completed"),
    ]
    chunks = [c for _, c in run(events)]
    assert chunks == [
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                    "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_1", "type": "function",
                               "function": {"name": "g", "arguments": '{"b"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": 2}"}}]}),
        chunk({}, "tool_calls"),  # the whole calls add no chunk: they were streamed
    ]
    calls = completion_of(chunks)["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("call_a", '{"a": 1}'), ("call_1", '{"b": 2}')]


def test_server_tool_calls_stay_out_of_the_chunks() -> None:
    events = [*head(),
              ToolCall(stream_id=1, tool="fs.read", execution_id="e", params={"path": "x"}),
              ToolResult(stream_id=1, tool="fs.read", execution_id="e", ok=True, data="x"),
              Text(stream_id=1, delta="x"), StreamEnd(stream_id=1, finish_reason="stop"),
              Done(ok=True, duration_ms=1, reason="completed")]
    assert [c for _, c in run(events)] == [chunk({"role": "assistant", "content": "x"}),
                                           chunk({}, "stop")]


def test_n_choices_and_logprobs() -> None:
    events = [
        *head(),
        Text(stream_id=1, delta="Hi", logprobs=[LOGPROB]),
        StreamStart(stream_id=2, agent="assistant", depth=1, parent_stream_id=1, choice=1),
        Text(stream_id=2, delta="Yo"),
        StreamStart(stream_id=3, agent="assistant", depth=1, parent_stream_id=1, choice=2),
        TokenUsage(stream_id=1, model="m", prompt_tokens=1, completion_tokens=3, total_tokens=4),
        StreamEnd(stream_id=2, finish_reason="length"),
        StreamEnd(stream_id=3, finish_reason="stop"),
        StreamEnd(stream_id=1, finish_reason="stop"),
        Done(ok=True, duration_ms=1, reason="completed"),
    ]
    chunks = run(events)
    assert chunks == [
        (230, chunk({"role": "assistant", "content": "Hi"},
                    logprobs={"content": [LOGPROB], "refusal": None})),
        (250, chunk({"role": "assistant", "content": "Yo"}, index=1)),
        (310, chunk({}, "stop")),
        (310, chunk({}, "length", index=1)),
        (310, chunk({"role": "assistant"}, "stop", index=2)),  # a choice that said nothing
    ]
    whole = completion_of([c for _, c in chunks])
    assert whole["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": None},
         "finish_reason": "stop", "logprobs": {"content": [LOGPROB], "refusal": None}},
        {"index": 1, "message": {"role": "assistant", "content": "Yo", "refusal": None},
         "finish_reason": "length", "logprobs": None},
        {"index": 2, "message": {"role": "assistant", "content": "", "refusal": None},
         "finish_reason": "stop", "logprobs": None},
    ]


def test_the_fold_joins_tool_call_pieces_by_index() -> None:
    pieces = [
        chunk({"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        chunk({}, "tool_calls"),
    ]
    assert completion_of(pieces)["choices"] == [{
        "index": 0, "finish_reason": "tool_calls", "logprobs": None,
        "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
    }]

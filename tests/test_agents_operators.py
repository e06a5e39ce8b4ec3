"""Marble tests of issue 14's operators: agent_view, price_usage, to_seed_frames."""

from __future__ import annotations

from typing import Any

from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.marbles import marbles_testing

from core.events import (
    Done,
    ErrorEvent,
    RequestReceived,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolResult,
)
from operators import agent_view, price_usage, to_seed_frames
from tests.test_operators import norm

on_next, on_error, subscribe = ReactiveTest.on_next, ReactiveTest.on_error, ReactiveTest.subscribe

LOOKUP: dict[str | float, Any] = {
    "R": RequestReceived(agent="assistant", conversation_id="c"),
    "s": StreamStart(stream_id=1, agent="assistant"),
    "t": Text(stream_id=1, delta="hi"),
    "S": StreamStart(stream_id=2, agent="writer", depth=1, parent_stream_id=1),
    "T": Text(stream_id=2, delta="sub"),
    "E": StreamEnd(stream_id=2),
    "e": StreamEnd(stream_id=1),
    "u": TokenUsage(stream_id=1, model="p/m", prompt_tokens=1000, completion_tokens=500,
                    total_tokens=1500),
    "U": TokenUsage(stream_id=1, model="p/m", prompt_tokens=1000, completion_tokens=500,
                    total_tokens=1500, cost_usd=0.002),
    "v": TokenUsage(stream_id=2, model="q/free", prompt_tokens=1, completion_tokens=1,
                    total_tokens=2),
    "d": Done(ok=True, duration_ms=1.0, reason="completed"),
}


def test_agent_view_only_the_top_level() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-R-s-t-S-T-E-e-d|", LOOKUP)
        expected = exp("-R-s-t-------e-d|", LOOKUP)
        results = start(source.pipe(agent_view(max_depth=0)))
    assert norm(results) == norm(expected)


def test_agent_view_only_named_agents() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-R-s-t-S-T-E-e-d|", LOOKUP)
        expected = exp("-R-----S-T-E---d|", LOOKUP)
        results = start(source.pipe(agent_view(agents={"writer"})))
    assert norm(results) == norm(expected)


def test_agent_view_without_options_is_the_source_and_each_subscriber_has_its_own_state() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-R-s-t-S-T-E-e-d|", LOOKUP)
        expected = exp("-R-s-t-S-T-E-e-d|", LOOKUP)
        results = start(source.pipe(agent_view()))
    assert norm(results) == norm(expected)
    scheduler = TestScheduler()
    late = scheduler.create_cold_observable(on_next(10, LOOKUP["T"]), on_next(20, LOOKUP["d"]))
    # a subscriber that never saw stream 2 start (it joined after a cursor) still sees it
    results2 = scheduler.start(lambda: late.pipe(agent_view(max_depth=0)))
    assert [m.value.value.type for m in results2.messages] == ["text", "done"]


def test_agent_view_passes_errors() -> None:
    scheduler = TestScheduler()
    exc = RuntimeError("upstream")
    source = scheduler.create_cold_observable(on_next(10, LOOKUP["S"]), on_next(20, LOOKUP["T"]),
                                              on_error(30, exc))
    results = scheduler.start(lambda: source.pipe(agent_view(max_depth=0)))
    assert norm(results.messages) == [(230, "E", exc)]
    assert source.subscriptions == [subscribe(200, 230)]


def test_price_usage_stamps_priced_models_only() -> None:
    def cost(model: str, prompt: int, completion: int) -> float | None:
        return (prompt * 1.0 + completion * 2.0) / 1e6 if model == "p/m" else None

    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-s-t-u-v-e|", LOOKUP)
        expected = exp("-s-t-U-v-e|", LOOKUP)
        results = start(source.pipe(price_usage(cost)))
    assert norm(results) == norm(expected)


def test_price_usage_passes_a_failing_price_on_as_an_error() -> None:
    scheduler = TestScheduler()
    exc = ValueError("bad price")

    def cost(model: str, prompt: int, completion: int) -> float | None:
        raise exc

    source = scheduler.create_cold_observable(on_next(10, LOOKUP["t"]), on_next(20, LOOKUP["u"]))
    results = scheduler.start(lambda: source.pipe(price_usage(cost)))
    assert norm(results.messages) == [(210, "N", norm_event(LOOKUP["t"])), (220, "E", exc)]


def norm_event(event: Any) -> Any:
    return event.model_dump(exclude={"ts"})


FRAMES: dict[str | float, Any] = {
    "k": {"type": "token", "token": "hi"},
    "r": {"type": "tool_result", "tool": "fs.read", "data": {"content": "x"}, "execution_id": "e1"},
    "f": {"type": "tool_error", "tool": "fs.read", "error": "no", "execution_id": "e2"},
    "x": {"type": "error", "error": "boom"},
    "n": {"type": "end", "reason": "completed"},
}
SEED = {
    **LOOKUP,
    "o": ToolResult(stream_id=1, tool="fs.read", execution_id="e1", ok=True, data={"content": "x"}),
    "O": ToolResult(stream_id=2, tool="fs.read", execution_id="e2", ok=False, error="no"),
    "X": ErrorEvent(error="boom"),
}


def test_seed_frames_are_seed_003s_objects() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-R-s-t-o-S-T-O-E-X-u-e-d|", SEED)
        expected = exp("-----k-r-----f---x-----n|", FRAMES)
        results = start(source.pipe(to_seed_frames()))
    assert norm(results) == norm(expected)

"""Marble tests for the operators in ``operators/``, in virtual time (never sleeps).

Events carry a wall-clock ``ts``, so notifications are compared through :func:`norm`,
which dumps events without ``ts``; ``turn_envelope`` gets the scheduler's clock so that
``done.duration_ms`` is deterministic (virtual ticks are seconds: 40 ticks = 40000 ms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel
from reactivex import Observable
from reactivex import operators as ops
from reactivex.notification import OnCompleted, OnError, OnNext
from reactivex.subject import BehaviorSubject
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.marbles import marbles_testing
from reactivex.testing.mockobserver import MockObserver
from reactivex.testing.recorded import Recorded

from core.errors import ProviderError
from core.events import (
    Advisor,
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
from operators import (
    alongside,
    merge_panel,
    number_events,
    sequence,
    then,
    to_chat_chunks,
    turn_envelope,
    visible,
)

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe


# --- helpers -------------------------------------------------------------------------


def dump(value: Any) -> Any:
    """An event without its wall-clock ``ts``; anything else unchanged."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude={"ts"})
    return value


def norm(messages: list[Recorded[Any]]) -> list[tuple[Any, ...]]:
    """Recorded notifications as comparable tuples: ``(time, kind, payload)``."""
    out: list[tuple[Any, ...]] = []
    for message in messages:
        notification = message.value
        if isinstance(notification, OnNext):
            out.append((message.time, "N", dump(notification.value)))
        elif isinstance(notification, OnError):
            out.append((message.time, "E", notification.exception))
        elif isinstance(notification, OnCompleted):
            out.append((message.time, "C"))
        else:  # pragma: no cover - predicates are not used here
            raise AssertionError(f"unexpected recorded value {notification!r}")
    return out


def snapshot(event: Event) -> Event:
    """A copy taken when the event passes (numbering stamps events in place)."""
    return event.model_copy(deep=True)


def clocked(scheduler: TestScheduler) -> Callable[[], float]:
    return lambda: float(scheduler.clock)


def rr() -> RequestReceived:
    return RequestReceived(agent="index", conversation_id="c1")


def done(*, ok: bool, ms: float, reason: str) -> Done:
    return Done(ok=ok, duration_ms=ms, reason=reason)  # type: ignore[arg-type]


def assert_envelope_rules(messages: list[Recorded[Any]]) -> None:
    """request_received first; exactly one done, last, immediately followed by completion."""
    values = [m.value.value for m in messages if isinstance(m.value, OnNext)]
    assert isinstance(values[0], RequestReceived)
    assert [type(v) for v in values].count(Done) == 1
    assert isinstance(values[-1], Done)
    assert isinstance(messages[-1].value, OnCompleted)
    assert isinstance(messages[-2].value, OnNext)
    assert messages[-1].time == messages[-2].time
    # every stream_start gets exactly one stream_end
    starts = [v.stream_id for v in values if isinstance(v, StreamStart)]
    ends = [v.stream_id for v in values if isinstance(v, StreamEnd)]
    assert sorted(starts) == sorted(ends)


LOOKUP: dict[str | float, Any] = {
    "R": RequestReceived(agent="index", conversation_id="c1"),
    "r": Route(route="response"),
    "m": Memory(messages_loaded=3),
    "l": LlmCall(stream_id=1, model="offline", messages=[{"role": "user", "content": "hi"}]),
    "s": StreamStart(stream_id=1, agent="response"),
    "t": Text(stream_id=1, delta="hi"),
    "c": ToolCall(stream_id=1, tool="search", execution_id="x1"),
    "o": ToolResult(stream_id=1, tool="search", execution_id="x1", ok=True),
    "u": TokenUsage(stream_id=1, model="offline", prompt_tokens=1, completion_tokens=2, total_tokens=3),
    "a": Advisor(stream_id=1, kind="gate_continue"),
    "e": StreamEnd(stream_id=1),
    "E": ErrorEvent(error="boom"),
    "d": Done(ok=True, duration_ms=1.0, reason="completed"),
}


# --- sequence / then -----------------------------------------------------------------

Sequencer = Callable[[Observable[Event], Observable[Event], Observable[Event]], Observable[Event]]

SEQUENCERS: list[Any] = [
    pytest.param(lambda a, b, c: sequence(a, b, c), id="sequence"),
    pytest.param(lambda a, b, c: a.pipe(then(b, c)), id="then"),
]


@pytest.mark.parametrize("compose", SEQUENCERS)
def test_sequence_subscribes_each_source_when_the_previous_completes(
    compose: Sequencer,
) -> None:
    scheduler = TestScheduler()
    route, memory = Route(route="response"), Memory(messages_loaded=2)
    t1, t2 = Text(stream_id=1, delta="a"), Text(stream_id=1, delta="b")
    router = scheduler.create_cold_observable(on_next(10, route), on_completed(20))
    mem = scheduler.create_cold_observable(on_next(5, memory), on_completed(10))
    response = scheduler.create_cold_observable(on_next(10, t1), on_next(20, t2), on_completed(30))

    results = scheduler.start(lambda: compose(router, mem, response))

    assert norm(results.messages) == norm(
        [
            on_next(210, route),
            on_next(225, memory),
            on_next(240, t1),
            on_next(250, t2),
            on_completed(260),
        ]
    )
    assert router.subscriptions == [subscribe(200, 220)]
    assert mem.subscriptions == [subscribe(220, 230)]
    assert response.subscriptions == [subscribe(230, 260)]


@pytest.mark.parametrize("compose", SEQUENCERS)
def test_sequence_error_stops_the_sequence(compose: Sequencer) -> None:
    scheduler = TestScheduler()
    exc = RuntimeError("router failed")
    route = Route(route="response")
    router = scheduler.create_cold_observable(on_next(10, route), on_error(15, exc))
    mem = scheduler.create_cold_observable(on_completed(10))
    response = scheduler.create_cold_observable(on_completed(10))

    results = scheduler.start(lambda: compose(router, mem, response))

    assert norm(results.messages) == [(210, "N", dump(route)), (215, "E", exc)]
    assert router.subscriptions == [subscribe(200, 215)]
    assert mem.subscriptions == []
    assert response.subscriptions == []


@pytest.mark.parametrize("compose", SEQUENCERS)
def test_sequence_disposal_unsubscribes_the_running_source_only(compose: Sequencer) -> None:
    scheduler = TestScheduler()
    memory = Memory(messages_loaded=0)
    router = scheduler.create_cold_observable(on_completed(20))
    mem = scheduler.create_cold_observable(on_next(30, memory), on_completed(40))
    response = scheduler.create_cold_observable(on_completed(10))

    results = scheduler.start(lambda: compose(router, mem, response), disposed=235)

    assert norm(results.messages) == []
    assert router.subscriptions == [subscribe(200, 220)]
    assert mem.subscriptions == [subscribe(220, 235)]
    assert response.subscriptions == []


def test_sequence_marbles_with_event_lookup() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        router = cold("-r|", LOOKUP)
        mem = cold("-m|", LOOKUP)
        response = cold("-s-t-e|", LOOKUP)
        expected = exp("-r-m-s-t-e|", LOOKUP)
        results = start(sequence(router, mem, response))
    assert norm(results) == norm(expected)


# --- merge_panel / alongside ---------------------------------------------------------

Merger = Callable[[Observable[Event], Observable[Event]], Observable[Event]]

MERGERS: list[Any] = [
    pytest.param(lambda a, b: merge_panel(a, b), id="merge_panel"),
    pytest.param(lambda a, b: a.pipe(alongside(b)), id="alongside"),
]


@pytest.mark.parametrize("compose", MERGERS)
def test_merge_panel_interleaves_in_arrival_order_and_waits_for_all(compose: Merger) -> None:
    scheduler = TestScheduler()
    a1, a2 = Text(stream_id=1, delta="a1"), Text(stream_id=1, delta="a2")
    b1, b2 = Text(stream_id=2, delta="b1"), Text(stream_id=2, delta="b2")
    alice = scheduler.create_cold_observable(on_next(10, a1), on_next(30, a2), on_completed(50))
    bob = scheduler.create_cold_observable(on_next(20, b1), on_next(40, b2), on_completed(60))

    results = scheduler.start(lambda: compose(alice, bob))

    assert norm(results.messages) == norm(
        [
            on_next(210, a1),
            on_next(220, b1),
            on_next(230, a2),
            on_next(240, b2),
            on_completed(260),
        ]
    )
    assert alice.subscriptions == [subscribe(200, 250)]
    assert bob.subscriptions == [subscribe(200, 260)]


@pytest.mark.parametrize("compose", MERGERS)
def test_merge_panel_error_from_one_source_errors_and_disposes_the_rest(
    compose: Merger,
) -> None:
    scheduler = TestScheduler()
    exc = RuntimeError("panelist bob failed")
    a1, a2 = Text(stream_id=1, delta="a1"), Text(stream_id=1, delta="a2")
    alice = scheduler.create_cold_observable(on_next(10, a1), on_next(30, a2), on_completed(50))
    bob = scheduler.create_cold_observable(on_error(20, exc))

    results = scheduler.start(lambda: compose(alice, bob))

    assert norm(results.messages) == [(210, "N", dump(a1)), (220, "E", exc)]
    assert alice.subscriptions == [subscribe(200, 220)]
    assert bob.subscriptions == [subscribe(200, 220)]


@pytest.mark.parametrize("compose", MERGERS)
def test_merge_panel_disposal_unsubscribes_every_source(compose: Merger) -> None:
    scheduler = TestScheduler()
    a1 = Text(stream_id=1, delta="a1")
    alice = scheduler.create_hot_observable(on_next(210, a1), on_next(300, a1))
    bob = scheduler.create_cold_observable(on_next(200, a1), on_completed(300))

    results = scheduler.start(lambda: compose(alice, bob), disposed=250)

    assert norm(results.messages) == [(210, "N", dump(a1))]
    assert alice.subscriptions == [subscribe(200, 250)]
    assert bob.subscriptions == [subscribe(200, 250)]


def test_merge_panel_marbles_three_panelists() -> None:
    lookup: dict[str | float, Any] = {
        "a": Text(stream_id=1, delta="alice"),
        "b": Text(stream_id=2, delta="bob"),
        "c": Text(stream_id=3, delta="carol"),
    }
    with marbles_testing() as (start, cold, _hot, exp):
        alice = cold("-a-------a|", lookup)
        bob = cold("---b---b----|", lookup)
        carol = cold("-----c|", lookup)
        expected = exp("-a-b-c-b-a--|", lookup)
        results = start(merge_panel(alice, bob, carol))
    assert norm(results) == norm(expected)


# --- visible ------------------------------------------------------------------------


def test_visible_without_trace_drops_llm_call_route_and_memory() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-R-r-m-s-l-t-c-o-u-a-e-E-d|", LOOKUP)
        expected = exp("-R-----s---t-c-o-u-a-e-E-d|", LOOKUP)
        results = start(source.pipe(visible(trace=False)))
    assert norm(results) == norm(expected)


def test_visible_with_trace_keeps_everything() -> None:
    with marbles_testing() as (start, cold, _hot, exp):
        source = cold("-R-r-m-s-l-t-e-d|", LOOKUP)
        expected = exp("-R-r-m-s-l-t-e-d|", LOOKUP)
        results = start(source.pipe(visible(trace=True)))
    assert norm(results) == norm(expected)


@pytest.mark.parametrize("trace", [False, True])
def test_visible_passes_errors_and_disposes(trace: bool) -> None:
    scheduler = TestScheduler()
    exc = RuntimeError("upstream")
    route, text = Route(route="x"), Text(stream_id=1, delta="t")
    source = scheduler.create_cold_observable(on_next(10, route), on_next(20, text), on_error(30, exc))

    results = scheduler.start(lambda: source.pipe(visible(trace=trace)))

    expected = [(220, "N", dump(text)), (230, "E", exc)]
    if trace:
        expected.insert(0, (210, "N", dump(route)))
    assert norm(results.messages) == expected
    assert source.subscriptions == [subscribe(200, 230)]

    scheduler2 = TestScheduler()
    source2 = scheduler2.create_cold_observable(on_next(10, text), on_next(100, text))
    results2 = scheduler2.start(lambda: source2.pipe(visible(trace=trace)), disposed=250)
    assert norm(results2.messages) == [(210, "N", dump(text))]
    assert source2.subscriptions == [subscribe(200, 250)]


# --- number_events ---------------------------------------------------------------------


def test_number_events_stamps_seq_from_one_and_the_request_id() -> None:
    scheduler = TestScheduler()
    events: list[Event] = [
        rr(),
        Route(route="response"),
        StreamStart(stream_id=1, agent="response"),
        Text(stream_id=1, delta="a"),
        StreamEnd(stream_id=1),
    ]
    source = scheduler.create_cold_observable(
        [on_next(10 * (i + 1), e) for i, e in enumerate(events)] + [on_completed(60)]
    )

    results = scheduler.start(lambda: source.pipe(number_events("req-1"), ops.map(snapshot)))

    expected = [
        on_next(200 + 10 * (i + 1), e.model_copy(update={"seq": i + 1, "request_id": "req-1"}))
        for i, e in enumerate(events)
    ]
    assert norm(results.messages) == norm([*expected, on_completed(260)])
    assert source.subscriptions == [subscribe(200, 260)]


def test_number_events_second_subscription_restarts_at_one() -> None:
    scheduler = TestScheduler()
    a, b, c = Text(stream_id=1, delta="a"), Text(stream_id=1, delta="b"), Text(stream_id=1, delta="c")
    source = scheduler.create_cold_observable(
        on_next(10, a), on_next(20, b), on_next(30, c), on_completed(40)
    )
    numbered = source.pipe(number_events("r"), ops.map(snapshot))
    second: MockObserver[Event] = scheduler.create_observer()
    scheduler.schedule_absolute(400.0, lambda sch, _: numbered.subscribe(second, scheduler=sch))

    first = scheduler.start(lambda: numbered)

    def stamped(e: Text, seq: int) -> Text:
        return e.model_copy(update={"seq": seq, "request_id": "r"})

    assert norm(first.messages) == norm(
        [
            on_next(210, stamped(a, 1)),
            on_next(220, stamped(b, 2)),
            on_next(230, stamped(c, 3)),
            on_completed(240),
        ]
    )
    assert norm(second.messages) == norm(
        [
            on_next(410, stamped(a, 1)),
            on_next(420, stamped(b, 2)),
            on_next(430, stamped(c, 3)),
            on_completed(440),
        ]
    )
    assert source.subscriptions == [subscribe(200, 240), subscribe(400, 440)]


def test_number_events_passes_errors_and_disposes() -> None:
    scheduler = TestScheduler()
    exc = RuntimeError("x")
    a = Text(stream_id=1, delta="a")
    source = scheduler.create_cold_observable(on_next(10, a), on_error(20, exc))
    results = scheduler.start(lambda: source.pipe(number_events("r"), ops.map(snapshot)))
    assert norm(results.messages) == [
        (210, "N", dump(a.model_copy(update={"seq": 1, "request_id": "r"}))),
        (220, "E", exc),
    ]

    scheduler2 = TestScheduler()
    b = Text(stream_id=1, delta="b")
    source2 = scheduler2.create_cold_observable(on_next(10, b), on_next(90, b))
    results2 = scheduler2.start(lambda: source2.pipe(number_events("r")), disposed=250)
    assert len(results2.messages) == 1
    assert source2.subscriptions == [subscribe(200, 250)]


# --- turn_envelope --------------------------------------------------------------------


def envelope(
    scheduler: TestScheduler, cancel: Observable[Any] | None = None
) -> Callable[[Observable[Event]], Observable[Event]]:
    return turn_envelope(agent="index", conversation_id="c1", cancel=cancel, clock=clocked(scheduler))


def test_turn_envelope_happy_path() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="response")
    t1 = Text(stream_id=1, delta="hi")
    e1 = StreamEnd(stream_id=1, finish_reason="stop")
    body = scheduler.create_cold_observable(
        on_next(10, s1), on_next(20, t1), on_next(30, e1), on_completed(40)
    )

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, s1),
            on_next(220, t1),
            on_next(230, e1),
            on_next(240, done(ok=True, ms=40_000.0, reason="completed")),
            on_completed(240),
        ]
    )
    assert body.subscriptions == [subscribe(200, 240)]
    assert_envelope_rules(results.messages)


def test_turn_envelope_empty_body_still_sends_request_received_and_done() -> None:
    scheduler = TestScheduler()
    body: Observable[Event] = scheduler.create_cold_observable(on_completed(5))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(205, done(ok=True, ms=5_000.0, reason="completed")),
            on_completed(205),
        ]
    )
    assert_envelope_rules(results.messages)


def test_turn_envelope_body_error_closes_open_streams_innermost_first() -> None:
    scheduler = TestScheduler()
    exc = ProviderError("HTTP 503", provider="http://m", model="gpt", status=503, retryable=True)
    s1 = StreamStart(stream_id=1, agent="index")
    s2 = StreamStart(stream_id=2, agent="panelist", depth=1, parent_stream_id=1)
    t2 = Text(stream_id=2, delta="par")
    body = scheduler.create_cold_observable(
        on_next(10, s1), on_next(20, s2), on_next(30, t2), on_error(40, exc)
    )

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, s1),
            on_next(220, s2),
            on_next(230, t2),
            on_next(240, ErrorEvent(stream_id=2, error=str(exc), retryable=True)),
            on_next(240, StreamEnd(stream_id=2, status="error")),
            on_next(240, StreamEnd(stream_id=1, status="error")),
            on_next(240, done(ok=False, ms=40_000.0, reason="error")),
            on_completed(240),
        ]
    )
    assert body.subscriptions == [subscribe(200, 240)]
    assert_envelope_rules(results.messages)


@pytest.mark.parametrize(
    ("exc", "message", "retryable"),
    [
        (RuntimeError("plain"), "plain", False),
        (RuntimeError(), "RuntimeError", False),
        (
            ProviderError("timeout", provider="p", model="m", retryable=False),
            "model call to 'm' at p failed: timeout",
            False,
        ),
    ],
)
def test_turn_envelope_body_error_without_open_streams(exc: Exception, message: str, retryable: bool) -> None:
    scheduler = TestScheduler()
    route = Route(route="response")
    body = scheduler.create_cold_observable(on_next(10, route), on_error(20, exc))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, route),
            on_next(220, ErrorEvent(stream_id=None, error=message, retryable=retryable)),
            on_next(220, done(ok=False, ms=20_000.0, reason="error")),
            on_completed(220),
        ]
    )
    assert_envelope_rules(results.messages)


def test_turn_envelope_retryable_taken_from_any_exception_attribute() -> None:
    class Flaky(Exception):
        retryable = True

    scheduler = TestScheduler()
    body: Observable[Event] = scheduler.create_cold_observable(on_error(10, Flaky("429")))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, ErrorEvent(stream_id=None, error="429", retryable=True)),
            on_next(210, done(ok=False, ms=10_000.0, reason="error")),
            on_completed(210),
        ]
    )


def test_turn_envelope_cancel_disposes_the_body_and_closes_streams_cancelled() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="index")
    s2 = StreamStart(stream_id=2, agent="sub", depth=1, parent_stream_id=1)
    t2 = Text(stream_id=2, delta="a")
    late = Text(stream_id=2, delta="late")
    cancel = scheduler.create_hot_observable(on_next(250, "stop"), on_next(260, "again"))
    body = scheduler.create_cold_observable(
        on_next(10, s1),
        on_next(20, s2),
        on_next(30, t2),
        on_next(60, late),
        on_next(70, StreamEnd(stream_id=2)),
        on_next(80, StreamEnd(stream_id=1)),
        on_completed(90),
    )

    results = scheduler.start(lambda: body.pipe(envelope(scheduler, cancel)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, s1),
            on_next(220, s2),
            on_next(230, t2),
            on_next(250, StreamEnd(stream_id=2, status="cancelled")),
            on_next(250, StreamEnd(stream_id=1, status="cancelled")),
            on_next(250, done(ok=False, ms=50_000.0, reason="cancelled")),
            on_completed(250),
        ]
    )
    assert body.subscriptions == [subscribe(200, 250)]
    assert cancel.subscriptions == [subscribe(200, 250)]
    assert_envelope_rules(results.messages)


def test_turn_envelope_nothing_after_done_from_a_hot_body() -> None:
    scheduler = TestScheduler()
    t = Text(stream_id=1, delta="x")
    cancel = scheduler.create_hot_observable(on_next(230, True))
    body = scheduler.create_hot_observable(
        on_next(210, t),
        on_next(240, t),
        on_error(250, RuntimeError("late")),
        on_completed(260),
    )

    results = scheduler.start(lambda: body.pipe(envelope(scheduler, cancel)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, t),
            on_next(230, done(ok=False, ms=30_000.0, reason="cancelled")),
            on_completed(230),
        ]
    )
    assert body.subscriptions == [subscribe(200, 230)]


def test_turn_envelope_already_cancelled_never_subscribes_the_body() -> None:
    scheduler = TestScheduler()
    cancel = BehaviorSubject[bool](True)
    body = scheduler.create_cold_observable(on_next(10, Text(stream_id=1, delta="x")), on_completed(20))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler, cancel)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(200, done(ok=False, ms=0.0, reason="cancelled")),
            on_completed(200),
        ]
    )
    assert body.subscriptions == []
    assert not cancel.observers


def test_turn_envelope_cancel_after_done_is_ignored_and_unsubscribed() -> None:
    scheduler = TestScheduler()
    cancel = scheduler.create_hot_observable(on_next(300, True))
    body: Observable[Event] = scheduler.create_cold_observable(on_completed(40))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler, cancel)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(240, done(ok=True, ms=40_000.0, reason="completed")),
            on_completed(240),
        ]
    )
    assert cancel.subscriptions == [subscribe(200, 240)]


def test_turn_envelope_body_completing_with_an_unclosed_stream_is_an_error() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="index")
    s2 = StreamStart(stream_id=2, agent="sub", depth=1, parent_stream_id=1)
    e2 = StreamEnd(stream_id=2)
    body = scheduler.create_cold_observable(
        on_next(10, s1), on_next(20, s2), on_next(30, e2), on_completed(40)
    )

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, s1),
            on_next(220, s2),
            on_next(230, e2),
            on_next(
                240, ErrorEvent(stream_id=1, error="streams [1] ended without stream_end", retryable=False)
            ),
            on_next(240, StreamEnd(stream_id=1, status="error")),
            on_next(240, done(ok=False, ms=40_000.0, reason="error")),
            on_completed(240),
        ]
    )
    assert_envelope_rules(results.messages)


def test_turn_envelope_error_event_in_the_body_makes_done_not_ok() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="index")
    err = ErrorEvent(stream_id=1, error="tool failed", retryable=False)
    e1 = StreamEnd(stream_id=1, status="error")
    body = scheduler.create_cold_observable(
        on_next(10, s1), on_next(20, err), on_next(30, e1), on_completed(40)
    )

    results = scheduler.start(lambda: body.pipe(envelope(scheduler)))

    assert norm(results.messages) == norm(
        [
            on_next(200, rr()),
            on_next(210, s1),
            on_next(220, err),
            on_next(230, e1),
            on_next(240, done(ok=False, ms=40_000.0, reason="error")),
            on_completed(240),
        ]
    )
    assert_envelope_rules(results.messages)


def test_turn_envelope_downstream_disposal_unsubscribes_body_and_cancel() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="index")
    cancel = scheduler.create_hot_observable(on_next(400, True))
    body = scheduler.create_cold_observable(on_next(10, s1), on_completed(100))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler, cancel)), disposed=235)

    assert norm(results.messages) == norm([on_next(200, rr()), on_next(210, s1)])
    assert body.subscriptions == [subscribe(200, 235)]
    assert cancel.subscriptions == [subscribe(200, 235)]


def test_turn_envelope_each_subscription_has_its_own_state() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="index")
    body = scheduler.create_cold_observable(on_next(10, s1), on_completed(20))
    wrapped = body.pipe(envelope(scheduler))
    second: MockObserver[Event] = scheduler.create_observer()
    scheduler.schedule_absolute(400.0, lambda sch, _: wrapped.subscribe(second, scheduler=sch))

    first = scheduler.start(lambda: wrapped)

    for results, t0 in ((first, 200), (second, 400)):
        assert norm(results.messages) == norm(
            [
                on_next(t0, rr()),
                on_next(t0 + 10, s1),
                on_next(t0 + 20, ErrorEvent(stream_id=1, error="streams [1] ended without stream_end")),
                on_next(t0 + 20, StreamEnd(stream_id=1, status="error")),
                on_next(t0 + 20, done(ok=False, ms=20_000.0, reason="error")),
                on_completed(t0 + 20),
            ]
        )


def test_turn_envelope_error_on_the_cancel_signal_still_closes_the_turn() -> None:
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="index")
    cancel = scheduler.create_hot_observable(on_error(250, RuntimeError("signal broke")))
    body = scheduler.create_cold_observable(on_next(10, s1), on_completed(100))

    results = scheduler.start(lambda: body.pipe(envelope(scheduler, cancel)))

    assert body.subscriptions == [subscribe(200, 250)]
    assert_envelope_rules(results.messages)


# --- to_chat_chunks -------------------------------------------------------------------

CID, MODEL, CREATED = "chatcmpl-1", "offline", 1_700_000_000


def chunk(delta: dict[str, Any], finish: str | None = None, *, usage_key: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": CID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage_key:
        out["usage"] = None
    return out


def usage_chunk(prompt: int, completion: int, total: int) -> dict[str, Any]:
    return {
        "id": CID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total},
    }


def chat(include_usage: bool) -> Callable[[Observable[Event]], Observable[dict[str, Any]]]:
    return to_chat_chunks(completion_id=CID, model=MODEL, created=CREATED, include_usage=include_usage)


def turn_events() -> list[Recorded[Any]]:
    """A turn with a nested sub-agent stream, trace and tool events."""
    return [
        on_next(10, rr()),
        on_next(20, Route(route="response")),
        on_next(30, StreamStart(stream_id=1, agent="index")),
        on_next(40, LlmCall(stream_id=1, model="m", messages=[])),
        on_next(50, Text(stream_id=1, delta="Hel")),
        on_next(60, StreamStart(stream_id=2, agent="sub", depth=1, parent_stream_id=1)),
        on_next(70, ToolCall(stream_id=2, tool="t", execution_id="x")),
        on_next(80, ToolResult(stream_id=2, tool="t", execution_id="x", ok=True)),
        on_next(90, Text(stream_id=2, delta="lo")),
        on_next(
            100, TokenUsage(stream_id=2, model="m", prompt_tokens=3, completion_tokens=4, total_tokens=7)
        ),
        on_next(110, StreamEnd(stream_id=2, finish_reason="tool_calls")),
        on_next(
            120, TokenUsage(stream_id=1, model="m", prompt_tokens=10, completion_tokens=20, total_tokens=30)
        ),
        on_next(130, StreamEnd(stream_id=1, finish_reason="length")),
        on_next(140, done(ok=True, ms=1.0, reason="completed")),
        on_completed(150),
    ]


def test_to_chat_chunks_without_usage() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(turn_events())

    results = scheduler.start(lambda: source.pipe(chat(False)))

    assert norm(results.messages) == norm(
        [
            on_next(250, chunk({"role": "assistant", "content": "Hel"})),
            on_next(290, chunk({"content": "lo"})),
            on_next(340, chunk({}, "length")),  # the top-level stream's reason, not the sub's
            on_completed(350),
        ]
    )
    assert source.subscriptions == [subscribe(200, 350)]


def test_to_chat_chunks_with_usage() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(turn_events())

    results = scheduler.start(lambda: source.pipe(chat(True)))

    assert norm(results.messages) == norm(
        [
            on_next(250, chunk({"role": "assistant", "content": "Hel"}, usage_key=True)),
            on_next(290, chunk({"content": "lo"}, usage_key=True)),
            on_next(340, chunk({}, "length", usage_key=True)),
            on_next(340, usage_chunk(13, 24, 37)),
            on_completed(350),
        ]
    )


@pytest.mark.parametrize("include_usage", [False, True])
def test_to_chat_chunks_finish_reason_defaults_to_stop(include_usage: bool) -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        on_next(10, StreamStart(stream_id=1, agent="index")),
        on_next(20, Text(stream_id=1, delta="a")),
        on_next(30, Text(stream_id=1, delta="b")),
        on_next(40, StreamEnd(stream_id=1)),
        on_next(50, done(ok=True, ms=1.0, reason="completed")),
        on_completed(60),
    )

    results = scheduler.start(lambda: source.pipe(chat(include_usage)))

    expected = [
        on_next(220, chunk({"role": "assistant", "content": "a"}, usage_key=include_usage)),
        on_next(230, chunk({"content": "b"}, usage_key=include_usage)),
        on_next(250, chunk({}, "stop", usage_key=include_usage)),
    ]
    if include_usage:
        expected.append(on_next(250, usage_chunk(0, 0, 0)))
    assert norm(results.messages) == norm([*expected, on_completed(260)])


def test_to_chat_chunks_error_event_becomes_an_error_object() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        on_next(10, StreamStart(stream_id=1, agent="index")),
        on_next(20, ErrorEvent(stream_id=1, error="model down", retryable=True)),
        on_next(30, StreamEnd(stream_id=1, status="error")),
        on_next(40, done(ok=False, ms=1.0, reason="error")),
        on_completed(50),
    )

    results = scheduler.start(lambda: source.pipe(chat(True)))

    assert norm(results.messages) == norm(
        [
            on_next(
                220, {"error": {"message": "model down", "type": "upstream_error", "code": "turn_failed"}}
            ),
            # after an error chunk the SDK has raised: no finish or usage chunk follows
            on_completed(250),
        ]
    )


def test_to_chat_chunks_source_error_and_disposal() -> None:
    scheduler = TestScheduler()
    exc = RuntimeError("stream broke")
    source = scheduler.create_cold_observable(on_next(10, Text(stream_id=1, delta="a")), on_error(20, exc))
    results = scheduler.start(lambda: source.pipe(chat(False)))
    assert norm(results.messages) == [
        (210, "N", chunk({"role": "assistant", "content": "a"})),
        (220, "E", exc),
    ]
    assert source.subscriptions == [subscribe(200, 220)]

    scheduler2 = TestScheduler()
    source2 = scheduler2.create_cold_observable(
        on_next(10, Text(stream_id=1, delta="a")), on_next(100, Text(stream_id=1, delta="b"))
    )
    results2 = scheduler2.start(lambda: source2.pipe(chat(False)), disposed=250)
    assert norm(results2.messages) == [(210, "N", chunk({"role": "assistant", "content": "a"}))]
    assert source2.subscriptions == [subscribe(200, 250)]


def test_to_chat_chunks_state_is_per_subscription() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        on_next(10, Text(stream_id=1, delta="a")),
        on_next(20, TokenUsage(stream_id=1, model="m", prompt_tokens=1, completion_tokens=1, total_tokens=2)),
        on_next(30, StreamEnd(stream_id=1, finish_reason="length")),
        on_next(40, done(ok=True, ms=1.0, reason="completed")),
        on_completed(50),
    )
    chunks = source.pipe(chat(True))
    second: MockObserver[dict[str, Any]] = scheduler.create_observer()
    scheduler.schedule_absolute(400.0, lambda sch, _: chunks.subscribe(second, scheduler=sch))

    first = scheduler.start(lambda: chunks)

    for results, t0 in ((first, 200), (second, 400)):
        assert norm(results.messages) == norm(
            [
                on_next(t0 + 10, chunk({"role": "assistant", "content": "a"}, usage_key=True)),
                on_next(t0 + 40, chunk({}, "length", usage_key=True)),
                on_next(t0 + 40, usage_chunk(1, 1, 2)),
                on_completed(t0 + 50),
            ]
        )


def test_full_turn_pipeline_marbles() -> None:
    """envelope → numbering → visibility, as the orchestrator composes them."""
    scheduler = TestScheduler()
    s1 = StreamStart(stream_id=1, agent="response")
    router = scheduler.create_cold_observable(on_next(5, Route(route="response")), on_completed(10))
    response = scheduler.create_cold_observable(
        on_next(5, s1),
        on_next(10, Text(stream_id=1, delta="x")),
        on_next(15, StreamEnd(stream_id=1)),
        on_completed(20),
    )

    results = scheduler.start(
        lambda: sequence(router, response).pipe(
            envelope(scheduler), number_events("r1"), ops.map(snapshot), visible(trace=False)
        )
    )

    seqs = [
        (m.time, m.value.value.type, m.value.value.seq)
        for m in results.messages
        if isinstance(m.value, OnNext)
    ]
    assert seqs == [
        (200, "request_received", 1),
        (215, "stream_start", 3),
        (220, "text", 4),
        (225, "stream_end", 5),
        (230, "done", 6),
    ]
    assert isinstance(results.messages[-1].value, OnCompleted)

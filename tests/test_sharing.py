"""ReplayLog (the turn's shared stream), resume_after and turn_updates, in virtual time."""

from __future__ import annotations

from typing import Any

from reactivex.testing import ReactiveTest, TestScheduler

from core.events import Done, ErrorEvent, Event, RequestReceived, StreamStart, Text
from operators import ReplayLog, resume_after, turn_updates

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe


def numbered(*events: Event) -> list[Event]:
    for seq, event in enumerate(events, start=1):
        event.seq = seq
        event.request_id = "req_1"
    return list(events)


def seqs(messages: list[Any]) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    for message in messages:
        kind = message.value.kind
        if kind == "N":
            out.append((message.time, message.value.value.seq))
        else:
            out.append((message.time, kind))
    return out


def test_replay_log_replays_to_late_subscribers_and_shares_live() -> None:
    scheduler = TestScheduler()
    a, b, c = numbered(Text(stream_id=1, delta="a"), Text(stream_id=1, delta="b"),
                       Text(stream_id=1, delta="c"))
    source = scheduler.create_hot_observable(
        on_next(210, a), on_next(220, b), on_next(240, c), on_completed(250)
    )
    log: ReplayLog[Event] = ReplayLog()
    early = scheduler.create_observer()
    late = scheduler.create_observer()
    after = scheduler.create_observer()
    scheduler.schedule_absolute(200, lambda *_: source.subscribe(log))
    scheduler.schedule_absolute(205, lambda *_: log.subscribe(early))
    scheduler.schedule_absolute(230, lambda *_: log.subscribe(late))
    scheduler.schedule_absolute(300, lambda *_: log.subscribe(after))
    scheduler.start()
    assert seqs(early.messages) == [(210, 1), (220, 2), (240, 3), (250, "C")]
    assert seqs(late.messages) == [(230, 1), (230, 2), (240, 3), (250, "C")]
    assert seqs(after.messages) == [(300, 1), (300, 2), (300, 3), (300, "C")]
    assert log.observers == [] and log.is_stopped


def test_replay_log_error_reaches_everyone_and_late_subscribers() -> None:
    log: ReplayLog[Event] = ReplayLog()
    got: list[Any] = []
    log.subscribe(on_next=lambda e: got.append(e.seq), on_error=lambda e: got.append(str(e)))
    [first] = numbered(Text(stream_id=1, delta="a"))
    log.on_next(first)
    log.on_error(RuntimeError("broke"))
    late: list[Any] = []
    log.subscribe(on_next=lambda e: late.append(e.seq), on_error=lambda e: late.append(str(e)))
    assert got == [1, "broke"] and late == [1, "broke"]


def test_replay_log_orders_reentrant_emissions() -> None:
    """An observer that makes the source emit during delivery (cancel → stream_end, done)
    must not make later observers see events out of order."""
    log: ReplayLog[Event] = ReplayLog()
    events = numbered(Text(stream_id=1, delta="a"), Text(stream_id=1, delta="b"),
                      Text(stream_id=1, delta="c"))
    first: list[int] = []
    second: list[int] = []

    def reenter(event: Event) -> None:
        first.append(event.seq)
        if event.seq == 1:
            log.on_next(events[1])
            log.on_next(events[2])

    log.subscribe(on_next=reenter)
    log.subscribe(on_next=lambda e: second.append(e.seq))
    log.on_next(events[0])
    assert first == [1, 2, 3]
    assert second == [1, 2, 3]
    assert [e.seq for e in log.items] == [1, 2, 3]


def test_replay_log_subscriber_joining_during_delivery_gets_each_event_once() -> None:
    log: ReplayLog[Event] = ReplayLog()
    events = numbered(Text(stream_id=1, delta="a"), Text(stream_id=1, delta="b"))
    joined: list[int] = []

    def join_then_emit(event: Event) -> None:
        if event.seq == 1:
            log.on_next(events[1])  # queued: not yet delivered, not yet in the log
            log.subscribe(on_next=lambda e: joined.append(e.seq))

    log.subscribe(on_next=join_then_emit)
    log.on_next(events[0])
    assert joined == [1, 2]


def test_replay_log_dispose_stops_delivery() -> None:
    log: ReplayLog[Event] = ReplayLog()
    got: list[int] = []
    subscription = log.subscribe(on_next=lambda e: got.append(e.seq))
    a, b = numbered(Text(stream_id=1, delta="a"), Text(stream_id=1, delta="b"))
    log.on_next(a)
    subscription.dispose()
    log.on_next(b)
    assert got == [1] and log.observers == []


def test_resume_after_passes_only_unseen_events() -> None:
    scheduler = TestScheduler()
    events = numbered(*(Text(stream_id=1, delta=str(i)) for i in range(5)))
    source = scheduler.create_cold_observable(
        *(on_next(10 * (i + 1), e) for i, e in enumerate(events)), on_completed(60)
    )
    resumed = scheduler.start(lambda: source.pipe(resume_after(3)))
    everything = TestScheduler()
    cold = everything.create_cold_observable(
        *(on_next(10 * (i + 1), e) for i, e in enumerate(events)), on_completed(60)
    )
    all_of_it = everything.start(lambda: cold.pipe(resume_after(0)))
    assert seqs(resumed.messages) == [(240, 4), (250, 5), (260, "C")]
    assert [s for _, s in seqs(all_of_it.messages)] == [1, 2, 3, 4, 5, "C"]


def test_turn_updates_fold_the_answer() -> None:
    scheduler = TestScheduler()
    events = numbered(
        RequestReceived(agent="a", conversation_id="c"),
        StreamStart(stream_id=1, agent="a", depth=0),
        StreamStart(stream_id=2, agent="helper", depth=1),
        Text(stream_id=2, delta="(sub)"),  # a nested stream: not the answer
        Text(stream_id=1, delta="Hi"),
        Text(stream_id=1, delta="!"),
        ErrorEvent(stream_id=1, error="late failure"),
        Done(ok=False, duration_ms=1, reason="error"),
    )
    source = scheduler.create_cold_observable(
        *(on_next(10 * (i + 1), e) for i, e in enumerate(events)), on_completed(100)
    )
    results = scheduler.start(lambda: source.pipe(turn_updates(session_id="c")))
    got = [
        (m.time, m.value.value.status, m.value.value.content, m.value.value.delta,
         m.value.value.event, m.value.value.error)
        for m in results.messages if m.value.kind == "N"
    ]
    assert got == [
        (210, "pending", "", "", "request_received", None),
        (250, "streaming", "Hi", "Hi", "text", None),
        (260, "streaming", "Hi!", "!", "text", None),
        (270, "streaming", "Hi!", "", "turn_error", "late failure"),
        (280, "error", "Hi!", "", "done", "late failure"),
    ]
    assert all(m.value.value.response_id == "req_1" for m in results.messages
               if m.value.kind == "N")


def test_turn_updates_keep_state_per_subscription() -> None:
    events = numbered(
        RequestReceived(agent="a", conversation_id="c"),
        StreamStart(stream_id=1, agent="a", depth=1),  # nested: its text is not the answer
        Text(stream_id=1, delta="x"),
        Done(ok=True, duration_ms=1.0, reason="completed"),
    )
    log: ReplayLog[Event] = ReplayLog()
    for event in events:
        log.on_next(event)
    log.on_completed()
    view = log.pipe(turn_updates(session_id="c"))
    first: list[str] = []
    second: list[str] = []
    view.subscribe(on_next=lambda u: first.append(f"{u.status}:{u.content}"))
    view.subscribe(on_next=lambda u: second.append(f"{u.status}:{u.content}"))
    assert first == second == ["pending:", "complete:"]


def test_the_recorder_reports_the_result_even_when_the_store_cannot_write(
    tmp_path: Any,
) -> None:
    """A store that fails (here: closed) must not leave the turn's result unresolved."""
    from core.turn import TurnContext, TurnResult
    from sinks.recorder import TurnRecorder
    from sinks.store import EventStore

    ctx = TurnContext(request_id="req_1", conversation_id="c", messages=[], trace=False,
                      model="m", max_tokens=None, kind="orchestrate")
    results: list[TurnResult] = []
    recorder = TurnRecorder(ctx, store=EventStore(tmp_path / "never_opened.duckdb"),
                            on_done=results.append)
    for event in numbered(
        RequestReceived(agent="a", conversation_id="c"),
        StreamStart(stream_id=1, agent="a", depth=0),
        Text(stream_id=1, delta="kept"),
        Done(ok=True, duration_ms=1.0, reason="completed"),
    ):
        recorder.on_next(event)
    assert [(r.status, r.content) for r in results] == [("completed", "kept")]

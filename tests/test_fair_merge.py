"""``merge_fair`` in virtual time, and its asyncio consumer bridge ``iterate_with_demand``.

A consumer is modelled in virtual time by :func:`consume`: it asks for ``ahead`` events at
subscription and, ``cost`` ticks after receiving each event, for one more. Panelists'
events are plain strings named after the panelist and the tick they were emitted at
(``"b15"`` = bob at 15), so the expected lists read as a schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import pytest
import reactivex
from pydantic import BaseModel
from reactivex import Observable
from reactivex import operators as ops
from reactivex.notification import OnCompleted, OnError, OnNext
from reactivex.subject import Subject
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.coldobservable import ColdObservable
from reactivex.testing.marbles import marbles_testing
from reactivex.testing.recorded import Recorded

from core.errors import BufferOverflowError
from core.events import Event, Text, stream_id_of
from operators import from_async_iterable, merge_fair
from sinks.fair_iter import iterate_with_demand

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe

WAIT = 2.0  # asyncio tests: upper bound for a hand-off; only reached when something hangs


# --- helpers -------------------------------------------------------------------------


def norm(messages: list[Recorded[Any]]) -> list[tuple[Any, ...]]:
    """Recorded notifications as ``(tick after subscribe, kind, payload)``."""
    out: list[tuple[Any, ...]] = []
    for message in messages:
        tick = int(message.time) - 200
        notification = message.value
        if isinstance(notification, OnNext):
            value = notification.value
            if isinstance(value, BaseModel):
                value = value.model_dump(exclude={"ts"})
            out.append((tick, "N", value))
        elif isinstance(notification, OnError):
            out.append((tick, "E", notification.exception))
        elif isinstance(notification, OnCompleted):
            out.append((tick, "C"))
        else:  # pragma: no cover
            raise AssertionError(f"unexpected recorded value {notification!r}")
    return out


def values(messages: list[Recorded[Any]]) -> list[Any]:
    return [m.value.value for m in messages if isinstance(m.value, OnNext)]


def panelist(
    scheduler: TestScheduler, name: str, ticks: list[int], *, end: int | None = None,
    error: Exception | None = None,
) -> ColdObservable[str]:
    """A cold panelist emitting ``f"{name}{tick}"`` at each tick, then completing (or failing)."""
    messages: list[Recorded[str]] = [on_next(t, f"{name}{t}") for t in ticks]
    last = (end if end is not None else max(ticks, default=0) + 1)
    messages.append(on_error(last, error) if error is not None else on_completed(last))
    return scheduler.create_cold_observable(*messages)


def consume(
    scheduler: TestScheduler,
    build: Callable[[Observable[int]], Observable[Any]],
    *,
    cost: int,
    ahead: int = 1,
    disposed: int = 1000,
) -> list[Recorded[Any]]:
    """Run ``build(demand)`` into a consumer that needs ``cost`` ticks per event."""
    requests: Subject[int] = Subject()

    def create() -> Observable[Any]:
        def done_later(_: Any) -> None:
            scheduler.schedule_relative(cost, lambda *_: requests.on_next(1))

        return build(requests.pipe(ops.start_with(ahead))).pipe(ops.do_action(on_next=done_later))

    return scheduler.start(create, disposed=disposed).messages


def consume_synchronously(build: Callable[[Observable[int]], Observable[Any]]) -> Observable[Any]:
    """A consumer that is done with each event at once: it asks for the next inside on_next."""

    def subscribe_(observer: Any, scheduler: Any = None) -> Any:
        requests: Subject[int] = Subject()

        def on_next_(item: Any) -> None:
            observer.on_next(item)
            requests.on_next(1)

        subscription = build(requests).subscribe(
            on_next_, observer.on_error, observer.on_completed, scheduler=scheduler
        )
        requests.on_next(1)
        return subscription

    return reactivex.create(subscribe_)


def fair(*sources: Observable[Any], **options: Any) -> Callable[[Observable[int]], Observable[Any]]:
    options.setdefault("max_buffer_per_key", 100)
    return lambda demand: merge_fair(*sources, demand=demand, **options)


# --- a consumer that keeps up: exactly merge --------------------------------------------


def _panel(scheduler: TestScheduler, *, coincident: bool = True) -> list[ColdObservable[str]]:
    if coincident:  # alice and bob emit at the same ticks 3, 9 and 10
        return [
            panelist(scheduler, "a", [1, 3, 5, 7, 9, 10, 11, 20]),
            panelist(scheduler, "b", [3, 9, 10, 15], end=25),
            panelist(scheduler, "c", [2, 10, 30]),
        ]
    return [
        panelist(scheduler, "a", [1, 3, 5, 7, 11, 20]),
        panelist(scheduler, "b", [4, 9, 15], end=25),
        panelist(scheduler, "c", [2, 10, 30]),
    ]


@pytest.mark.parametrize(
    ("coincident", "cost"),
    [(True, 0), (False, 1)],
    ids=["done-the-same-tick", "done-before-the-next-event"],
)
def test_a_consumer_that_keeps_up_sees_exactly_merge(coincident: bool, cost: int) -> None:
    baseline = TestScheduler()
    expected = baseline.start(lambda: reactivex.merge(*_panel(baseline, coincident=coincident))).messages

    scheduler = TestScheduler()
    panel = _panel(scheduler, coincident=coincident)
    results = consume(scheduler, fair(*panel), cost=cost)

    assert norm(results) == norm(expected)  # same events, same ticks, same order
    assert [p.subscriptions for p in panel] == [
        [subscribe(200, 221)], [subscribe(200, 225)], [subscribe(200, 231)]
    ]


def test_a_consumer_asking_inside_on_next_sees_exactly_merge() -> None:
    baseline = TestScheduler()
    expected = baseline.start(lambda: reactivex.merge(*_panel(baseline))).messages

    scheduler = TestScheduler()
    results = scheduler.start(lambda: consume_synchronously(fair(*_panel(scheduler))))

    assert norm(results.messages) == norm(expected)


def test_a_synchronous_consumer_of_a_long_synchronous_stream_does_not_recurse() -> None:
    """Demand from inside on_next is queued for the running drain loop, not a nested call."""
    n = 20_000
    items: list[int] = []
    consume_synchronously(fair(reactivex.from_iterable(range(n)), max_buffer_per_key=n)).subscribe(
        items.append
    )
    assert items == list(range(n))


# --- a slow consumer: round-robin ------------------------------------------------------


def test_marbles_slow_consumer_round_robin_vs_fifo() -> None:
    """The docstring's diagram: alice ten times more verbose, the consumer takes 4 ticks."""
    with marbles_testing() as (start, cold, _hot, exp):
        demand = "1---1---1---1---1---1---1---1---1---1---1---1"
        alice = cold("-a-a-a-a-a-a-a-a-a-a|", None, None)
        bob = cold("--b---------------b-|", None, None)
        fair_out = start(merge_fair(alice, bob, demand=cold(demand, None, None), max_buffer_per_key=16))
        fair_expected = exp("-a--b---a---a---a---a---b---a---a---a---a---(a,|)", None, None)
    with marbles_testing() as (start, cold, _hot, exp):
        alice = cold("-a-a-a-a-a-a-a-a-a-a|", None, None)
        bob = cold("--b---------------b-|", None, None)
        # FIFO through the same consumer: one key for everyone is plain merge, paced.
        fifo_out = start(
            merge_fair(reactivex.merge(alice, bob), demand=cold(demand, None, None), max_buffer_per_key=16)
        )
        fifo_expected = exp("-a--b---a---a---a---a---a---a---a---a---b---(a,|)", None, None)
    assert norm(fair_out) == norm(fair_expected)
    assert norm(fifo_out) == norm(fifo_expected)


def test_slow_consumer_releases_round_robin_so_a_verbose_panelist_cannot_starve_the_others() -> None:
    """alice: an event every tick (30); bob and carol: one every 10 ticks (3 each).

    The consumer needs 3 ticks per event, so the panel (36 events in 30 ticks) outruns it.
    """
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", list(range(1, 31)))
    bob = panelist(scheduler, "b", [5, 15, 25], end=31)
    carol = panelist(scheduler, "c", [10, 20, 30])

    results = consume(scheduler, fair(alice, bob, carol), cost=3)

    assert norm(results) == [
        (1, "N", "a1"),     # demand outstanding: passes at once
        (4, "N", "a2"),     # from here on alice's events wait in her queue
        (7, "N", "a3"),
        (10, "N", "b5"),    # bob joined the ring at 5, behind alice
        (13, "N", "a4"),
        (16, "N", "c10"),   # carol joined at 10 (before the demand of tick 10)
        (19, "N", "a5"),
        (22, "N", "b15"),
        (25, "N", "a6"),
        (28, "N", "c20"),
        (31, "N", "b25"),
        (34, "N", "a7"),
        (37, "N", "c30"),
        *[(37 + 3 * i, "N", f"a{7 + i}") for i in range(1, 24)],  # then alice's backlog
        (106, "C"),  # sources completed at 31; completion waits for the drain
    ]
    # Sources are not held up: they run at their own pace and complete at 31.
    assert alice.subscriptions == [subscribe(200, 231)]
    assert bob.subscriptions == [subscribe(200, 231)]
    assert carol.subscriptions == [subscribe(200, 231)]


def test_same_panel_through_plain_merge_makes_bob_and_carol_wait_behind_alice() -> None:
    """The contrast: one key for everyone (FIFO) through the same consumer."""
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", list(range(1, 31)))
    bob = panelist(scheduler, "b", [5, 15, 25], end=31)
    carol = panelist(scheduler, "c", [10, 20, 30])

    results = consume(scheduler, fair(reactivex.merge(alice, bob, carol)), cost=3)

    delivered = {v: t for t, kind, *v_ in norm(results) if kind == "N" for v in v_}
    assert delivered["b25"] == 88 and delivered["c30"] == 106  # vs 31 and 37 above


def test_key_groups_one_merged_stream_by_stream_id() -> None:
    """The roundtable shape: panelists' events already in one stream, fair by ``stream_id``."""
    scheduler = TestScheduler()
    t: Callable[[int, str], Text] = lambda sid, d: Text(stream_id=sid, delta=d)  # noqa: E731
    merged = scheduler.create_cold_observable(
        on_next(1, t(1, "a1")), on_next(2, t(1, "a2")), on_next(3, t(1, "a3")), on_next(4, t(2, "b1")),
        on_next(5, t(1, "a4")), on_next(6, t(3, "c1")), on_next(7, t(2, "b2")), on_completed(8),
    )

    def key(event: Event) -> Hashable:
        return stream_id_of(event)

    results = consume(scheduler, fair(merged, key=key), cost=10)

    assert [e.delta for e in values(results)] == ["a1", "a2", "b1", "c1", "a3", "b2", "a4"]
    assert [m.time - 200 for m in results] == [1, 11, 21, 31, 41, 51, 61, 61]


def test_nothing_is_emitted_before_the_first_demand() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [1, 2, 3])
    requests = scheduler.create_cold_observable(on_next(20, 2), on_next(30, 5))

    results = scheduler.start(lambda: merge_fair(alice, demand=requests, max_buffer_per_key=8))

    assert norm(results.messages) == [(20, "N", "a1"), (20, "N", "a2"), (30, "N", "a3"), (30, "C")]


# --- bounded queues --------------------------------------------------------------------


def test_overflow_error_stops_the_sources_then_delivers_what_was_queued_then_errors() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [1, 2, 3, 4, 5, 6], end=10)
    bob = panelist(scheduler, "b", [2], end=50)
    requests = scheduler.create_cold_observable(on_next(1, 1), on_next(20, 1), on_next(30, 10))

    results = scheduler.start(lambda: merge_fair(alice, bob, demand=requests, max_buffer_per_key=3))

    # a1 passes; a2 a3 a4 fill alice's queue; a5 overflows at 5: both sources stop there.
    out = norm(results.messages)
    assert out[:-1] == [(1, "N", "a1"), (20, "N", "a2"), (30, "N", "b2"), (30, "N", "a3"), (30, "N", "a4")]
    assert out[-1][:2] == (30, "E")
    assert isinstance(out[-1][2], BufferOverflowError)
    assert out[-1][2].max_buffer == 3
    assert alice.subscriptions == [subscribe(200, 205)]
    assert bob.subscriptions == [subscribe(200, 205)]
    assert requests.subscriptions == [subscribe(200, 230)]


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("drop_oldest", ["a4", "a5", "a6"]), ("drop_newest", ["a2", "a3", "a4"])],
)
def test_overflow_drop_policies_keep_the_queue_bounded_and_go_on(policy: Any, kept: list[str]) -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [1, 2, 3, 4, 5, 6])
    bob = panelist(scheduler, "b", [3])
    requests = scheduler.create_cold_observable(on_next(1, 1), on_next(20, 10))

    results = scheduler.start(
        lambda: merge_fair(alice, bob, demand=requests, max_buffer_per_key=3, overflow=policy)
    )

    assert values(results.messages) == ["a1", kept[0], "b3", *kept[1:]]
    assert norm(results.messages)[-1] == (20, "C")
    assert alice.subscriptions == [subscribe(200, 207)]


def test_bad_settings_are_refused_when_the_operator_is_built() -> None:
    never: Observable[int] = reactivex.never()
    with pytest.raises(ValueError, match="max_buffer_per_key"):
        merge_fair(never, demand=never, max_buffer_per_key=0)
    with pytest.raises(ValueError, match="overflow"):
        merge_fair(never, demand=never, max_buffer_per_key=1, overflow="block")  # type: ignore[arg-type]


# --- completion ------------------------------------------------------------------------


def test_completes_only_after_every_queue_is_drained() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [1, 2, 3], end=4)
    bob = panelist(scheduler, "b", [2], end=5)

    results = consume(scheduler, fair(alice, bob), cost=10)

    assert norm(results) == [
        (1, "N", "a1"), (11, "N", "a2"), (21, "N", "b2"), (31, "N", "a3"), (31, "C")
    ]
    assert alice.subscriptions == [subscribe(200, 204)]
    assert bob.subscriptions == [subscribe(200, 205)]


def test_completion_needs_no_demand() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [], end=5)
    results = scheduler.start(lambda: merge_fair(alice, demand=reactivex.never(), max_buffer_per_key=1))
    assert norm(results.messages) == [(5, "C")]


def test_no_sources_completes_at_once() -> None:
    scheduler = TestScheduler()
    empty: tuple[Observable[str], ...] = ()
    results = scheduler.start(lambda: merge_fair(*empty, demand=reactivex.never(), max_buffer_per_key=1))
    assert norm(results.messages) == [(0, "C")]


# --- errors ----------------------------------------------------------------------------


def test_a_source_error_stops_the_others_at_once_and_arrives_after_the_queued_events() -> None:
    scheduler = TestScheduler()
    boom = RuntimeError("panelist bob failed")
    alice = panelist(scheduler, "a", [1, 2, 3, 8, 9], end=40)
    bob = panelist(scheduler, "b", [2], end=4, error=boom)

    results = consume(scheduler, fair(alice, bob), cost=10)

    assert norm(results) == [
        (1, "N", "a1"), (11, "N", "a2"), (21, "N", "b2"), (31, "N", "a3"), (31, "E", boom)
    ]
    assert alice.subscriptions == [subscribe(200, 204)]  # a8, a9 never come
    assert bob.subscriptions == [subscribe(200, 204)]


def test_a_failing_key_is_passed_on_as_an_error() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [1, 2, 3], end=10)

    def key(item: str) -> Hashable:
        if item == "a3":
            raise KeyError(item)
        return "alice"

    results = consume(scheduler, fair(alice, key=key), cost=5)

    out = norm(results)
    assert out[:2] == [(1, "N", "a1"), (6, "N", "a2")]
    assert out[2][:2] == (6, "E") and isinstance(out[2][2], KeyError)
    assert alice.subscriptions == [subscribe(200, 203)]


def test_a_demand_error_is_the_consumers_failure_and_passes_at_once() -> None:
    scheduler = TestScheduler()
    gone = ConnectionResetError("client left")
    alice = panelist(scheduler, "a", [1, 2, 3], end=50)
    requests = scheduler.create_cold_observable(on_next(1, 1), on_error(10, gone))

    results = scheduler.start(lambda: merge_fair(alice, demand=requests, max_buffer_per_key=8))

    assert norm(results.messages) == [(1, "N", "a1"), (10, "E", gone)]  # a2, a3 dropped
    assert alice.subscriptions == [subscribe(200, 210)]


def test_a_demand_below_one_is_an_error() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", [1], end=50)
    requests = scheduler.create_cold_observable(on_next(5, 0))

    results = scheduler.start(lambda: merge_fair(alice, demand=requests, max_buffer_per_key=8))

    out = norm(results.messages)
    assert len(out) == 1 and out[0][:2] == (5, "E")
    assert isinstance(out[0][2], ValueError)
    assert alice.subscriptions == [subscribe(200, 205)]


# --- disposal --------------------------------------------------------------------------


def test_disposal_disposes_every_source_and_the_demand_and_emits_nothing_after() -> None:
    scheduler = TestScheduler()
    alice = panelist(scheduler, "a", list(range(1, 40)))
    bob = panelist(scheduler, "b", [5, 15, 25, 35])
    requests = scheduler.create_cold_observable(*[on_next(t, 1) for t in range(0, 100, 10)])

    results = scheduler.start(
        lambda: merge_fair(alice, bob, demand=requests, max_buffer_per_key=64), disposed=225
    )

    assert [m.time - 200 for m in results.messages] == [0 + 1, 10, 20]  # a1 at 1, then one per 10
    assert alice.subscriptions == [subscribe(200, 225)]
    assert bob.subscriptions == [subscribe(200, 225)]
    assert requests.subscriptions == [subscribe(200, 225)]


# --- threads ---------------------------------------------------------------------------


def test_sources_on_other_threads_lose_nothing_and_keep_each_panelists_order() -> None:
    n = 2_000
    got: list[tuple[str, int]] = []
    finished = threading.Event()
    requests: Subject[int] = Subject()
    panel: list[Subject[tuple[str, int]]] = [Subject(), Subject(), Subject()]

    def on_next_(item: tuple[str, int]) -> None:
        got.append(item)
        requests.on_next(1)

    merge_fair(*panel, demand=requests, max_buffer_per_key=n).subscribe(
        on_next_, on_completed=finished.set
    )
    requests.on_next(1)

    def run(name: str, subject: Subject[tuple[str, int]]) -> None:
        for i in range(n):
            subject.on_next((name, i))
        subject.on_completed()

    threads = [threading.Thread(target=run, args=(name, s)) for name, s in zip("abc", panel, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert finished.wait(WAIT)

    assert len(got) == 3 * n
    for name in "abc":
        assert [i for who, i in got if who == name] == list(range(n))


# --- the asyncio bridge ----------------------------------------------------------------


async def test_bridge_releases_a_backlog_round_robin() -> None:
    """Synchronous panelists queue everything before the first request: pure round-robin."""

    def build(demand: Observable[int]) -> Observable[str]:
        return merge_fair(
            reactivex.from_iterable([f"a{i}" for i in range(1, 11)]),
            reactivex.from_iterable(["b1", "b2"]),
            reactivex.from_iterable(["c1"]),
            demand=demand,
            max_buffer_per_key=10,
        )

    async with contextlib.aclosing(iterate_with_demand(build)) as events:
        got = [event async for event in events]

    assert got == ["a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10"]


async def test_bridge_paces_async_panelists_and_a_slow_consumer_gets_them_interleaved() -> None:
    gate = asyncio.Event()

    def talker(name: str, count: int) -> Observable[str]:
        async def gen() -> AsyncIterator[str]:
            for i in range(count):
                yield f"{name}{i}"
                await asyncio.sleep(0)
            if name == "a":
                gate.set()

        return from_async_iterable(gen)

    got: list[str] = []
    build = fair(talker("a", 30), talker("b", 3), talker("c", 3))
    async with contextlib.aclosing(iterate_with_demand(build)) as events:
        async for event in events:
            got.append(event)
            if len(got) == 1:
                await asyncio.wait_for(gate.wait(), WAIT)  # a slow consumer: alice has finished

    assert sorted(got) == sorted([f"a{i}" for i in range(30)] + ["b0", "b1", "b2", "c0", "c1", "c2"])
    for name in "abc":  # each panelist's own order is kept
        mine = [e for e in got if e[0] == name]
        assert mine == sorted(mine, key=lambda e: int(e[1:]))
    # The backlog came out round-robin: bob and carol are done long before alice.
    assert got.index("b2") < 12 and got.index("c2") < 12


async def test_bridge_early_exit_disposes_the_panel() -> None:
    closed: list[str] = []
    never = asyncio.Event()

    def talker(name: str) -> Observable[str]:
        async def gen() -> AsyncIterator[str]:
            try:
                yield f"{name}0"
                await never.wait()
                yield f"{name}1"  # pragma: no cover
            finally:
                closed.append(name)

        return from_async_iterable(gen)

    async with contextlib.aclosing(iterate_with_demand(fair(talker("a"), talker("b")))) as events:
        async for event in events:
            assert event == "a0"
            break
    for _ in range(20):
        if len(closed) == 2:
            break
        await asyncio.sleep(0)
    assert sorted(closed) == ["a", "b"]


async def test_bridge_raises_a_source_error_after_the_queued_events() -> None:
    boom = RuntimeError("bob failed")
    failed = asyncio.Event()

    async def alice() -> AsyncIterator[str]:
        for item in ("a1", "a2", "a3"):
            yield item

    async def bob() -> AsyncIterator[str]:
        await asyncio.sleep(0)
        failed.set()
        raise boom
        yield  # pragma: no cover  (makes this an async generator)

    got: list[str] = []
    with pytest.raises(RuntimeError) as raised:
        build = fair(from_async_iterable(alice), from_async_iterable(bob))
        async with contextlib.aclosing(iterate_with_demand(build)) as events:
            async for event in events:
                got.append(event)
                await asyncio.wait_for(failed.wait(), WAIT)  # slow: bob fails meanwhile
    assert raised.value is boom
    assert got == ["a1", "a2", "a3"]


async def test_bridge_refuses_a_source_that_ignores_demand() -> None:
    got: list[int] = []
    with pytest.raises(BufferOverflowError):
        async with contextlib.aclosing(
            iterate_with_demand(lambda _demand: reactivex.from_iterable(range(10)), prefetch=2)
        ) as events:
            async for event in events:
                got.append(event)
    assert got == [0, 1]


async def test_bridge_refuses_a_prefetch_below_one() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        await anext(iterate_with_demand(lambda demand: reactivex.empty(), prefetch=0))

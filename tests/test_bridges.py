"""The asyncio bridges: ``from_async_iterable`` and ``to_async_iterator``.

These run on the real event loop. Waits are bounded and only cover async hand-offs
(a task starting, a callback scheduled from a thread); nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import reactivex
from reactivex import abc
from reactivex import operators as ops
from reactivex.disposable import Disposable
from reactivex.subject import Subject

from core.errors import BufferOverflowError
from operators import ReplayLog, from_async_iterable
from sinks.async_iter import BATCH_MAX, to_async_batches, to_async_iterator

WAIT = 2.0  # upper bound for a hand-off; only reached when something hangs


async def settle(ticks: int = 20) -> None:
    """Let the loop run pending callbacks and task steps (no wall-clock wait)."""
    for _ in range(ticks):
        await asyncio.sleep(0)


class Recorder:
    """An observer that records notifications and signals the terminal one."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.errors: list[Exception] = []
        self.completed = 0
        self.terminal = asyncio.Event()
        self.item_arrived = asyncio.Event()

    def on_next(self, item: Any) -> None:
        self.items.append(item)
        self.item_arrived.set()

    def on_error(self, exc: Exception) -> None:
        self.errors.append(exc)
        self.terminal.set()

    def on_completed(self) -> None:
        self.completed += 1
        self.terminal.set()

    def subscribe_to(self, source: reactivex.Observable[Any]) -> abc.DisposableBase:
        return source.subscribe(self.on_next, self.on_error, self.on_completed)


# --- from_async_iterable ----------------------------------------------------------------


async def test_from_async_iterable_emits_items_then_completes() -> None:
    async def tokens() -> AsyncIterator[str]:
        for token in ("a", "b", "c"):
            await asyncio.sleep(0)
            yield token

    rec = Recorder()
    rec.subscribe_to(from_async_iterable(tokens))
    await asyncio.wait_for(rec.terminal.wait(), WAIT)

    assert rec.items == ["a", "b", "c"]
    assert rec.errors == []
    assert rec.completed == 1


async def test_from_async_iterable_is_cold_each_subscription_calls_the_factory() -> None:
    calls = 0

    def factory() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        run = calls

        async def gen() -> AsyncIterator[int]:
            yield run * 10 + 1
            yield run * 10 + 2

        return gen()

    source = from_async_iterable(factory)
    assert calls == 0  # nothing happens before subscribe
    first, second = Recorder(), Recorder()
    first.subscribe_to(source)
    second.subscribe_to(source)
    await asyncio.wait_for(first.terminal.wait(), WAIT)
    await asyncio.wait_for(second.terminal.wait(), WAIT)

    assert calls == 2
    assert (first.items, first.completed) == ([11, 12], 1)
    assert (second.items, second.completed) == ([21, 22], 1)


async def test_from_async_iterable_generator_error_reaches_on_error_as_is() -> None:
    """Auto-detach disposes inside on_error, i.e. inside the pump (the field-note case)."""
    boom = ValueError("provider broke")
    finalized = False

    async def gen() -> AsyncIterator[str]:
        nonlocal finalized
        try:
            yield "a"
            await asyncio.sleep(0)
            raise boom
        finally:
            finalized = True

    rec = Recorder()
    rec.subscribe_to(from_async_iterable(gen))
    await asyncio.wait_for(rec.terminal.wait(), WAIT)
    await settle()

    assert rec.items == ["a"]
    assert len(rec.errors) == 1
    assert rec.errors[0] is boom
    assert not isinstance(rec.errors[0], asyncio.CancelledError)
    assert rec.completed == 0
    assert finalized


async def test_from_async_iterable_error_through_operators_keeps_the_exception() -> None:
    boom = RuntimeError("mid-stream")

    async def gen() -> AsyncIterator[int]:
        yield 1
        raise boom

    rec = Recorder()
    rec.subscribe_to(from_async_iterable(gen).pipe(ops.map(lambda x: x * 2)))
    await asyncio.wait_for(rec.terminal.wait(), WAIT)

    assert rec.items == [2]
    assert rec.errors == [boom]
    assert rec.errors[0] is boom


async def test_from_async_iterable_dispose_mid_stream_cancels_and_finalizes() -> None:
    gate = asyncio.Event()
    finalized = asyncio.Event()

    async def gen() -> AsyncIterator[str]:
        try:
            yield "a"
            await gate.wait()  # a slow model: the next token has not come yet
            yield "b"
        finally:
            finalized.set()

    rec = Recorder()
    subscription = rec.subscribe_to(from_async_iterable(gen))
    await asyncio.wait_for(rec.item_arrived.wait(), WAIT)
    subscription.dispose()
    await asyncio.wait_for(finalized.wait(), WAIT)
    gate.set()
    await settle()

    assert rec.items == ["a"]
    assert rec.errors == []
    assert rec.completed == 0


async def test_from_async_iterable_dispose_from_another_thread() -> None:
    gate = asyncio.Event()
    finalized = asyncio.Event()

    async def gen() -> AsyncIterator[str]:
        try:
            yield "a"
            await gate.wait()
            yield "b"
        finally:
            finalized.set()

    rec = Recorder()
    subscription = rec.subscribe_to(from_async_iterable(gen))
    await asyncio.wait_for(rec.item_arrived.wait(), WAIT)
    await asyncio.to_thread(subscription.dispose)
    await asyncio.wait_for(finalized.wait(), WAIT)
    gate.set()
    await settle()

    assert rec.items == ["a"]
    assert (rec.errors, rec.completed) == ([], 0)


async def test_from_async_iterable_dispose_before_first_tick_never_calls_factory() -> None:
    calls = 0

    async def gen() -> AsyncIterator[int]:
        yield 1

    def factory() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        return gen()

    rec = Recorder()
    subscription = rec.subscribe_to(from_async_iterable(factory))
    subscription.dispose()
    await settle()

    assert calls == 0
    assert (rec.items, rec.errors, rec.completed) == ([], [], 0)


async def test_from_async_iterable_take_closes_the_generator_promptly() -> None:
    gate = asyncio.Event()
    finalized = asyncio.Event()

    async def gen() -> AsyncIterator[str]:
        try:
            yield "a"
            await gate.wait()  # the upstream is silent (slow model, idle stream)
            yield "b"
        finally:
            finalized.set()

    rec = Recorder()
    rec.subscribe_to(from_async_iterable(gen).pipe(ops.take(1)))
    try:
        await asyncio.wait_for(rec.terminal.wait(), WAIT)
        assert (rec.items, rec.completed) == (["a"], 1)
        await settle()
        assert finalized.is_set(), "generator still open after take(1) disposed it"
    finally:
        gate.set()  # let the leaked pump finish so no task outlives the test
        await settle()


async def test_from_async_iterable_factory_error_reaches_on_error() -> None:
    boom = RuntimeError("could not open the stream")

    def factory() -> AsyncIterator[int]:
        raise boom

    rec = Recorder()
    before = asyncio.all_tasks()
    rec.subscribe_to(from_async_iterable(factory))
    pumps = asyncio.all_tasks() - before
    try:
        await settle()
        assert rec.errors == [boom]
    finally:
        # retrieve the dead pump's exception so asyncio does not log it at shutdown
        await asyncio.gather(*pumps, return_exceptions=True)


# --- to_async_iterator ------------------------------------------------------------------


async def test_to_async_iterator_yields_in_order_and_ends_on_completion() -> None:
    async with contextlib.aclosing(
        to_async_iterator(reactivex.from_iterable([1, 2, 3]), max_buffer=10)
    ) as events:
        got = [item async for item in events]
    assert got == [1, 2, 3]


async def test_to_async_iterator_yields_items_pushed_later() -> None:
    subject: Subject[int] = Subject()

    async def consume() -> list[int]:
        async with contextlib.aclosing(to_async_iterator(subject, max_buffer=10)) as events:
            return [item async for item in events]

    task = asyncio.create_task(consume())
    await settle()
    assert len(subject.observers) == 1  # subscribed on the first __anext__
    for i in range(3):
        subject.on_next(i)
        await settle(2)
    subject.on_completed()

    assert await asyncio.wait_for(task, WAIT) == [0, 1, 2]
    assert not subject.observers


async def test_to_async_iterator_reraises_the_source_error() -> None:
    boom = ValueError("source failed")
    source = reactivex.concat(reactivex.of(1, 2), reactivex.throw(boom))
    got: list[int] = []

    with pytest.raises(ValueError) as info:
        async with contextlib.aclosing(to_async_iterator(source, max_buffer=10)) as events:
            async for item in events:
                got.append(item)

    assert info.value is boom
    assert got == [1, 2]


async def test_to_async_iterator_overflow_from_a_synchronous_source() -> None:
    got: list[int] = []

    with pytest.raises(BufferOverflowError) as info:
        async with contextlib.aclosing(
            to_async_iterator(reactivex.from_iterable(range(100)), max_buffer=5)
        ) as events:
            async for item in events:
                got.append(item)

    assert got == [0, 1, 2, 3, 4]
    assert info.value.max_buffer == 5


async def test_to_async_iterator_overflow_disposes_at_once_then_drains_the_buffer() -> None:
    subject: Subject[int] = Subject()
    got: list[int] = []

    async def consume() -> None:
        async with contextlib.aclosing(to_async_iterator(subject, max_buffer=5)) as events:
            async for item in events:
                got.append(item)

    task = asyncio.create_task(consume())
    await settle()
    assert len(subject.observers) == 1
    for i in range(10):  # the consumer gets no turn in between
        subject.on_next(i)
    assert not subject.observers  # the producer is cut off at the overflow

    with pytest.raises(BufferOverflowError):
        await asyncio.wait_for(task, WAIT)
    assert got == [0, 1, 2, 3, 4]


async def test_to_async_iterator_break_under_aclosing_disposes_the_subscription() -> None:
    subject: Subject[int] = Subject()

    async def consume() -> list[int]:
        got: list[int] = []
        async with contextlib.aclosing(to_async_iterator(subject, max_buffer=10)) as events:
            async for item in events:
                got.append(item)
                if item == 2:
                    break
        return got

    task = asyncio.create_task(consume())
    await settle()
    assert len(subject.observers) == 1
    for i in range(1, 5):
        subject.on_next(i)

    assert await asyncio.wait_for(task, WAIT) == [1, 2]
    assert not subject.observers


async def test_to_async_iterator_consumer_exception_disposes_the_source() -> None:
    disposed = threading.Event()

    def subscribe(
        observer: abc.ObserverBase[int], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        observer.on_next(1)
        observer.on_next(2)
        return Disposable(disposed.set)

    with pytest.raises(KeyError):
        async with contextlib.aclosing(
            to_async_iterator(reactivex.create(subscribe), max_buffer=10)
        ) as events:
            async for item in events:
                if item == 2:
                    raise KeyError("consumer failed")

    assert disposed.is_set()


async def test_to_async_iterator_items_from_another_thread() -> None:
    subject: Subject[int] = Subject()
    started = asyncio.Event()

    async def consume() -> list[int]:
        async with contextlib.aclosing(to_async_iterator(subject, max_buffer=1000)) as events:
            started.set()
            return [item async for item in events]

    def produce() -> None:
        for i in range(200):
            subject.on_next(i)
        subject.on_completed()

    task = asyncio.create_task(consume())
    await settle()
    assert started.is_set() and len(subject.observers) == 1
    thread = threading.Thread(target=produce)
    thread.start()
    try:
        got = await asyncio.wait_for(task, WAIT)
    finally:
        await asyncio.to_thread(thread.join, WAIT)

    assert got == list(range(200))


async def test_to_async_iterator_error_from_another_thread() -> None:
    subject: Subject[int] = Subject()
    boom = RuntimeError("worker failed")
    got: list[int] = []

    async def consume() -> None:
        async with contextlib.aclosing(to_async_iterator(subject, max_buffer=10)) as events:
            async for item in events:
                got.append(item)

    def produce() -> None:
        subject.on_next(1)
        subject.on_error(boom)

    task = asyncio.create_task(consume())
    await settle()
    thread = threading.Thread(target=produce)
    thread.start()
    try:
        with pytest.raises(RuntimeError) as info:
            await asyncio.wait_for(task, WAIT)
    finally:
        await asyncio.to_thread(thread.join, WAIT)

    assert info.value is boom
    assert got == [1]


@pytest.mark.parametrize("max_buffer", [0, -1])
async def test_to_async_iterator_rejects_a_buffer_below_one(max_buffer: int) -> None:
    subject: Subject[int] = Subject()
    async with contextlib.aclosing(to_async_iterator(subject, max_buffer=max_buffer)) as events:
        with pytest.raises(ValueError, match="max_buffer"):
            await anext(events)
    assert not subject.observers


async def test_bridges_round_trip() -> None:
    """from_async_iterable → to_async_iterator, closed early: the generator is finalized."""
    finalized = asyncio.Event()

    async def gen() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0)
                yield i
                i += 1
        finally:
            finalized.set()

    got: list[int] = []
    async with contextlib.aclosing(to_async_iterator(from_async_iterable(gen), max_buffer=100)) as events:
        async for item in events:
            got.append(item)
            if item == 3:
                break

    await asyncio.wait_for(finalized.wait(), WAIT)
    assert got == [0, 1, 2, 3]


async def test_to_async_iterator_marks_silences_with_none() -> None:
    """With idle_s, a silence of that length yields None (a heartbeat), never an item lost."""
    subject: Subject[int] = Subject()
    got: list[int | None] = []
    async with contextlib.aclosing(
        to_async_iterator(subject, max_buffer=10, idle_s=0.01)
    ) as items:
        first = asyncio.ensure_future(anext(items))
        await asyncio.sleep(0)  # subscribed, waiting
        got.append(await first)  # nothing came: the idle mark
        subject.on_next(1)
        subject.on_next(2)
        got.append(await anext(items))
        got.append(await anext(items))
        subject.on_completed()
        got += [item async for item in items]
    assert got[0] is None
    assert [item for item in got if item is not None] == [1, 2]
    assert got[1:3] == [1, 2]  # items waiting are yielded before any idle mark


async def test_silences_cost_one_lazy_timer_not_one_per_item(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady stream (items closer together than ``idle_s``) arms the idle timer about
    once per ``idle_s``, not once per item; a real silence after it is still marked, no
    sooner than ``idle_s`` after the last item."""
    loop = asyncio.get_running_loop()
    armed = 0
    call_at, call_later = loop.call_at, loop.call_later

    def counting_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, **kwargs)

    def counting_later(delay: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        armed += 1
        return call_later(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_at)
    monkeypatch.setattr(loop, "call_later", counting_later)
    subject: Subject[int] = Subject()
    idle_s, items = 0.2, 200
    got: list[int | None] = []
    async with contextlib.aclosing(
        to_async_iterator(subject, max_buffer=10, idle_s=idle_s)
    ) as stream:
        for i in range(items):  # one item per loop turn: the consumer waits for each
            pending = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)
            subject.on_next(i)
            got.append(await pending)
        steady = armed
        last = loop.time()
        got.append(await anext(stream))  # nothing more comes: the silence mark
        waited = loop.time() - last
    assert got == [*range(items), None]
    assert waited >= idle_s * 0.9
    assert steady <= 3, f"{steady} timers armed for {items} items"


async def test_replayed_history_does_not_count_against_the_buffer() -> None:
    log: ReplayLog[int] = ReplayLog()
    for i in range(20):
        log.on_next(i)
    log.on_completed()
    items = to_async_iterator(log, max_buffer=2, replayed=lambda: 20)
    async with contextlib.aclosing(items) as it:
        assert [item async for item in it] == list(range(20))
    strict = to_async_iterator(log, max_buffer=2)
    with pytest.raises(BufferOverflowError):
        async with contextlib.aclosing(strict) as it:
            [item async for item in it]


# -- to_async_batches: what is ready, in one step (issue 12) ------------------------------------
async def test_to_async_batches_yields_what_is_ready_together_in_order() -> None:
    subject: Subject[int] = Subject()
    async with contextlib.aclosing(to_async_batches(subject, max_buffer=100)) as batches:
        first = asyncio.ensure_future(anext(batches))
        await settle()
        subject.on_next(1)  # the consumer waits: one item, then the burst below
        assert await asyncio.wait_for(first, WAIT) == [1]
        for i in range(2, 6):
            subject.on_next(i)
        assert await anext(batches) == [2, 3, 4, 5]
        subject.on_next(6)
        subject.on_completed()
        assert [b async for b in batches] == [[6]]


async def test_to_async_batches_bounds_a_step_and_marks_silences() -> None:
    subject: Subject[int] = Subject()
    count = BATCH_MAX + 10
    async with contextlib.aclosing(
        to_async_batches(subject, max_buffer=10 * count, idle_s=0.01)
    ) as batches:
        first = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0)
        assert await asyncio.wait_for(first, WAIT) == []  # a silence
        for i in range(count):
            subject.on_next(i)
        subject.on_completed()
        steps = [b async for b in batches]
    assert [len(b) for b in steps] == [BATCH_MAX, 10]
    assert [i for b in steps for i in b] == list(range(count))


async def test_to_async_batches_overflow_gives_what_was_buffered_then_the_error() -> None:
    subject: Subject[int] = Subject()
    got: list[int] = []

    async def consume() -> None:
        async with contextlib.aclosing(to_async_batches(subject, max_buffer=5)) as batches:
            async for batch in batches:
                got.extend(batch)

    task = asyncio.create_task(consume())
    await settle()
    for i in range(10):
        subject.on_next(i)
    assert not subject.observers  # cut off at the overflow
    with pytest.raises(BufferOverflowError):
        await asyncio.wait_for(task, WAIT)
    assert got == [0, 1, 2, 3, 4]

"""Bridge: an Observable → an async iterator with a bounded buffer.

Rx has no backpressure, so the edge where a push source meets a pull consumer (an SSE
writer, a ``for await`` loop) needs a bound and a policy. The policy here: when the buffer
overflows, the subscription is disposed at once (the producer is never slowed) and the
consumer gets :class:`~core.errors.BufferOverflowError` after the items buffered so far.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar, cast, overload

from reactivex import Observable, abc

from core.errors import BufferOverflowError

_T = TypeVar("_T")

#: The most items one step of :func:`to_async_batches` yields (a replayed history comes in
#: several writes, not one of megabytes).
BATCH_MAX = 256


@overload
def to_async_iterator(
    source: Observable[_T], *, max_buffer: int, on_consumed: Callable[[], None] | None = None,
    idle_s: None = None, replayed: Callable[[], int] | None = None,
) -> AsyncGenerator[_T]: ...


@overload
def to_async_iterator(
    source: Observable[_T], *, max_buffer: int, on_consumed: Callable[[], None] | None = None,
    idle_s: float, replayed: Callable[[], int] | None = None,
) -> AsyncGenerator[_T | None]: ...


async def to_async_iterator(
    source: Observable[_T], *, max_buffer: int, on_consumed: Callable[[], None] | None = None,
    idle_s: float | None = None, replayed: Callable[[], int] | None = None,
    _batched: bool = False,
) -> AsyncGenerator[Any]:
    """Iterate an Observable with at most ``max_buffer`` items waiting.

    Subscribes on the first ``__anext__`` and disposes the subscription when the iterator
    is closed; use it under ``contextlib.aclosing`` so an exception in the consumer
    disposes the subscription (and so cancels the model call) instead of leaking it::

        async with aclosing(to_async_iterator(turn.stream, max_buffer=1024)) as events:
            async for event in events:
                ...

    Notifications may arrive from other threads; they are handed to the loop safely.
    ``on_consumed`` runs each time the consumer is done with an item (comes back for the
    next) while the source is still going: the demand signal of a source that honours it
    (see :func:`sinks.fair_iter.iterate_with_demand`). With ``idle_s``, ``None`` is
    yielded whenever nothing arrived for that long (an SSE writer's heartbeat), at the cost
    of one timer per wait rather than a task per item as :func:`heartbeat` needs.
    ``replayed`` tells, at subscription time, how many items a replaying source sends at
    once; they do not count against ``max_buffer``, which bounds the consumer's lag only.

    Raises:
        BufferOverflowError: the consumer fell more than ``max_buffer`` items behind.
        Exception: whatever the source signalled with ``on_error``.
    """
    if max_buffer < 1:
        raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    buffer: collections.deque[_T] = collections.deque()
    # The consumer waits on one bare future, made when it has nothing to do: an item that
    # arrives while it is busy costs no wakeup, and none costs an asyncio.Event's machinery.
    waiter: asyncio.Future[None] | None = None
    finished = False
    failure: BaseException | None = None
    subscription: abc.DisposableBase | None = None
    # Silences (``idle_s``): one timer re-armed lazily, at most once per ``idle_s``, rather
    # than a timer made and cancelled for every item.
    timer: asyncio.TimerHandle | None = None
    wait_started = 0.0
    silent = False

    def wake() -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_timer() -> None:
        nonlocal timer, silent
        timer = None
        if waiter is None or waiter.done():
            return  # the consumer is busy: its next wait arms the timer again
        assert idle_s is not None
        due = wait_started + idle_s
        if loop.time() >= due:
            silent = True
            waiter.set_result(None)
        else:  # armed by an earlier wait: this one is due later
            timer = loop.call_at(due, on_timer)

    def in_loop(fn: object) -> None:
        assert callable(fn)
        if threading.get_ident() == loop_thread:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def push(item: _T) -> None:
        nonlocal failure
        if failure is not None or finished:
            return
        if len(buffer) >= limit:
            failure = BufferOverflowError(max_buffer=max_buffer)
            if subscription is not None:
                subscription.dispose()
        else:
            buffer.append(item)
        wake()

    def fail(exc: Exception) -> None:
        nonlocal failure
        if failure is None:
            failure = exc
        wake()

    def complete() -> None:
        nonlocal finished
        finished = True
        wake()

    limit = max_buffer + (replayed() if replayed is not None else 0)
    subscription = source.subscribe(
        on_next=lambda item: in_loop(lambda: push(item)),
        on_error=lambda exc: in_loop(lambda: fail(exc)),
        on_completed=lambda: in_loop(complete),
    )
    if failure is not None:  # overflowed during a synchronous subscribe
        subscription.dispose()
    try:
        while True:
            while _batched and buffer:  # at most BATCH_MAX at a time: a bounded write
                yield [buffer.popleft() for _ in range(min(len(buffer), BATCH_MAX))]
            while buffer:
                yield buffer.popleft()
                if on_consumed is not None and failure is None and not finished:
                    on_consumed()
            if failure is not None:
                raise failure
            if finished:
                return
            waiter = loop.create_future()
            if idle_s is not None:
                wait_started = loop.time()
                if timer is None:
                    timer = loop.call_at(wait_started + idle_s, on_timer)
            try:
                await waiter
            finally:
                waiter = None
            if silent:
                silent = False
                if not buffer and failure is None and not finished:
                    yield [] if _batched else None
    finally:
        if timer is not None:
            timer.cancel()
        subscription.dispose()


def to_async_batches(
    source: Observable[_T], *, max_buffer: int, idle_s: float | None = None,
    replayed: Callable[[], int] | None = None,
) -> AsyncGenerator[list[_T]]:
    """:func:`to_async_iterator`, but each step yields every item waiting, in order (an
    empty list for each silence of ``idle_s``): a writer then sends the frames that are
    ready in one socket write instead of one each (a turn's first and last events come
    in bursts), at most :data:`BATCH_MAX` at a time. The same bound, overflow and disposal
    rules apply, per item."""
    bridge: Any = to_async_iterator  # the batched mode is this module's own
    return cast("AsyncGenerator[list[_T]]", bridge(
        source, max_buffer=max_buffer, idle_s=idle_s, replayed=replayed, _batched=True))

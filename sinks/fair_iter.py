"""Bridge: a demand-driven Observable → an async iterator that asks for one event at a time.

:func:`sinks.async_iter.to_async_iterator` bounds a push source by disconnecting a consumer
that falls behind. A source that honours demand (:func:`operators.merge_fair`) can do
better: it holds its events back until the consumer asks, and chooses *which* to release.
This bridge is that consumer's voice: it requests ``prefetch`` events up front and one more
each time the ``async for`` body comes back for the next event, so the source's pace is
the consumer's (an SSE writer awaiting ``drain``, a model call, a slow client).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

from reactivex import Observable
from reactivex.disposable import SingleAssignmentDisposable
from reactivex.subject import Subject

from pipeline.errors import BufferOverflowError

_T = TypeVar("_T")


async def iterate_with_demand(
    build: Callable[[Observable[int]], Observable[_T]], *, prefetch: int = 1
) -> AsyncGenerator[_T]:
    """Iterate the Observable that ``build(demand)`` returns, signalling demand as it goes.

    ``build`` receives the demand stream and returns the source that honours it, typically
    ``lambda demand: merge_fair(*panel, demand=demand, max_buffer_per_key=...)``, possibly
    followed by one-to-one operators (``number_events``, ``map``). Filter in the loop body,
    not in ``build``: an event filtered out after release uses up demand and nothing asks
    again.

    Subscribes on the first ``__anext__``; requests ``prefetch`` events, then one for each
    event the loop body has finished with (when it asks for the next). Use it under
    ``contextlib.aclosing`` so leaving the loop early disposes the subscription (and so the
    panel's model calls)::

        build = lambda demand: merge_fair(alice, bob, carol, demand=demand,
                                          max_buffer_per_key=1024)
        async with aclosing(iterate_with_demand(build)) as events:
            async for event in events:
                await response.write(event_frame(event))

    Notifications may arrive from other threads; they are handed to the loop safely.

    Args:
        build: Makes the demand-honouring source from the demand stream.
        prefetch: Events requested ahead of the consumer (at least 1). 1 keeps the
            source's choice (the round-robin) as late as possible.

    Raises:
        BufferOverflowError: the source ignored demand and sent more than ``prefetch``
            events ahead (it is disposed; the events received so far come first).
        Exception: whatever the source signalled with ``on_error``.
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    buffer: collections.deque[_T] = collections.deque()
    wakeup = asyncio.Event()
    finished = False
    failure: BaseException | None = None
    demand: Subject[int] = Subject()
    subscription = SingleAssignmentDisposable()  # assigned after subscribe; may overflow before

    def in_loop(fn: Callable[[], None]) -> None:
        if threading.get_ident() == loop_thread:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def push(item: _T) -> None:
        nonlocal failure
        if failure is not None or finished:
            return
        if len(buffer) >= prefetch:  # a source that does not honour demand
            failure = BufferOverflowError(max_buffer=prefetch)
            subscription.dispose()
        else:
            buffer.append(item)
        wakeup.set()

    def fail(exc: Exception) -> None:
        nonlocal failure
        if failure is None:
            failure = exc
        wakeup.set()

    def complete() -> None:
        nonlocal finished
        finished = True
        wakeup.set()

    subscription.disposable = build(demand).subscribe(
        on_next=lambda item: in_loop(lambda: push(item)),
        on_error=lambda exc: in_loop(lambda: fail(exc)),
        on_completed=lambda: in_loop(complete),
    )
    try:
        demand.on_next(prefetch)
        while True:
            while buffer:
                yield buffer.popleft()
                # The loop body is done with that event: ask for one more. A source that
                # holds events releases the next at once, into ``buffer``.
                if failure is None and not finished:
                    demand.on_next(1)
            if failure is not None:
                raise failure
            if finished:
                return
            wakeup.clear()
            await wakeup.wait()
    finally:
        subscription.dispose()

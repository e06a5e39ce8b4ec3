"""Bridge: an Observable → an async iterator with a bounded buffer.

Rx has no backpressure, so the edge where a push source meets a pull consumer (an SSE
writer, a ``for await`` loop) needs a bound and a policy. The policy here: when the buffer
overflows, the subscription is disposed at once (the producer is never slowed) and the
consumer gets :class:`~pipeline.errors.BufferOverflowError` after the items buffered so far.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

from reactivex import Observable, abc

from pipeline.errors import BufferOverflowError

_T = TypeVar("_T")


async def to_async_iterator(
    source: Observable[_T], *, max_buffer: int, on_consumed: Callable[[], None] | None = None
) -> AsyncGenerator[_T]:
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
    (see :func:`sinks.fair_iter.iterate_with_demand`).

    Raises:
        BufferOverflowError: the consumer fell more than ``max_buffer`` items behind.
        Exception: whatever the source signalled with ``on_error``.
    """
    if max_buffer < 1:
        raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    buffer: collections.deque[_T] = collections.deque()
    wakeup = asyncio.Event()
    finished = False
    failure: BaseException | None = None
    subscription: abc.DisposableBase | None = None

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
        if len(buffer) >= max_buffer:
            failure = BufferOverflowError(max_buffer=max_buffer)
            if subscription is not None:
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

    subscription = source.subscribe(
        on_next=lambda item: in_loop(lambda: push(item)),
        on_error=lambda exc: in_loop(lambda: fail(exc)),
        on_completed=lambda: in_loop(complete),
    )
    if failure is not None:  # overflowed during a synchronous subscribe
        subscription.dispose()
    try:
        while True:
            while buffer:
                yield buffer.popleft()
                if on_consumed is not None and failure is None and not finished:
                    on_consumed()
            if failure is not None:
                raise failure
            if finished:
                return
            wakeup.clear()
            await wakeup.wait()
    finally:
        subscription.dispose()


async def heartbeat(source: AsyncIterator[_T], *, period_s: float) -> AsyncGenerator[_T | None]:
    """Yield ``source``'s items, and ``None`` whenever it has been idle for ``period_s``.

    The pending ``__anext__`` is kept across idle periods (never cancelled by a timeout),
    so no item is lost; closing this iterator cancels it, which closes ``source``'s wait.
    SSE writers turn each ``None`` into a comment line that keeps proxies from cutting an
    idle stream.
    """
    pending: asyncio.Future[_T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=period_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                if pending.done():
                    pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending

"""Bridge: an async-iterator *factory* → a cold Observable.

reactivex has no async-iterator source (RxPY issue 422), so this module is ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import reactivex
from reactivex import Observable, abc
from reactivex.disposable import Disposable

_T = TypeVar("_T")


def from_async_iterable(factory: Callable[[], AsyncIterable[_T]]) -> Observable[_T]:
    """A cold Observable that pumps a fresh async iterator for each subscription.

    ::

        factory():   a---b---c---|
        subscribe:   ----a---b---c---|
        dispose:     ----a---X        (pump cancelled, iterator aclose()d)

    Each subscription calls ``factory()`` inside a new task on the running loop (so pass a
    factory, never one shared generator: a generator can be iterated once). Items are
    emitted on the event loop thread. Disposing cancels the task and ``aclose()``s the
    iterator, so an upstream HTTP stream (e.g. an ``openai`` streaming response) is closed
    and the server on the other side sees the disconnect.

    Must be subscribed from within a running event loop.

    Example:
        >>> async def tokens():
        ...     yield "a"
        ...     yield "b"
        >>> from_async_iterable(tokens).pipe(ops.map(str.upper))  # doctest: +SKIP
    """

    def subscribe(
        observer: abc.ObserverBase[_T], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        loop = asyncio.get_running_loop()
        disposed = False

        async def pump() -> None:
            iterator: AsyncIterator[_T] | None = None
            try:
                iterator = aiter(factory())
                async for item in iterator:
                    if disposed:
                        return
                    observer.on_next(item)
                    if disposed:  # disposed downstream during on_next (take, early exit)
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # includes a failing factory: pass it on, never lose it
                if not disposed:
                    observer.on_error(exc)
                return
            finally:
                aclose: Callable[[], Any] | None = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not disposed:
                observer.on_completed()

        task = loop.create_task(pump())

        def dispose() -> None:
            nonlocal disposed
            disposed = True
            # Auto-detach disposes from *inside* on_error/on_completed, and take() or an
            # early-exiting consumer from inside on_next, i.e. inside the pump itself:
            # cancelling ourselves there would turn a real error into a silent
            # CancelledError (and could cut the iterator's cleanup short). The pump sees
            # the flag right after that call returns and closes the iterator itself.
            try:
                current = asyncio.current_task()
            except RuntimeError:  # disposed from a thread without a running loop
                current = None
            if task is not current and not task.done():
                if current is None and not _in_loop_thread(loop):
                    loop.call_soon_threadsafe(task.cancel)
                else:
                    task.cancel()

        return Disposable(dispose)

    return reactivex.create(subscribe)


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False

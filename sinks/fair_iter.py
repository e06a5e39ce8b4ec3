"""Bridge: a demand-driven Observable → an async iterator that asks for one event at a time.

:func:`sinks.async_iter.to_async_iterator` bounds a push source by disconnecting a consumer
that falls behind. A source that honours demand (:func:`operators.merge_fair`) can do
better: it holds its events back until the consumer asks, and chooses *which* to release.
This bridge is that consumer's voice: it requests ``prefetch`` events up front and one more
each time the ``async for`` body comes back for the next event, so the source's pace is
the consumer's (an SSE writer awaiting ``drain``, a model call, a slow client).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

import reactivex
from reactivex import Observable
from reactivex import operators as ops
from reactivex.subject import Subject

from sinks.async_iter import to_async_iterator

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
    demand: Subject[int] = Subject()
    # The first request goes out as the source subscribes to demand; one more each time the
    # loop body is done with an event. A source that ignores demand overflows the buffer.
    source = reactivex.defer(lambda _: build(demand.pipe(ops.start_with(prefetch))))
    async with contextlib.aclosing(to_async_iterator(
        source, max_buffer=prefetch, on_consumed=lambda: demand.on_next(1)
    )) as items:
        async for item in items:
            yield item

"""Fair merging of panel streams under a slow consumer (``merge`` + round-robin release)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Literal, TypeVar

import reactivex
from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, Disposable, SingleAssignmentDisposable

from core.errors import BufferOverflowError

_T = TypeVar("_T")

Overflow = Literal["error", "drop_oldest", "drop_newest"]


def merge_fair(
    *sources: Observable[_T],
    demand: Observable[int],
    max_buffer_per_key: int,
    key: Callable[[_T], Hashable] | None = None,
    overflow: Overflow = "error",
) -> Observable[_T]:
    """Merge sources, releasing events only on demand, round-robin across keys when behind.

    Rx has no backpressure, so the consumer's pace is explicit: ``demand`` emits ``n`` each
    time the consumer can take ``n`` more events (reactive-streams ``request(n)``). While
    demand is outstanding, an arriving event is emitted at once, so a consumer that keeps up
    sees exactly the arrival order of ``reactivex.merge``, with no added latency. While
    there is none, events wait in one bounded FIFO queue per key (the source's position, or
    ``key(event)``, e.g. the panelist's ``stream_id``), and each unit of demand releases the
    oldest event of the next key in round-robin order: a fast or verbose panelist gets one
    turn per round like everyone else and cannot starve the others. Order within a key is
    always kept.

    ::

        alice:   -a-a-a-a-a-a-a-a-a-a|                       (ten times more verbose)
        bob:     --b---------------b-|
        demand:  1---1---1---1---1---1---1---1---1---1---1---1  (4 ticks per event)
        fair:    -a--b---a---a---a---a---b---a---a---a---a---(a,|)
        FIFO:    -a--b---a---a---a---a---a---a---a---a---b---(a,|)  (merge, same consumer)

    Bob's second event waits one turn, not behind all of alice's backlog.

    Emitting ``n`` on ``demand`` from inside ``on_next`` (a consumer that is done at once)
    is fine and releases the next event before returning. Every operator between this one
    and whatever signals demand must be one-to-one (``map``, ``number_events``): a
    ``filter`` in between would swallow released events and the demand they used, and the
    consumer would wait forever; filter before this operator or in the consumer. Put it
    before ``number_events``: fair release reorders events across keys, and ``seq`` must
    follow the order clients see.

    Bounds and overflow (``max_buffer_per_key`` events per queue, so memory is at most
    that times the number of keys waiting):

    - ``"error"`` (default, nothing is lost silently): the sources are disposed at once,
      the events already queued are still released on demand, then
      :class:`~core.errors.BufferOverflowError`.
    - ``"drop_oldest"``: the key's oldest queued event is discarded (latest wins).
    - ``"drop_newest"``: the arriving event is discarded.

    Dropping breaks the wire rules of agent events (a lost ``stream_start`` or ``text``
    delta), so use the drop policies only for streams where a lost event is harmless.

    Termination: completes once every source has completed and every queue is drained
    (completion needs no demand). An error from a source (or from ``key``) disposes the
    other sources at once, like ``merge``, but the events queued before it are still
    released on demand before the error: the consumer receives the same events as from
    ``merge``, in a fairer order. An error on ``demand``, or a demand ``n < 1``, is the
    consumer's failure: queued events are dropped and the error is passed on at once.
    ``demand`` completing changes nothing. Disposing disposes every source and ``demand``.

    Args:
        *sources: The panel streams, subscribed at once (after ``demand``).
        demand: Emits how many more events the consumer can take; nothing is emitted
            before the first demand. :func:`sinks.fair_iter.iterate_with_demand` drives it
            from an ``async for`` loop.
        max_buffer_per_key: The most events one key's queue may hold (at least 1).
        key: Groups events for the round-robin; default: one group per source.
        overflow: What to do when a key's queue is full, see above.

    Example:
        >>> async with aclosing(iterate_with_demand(lambda demand: merge_fair(
        ...         alice, bob, carol, demand=demand, max_buffer_per_key=1024))) as events:
        ...     async for event in events:
        ...         await response.write(event_frame(event))  # doctest: +SKIP
    """
    if max_buffer_per_key < 1:
        raise ValueError(f"max_buffer_per_key must be >= 1, got {max_buffer_per_key}")
    if overflow not in ("error", "drop_oldest", "drop_newest"):
        raise ValueError(f"overflow must be 'error', 'drop_oldest' or 'drop_newest', got {overflow!r}")

    def subscribe(
        observer: abc.ObserverBase[_T], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        # All state is guarded by ``lock``; events are emitted outside it, by whichever
        # caller holds the ``emitting`` role (a drain loop), so emissions are serialized and
        # a re-entrant demand from inside on_next just adds to the loop's work.
        lock = threading.RLock()
        queues: dict[Hashable, collections.deque[_T]] = {}
        ring: collections.deque[Hashable] = collections.deque()  # keys with queued events
        requested = 0
        active = len(sources)
        failure: Exception | None = None
        finished = False  # terminal sent or disposed
        emitting = False
        source_subscriptions = CompositeDisposable()
        demand_subscription = SingleAssignmentDisposable()

        def fail(exc: Exception, *, drop_queued: bool) -> None:
            """Record the first failure (caller holds the lock; the next drain stops the sources)."""
            nonlocal failure
            if failure is None:
                failure = exc
            if drop_queued:
                queues.clear()
                ring.clear()

        def drain() -> None:
            nonlocal emitting, requested, finished
            with lock:
                if emitting:
                    return  # the running loop picks up the new work
                emitting = True
            error: Exception | None = None
            try:
                while True:
                    with lock:
                        if finished:
                            emitting = False
                            return
                        stopping = failure is not None or active == 0
                        released = requested > 0 and bool(ring)
                        terminating = False
                        if released:
                            k = ring.popleft()
                            queue = queues[k]
                            item = queue.popleft()
                            if queue:
                                ring.append(k)  # back of the line: one event per key per round
                            else:
                                del queues[k]
                            requested -= 1
                        elif stopping and not ring:
                            finished = terminating = True
                            emitting = False
                            error = failure
                        else:
                            emitting = False
                    if stopping:
                        source_subscriptions.dispose()  # idempotent: a failure stops every source
                    if released:
                        observer.on_next(item)
                    elif terminating:
                        break
                    else:
                        return
            except BaseException:
                with lock:
                    emitting = False
                raise
            demand_subscription.dispose()
            if error is not None:
                observer.on_error(error)
            else:
                observer.on_completed()

        def on_demand(n: int) -> None:
            nonlocal requested
            with lock:
                if finished:
                    return
                if n < 1:
                    fail(ValueError(f"demand must be >= 1, got {n}"), drop_queued=True)
                else:
                    requested += n
            drain()

        def on_demand_error(exc: Exception) -> None:
            with lock:
                if finished:
                    return
                fail(exc, drop_queued=True)
            drain()

        def make_on_next(index: int) -> Callable[[_T], None]:
            def on_next(item: _T) -> None:
                with lock:
                    if finished or failure is not None:
                        return
                    try:
                        k: Hashable = index if key is None else key(item)
                        hash(k)  # an unhashable key is the callback's failure too
                    except Exception as exc:
                        fail(exc, drop_queued=False)
                    else:
                        queue = queues.get(k)
                        if queue is None:
                            queue = queues[k] = collections.deque()
                            ring.append(k)
                        if len(queue) < max_buffer_per_key:
                            queue.append(item)
                        elif overflow == "drop_oldest":
                            queue.popleft()
                            queue.append(item)
                        elif overflow == "error":
                            fail(BufferOverflowError(max_buffer=max_buffer_per_key), drop_queued=False)
                        # drop_newest: the arriving event is discarded
                drain()

            return on_next

        def on_error(exc: Exception) -> None:
            with lock:
                if finished:
                    return
                fail(exc, drop_queued=False)
            drain()

        def on_completed() -> None:
            nonlocal active
            with lock:
                if finished:
                    return
                active -= 1
            drain()

        def dispose() -> None:
            nonlocal finished
            with lock:
                finished = True
                queues.clear()
                ring.clear()
            source_subscriptions.dispose()
            demand_subscription.dispose()

        # Demand first, so a consumer that asks up front (``start_with``) is counted before
        # a synchronous source emits.
        demand_subscription.disposable = demand.subscribe(
            on_demand, on_demand_error, scheduler=scheduler
        )
        for index, source in enumerate(sources):
            if finished or failure is not None:
                break
            inner = SingleAssignmentDisposable()
            source_subscriptions.add(inner)
            inner.disposable = source.subscribe(
                make_on_next(index), on_error, on_completed, scheduler=scheduler
            )
        drain()  # no sources at all: complete at once
        return Disposable(dispose)

    return reactivex.create(subscribe)

"""The turn envelope: ``request_received`` first, ``done`` last, every stream closed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable, abc
from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable, SingleAssignmentDisposable

from core.events import (
    Done,
    DoneReason,
    ErrorEvent,
    Event,
    RequestReceived,
    StreamEnd,
    StreamStart,
    StreamStatus,
)


def turn_envelope(
    *,
    agent: str,
    conversation_id: str,
    cancel: Observable[Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Observable[Event]], Observable[Event]]:
    """Wrap a turn's body so the wire rules hold whatever the body does.

    ::

        body:      ---s--t--e|                     (s = stream_start, e = stream_end)
        envelope:  R--s--t--e-D|                   (R = request_received, D = done ok)

        body:      ---s--t--#                      (# = error, e.g. the provider failed)
        envelope:  R--s--t--(E e! D)|              (E = error, e! = stream_end status=error)

        cancel:    ------c
        body:      ---s--t--t--                     (disposed at c: the model call stops)
        envelope:  R--s--t-(e~ D~)|                (e~ = stream_end cancelled, D~ = done)

    Guarantees: ``request_received`` is first; exactly one ``done`` is last; every
    ``stream_start`` gets exactly one ``stream_end`` (innermost closed first); a body
    error becomes a ``turn_error`` event (``retryable`` taken from the exception when it has
    one) instead of an ``on_error``, so sinks always see a complete turn.

    Args:
        agent: The agent named in ``request_received``.
        conversation_id: The conversation named in ``request_received``.
        cancel: Emitting anything on it cancels the turn (the body is disposed).
        clock: Monotonic seconds, for ``done.duration_ms`` (virtual time in tests).

    Example:
        >>> sequence(router, memory, response).pipe(
        ...     turn_envelope(agent="index", conversation_id=cid, cancel=cancel_subject))
        ... # doctest: +SKIP
    """

    def _envelope(source: Observable[Event]) -> Observable[Event]:
        def subscribe(
            observer: abc.ObserverBase[Event], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            started = clock()
            open_streams: dict[int, None] = {}  # insertion-ordered: last is innermost
            errors = 0
            finished = False
            body = SingleAssignmentDisposable()

            def close_streams(status: StreamStatus) -> None:
                for stream_id in reversed(list(open_streams)):
                    observer.on_next(StreamEnd(stream_id=stream_id, status=status))
                open_streams.clear()

            def finish(reason: DoneReason) -> None:
                nonlocal finished
                finished = True
                duration_ms = round((clock() - started) * 1000)  # whole ms
                ok = reason == "completed" and errors == 0
                if reason == "completed" and errors:
                    reason = "error"
                observer.on_next(Done(ok=ok, duration_ms=duration_ms, reason=reason))
                observer.on_completed()

            def report(message: str, *, retryable: bool) -> None:
                nonlocal errors
                errors += 1
                innermost = next(reversed(open_streams), None)
                observer.on_next(
                    ErrorEvent(stream_id=innermost, error=message, retryable=retryable)
                )

            def on_next(event: Event) -> None:
                nonlocal errors
                if finished:
                    return
                match event:
                    case StreamStart(stream_id=stream_id):
                        open_streams[stream_id] = None
                    case StreamEnd(stream_id=stream_id):
                        open_streams.pop(stream_id, None)
                    case ErrorEvent():
                        errors += 1
                    case _:
                        pass
                observer.on_next(event)

            def on_error(exc: Exception) -> None:
                if finished:
                    return
                report(str(exc) or type(exc).__name__,
                       retryable=bool(getattr(exc, "retryable", False)))
                close_streams("error")
                finish("error")

            def on_completed() -> None:
                if finished:
                    return
                if open_streams:
                    report(f"streams {sorted(open_streams)} ended without stream_end",
                           retryable=False)
                    close_streams("error")
                finish("completed")

            def on_cancel(_: Any) -> None:
                if finished:
                    return
                body.dispose()
                close_streams("cancelled")
                finish("cancelled")

            observer.on_next(RequestReceived(agent=agent, conversation_id=conversation_id))
            cancelling = (
                # A failing cancel signal still cancels: the turn must close either way.
                cancel.pipe(ops.take(1)).subscribe(
                    on_next=on_cancel, on_error=on_cancel, scheduler=scheduler
                )
                if cancel is not None
                else SingleAssignmentDisposable()
            )
            if not finished:
                body.disposable = source.subscribe(
                    on_next, on_error, on_completed, scheduler=scheduler
                )
            return CompositeDisposable(body, cancelling)

        return reactivex.create(subscribe)

    return _envelope

"""Durable done: a turn's ``done`` waits until a barrier says its events are stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SerialDisposable

from core.events import Done, ErrorEvent, Event


def durable_done(
    barrier: Callable[[], Observable[Any]],
) -> Callable[[Observable[Event]], Observable[Event]]:
    """Hold ``done`` until ``barrier()`` completes, so ``ok`` means "stored".

    ::

        source:    -a-b-D|
        barrier:         --|            (subscribed when D arrives)
        result:    -a-b---D|            (D as it came)

        barrier:         --#
        result:    -a-b---(E D!)|       (E = error "not durable", D! = done ok=false)

    Every event before ``done`` passes at once (the store's recorder has queued them when
    ``done`` arrives); ``done`` is held and the barrier subscribed, e.g. a flush of the
    event store. When the barrier completes (or emits), ``done`` goes on unchanged. When it
    fails (or times out, as the barrier decides), an ``error`` event (``retryable``) with
    the barrier's message comes first and ``done`` says ``ok: false`` (``reason: "error"``
    for a turn that had completed): no client is told a turn succeeded while its events
    may be lost. The source's completion waits for ``done``.

    Put it between the turn envelope and the numbering, so the added error is numbered.

    Args:
        barrier: Called once per ``done``; its first item or completion releases ``done``,
            its error turns it into a failure.

    Example:
        >>> body.pipe(turn_envelope(...), durable_done(lambda: flushed(request_id)),
        ...           number_events(request_id))  # doctest: +SKIP
    """

    def _durable(source: Observable[Event]) -> Observable[Event]:
        def subscribe(
            observer: abc.ObserverBase[Event], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            held = SerialDisposable()
            state: dict[str, Any] = {"done": None, "completed": False, "released": False}

            def release(error: Exception | None) -> None:
                if state["released"]:
                    return
                state["released"] = True
                done: Done = state["done"]
                if error is not None:
                    observer.on_next(ErrorEvent(
                        error=f"the turn's events are not durable: {error}", retryable=True))
                    done = done.model_copy(update={
                        "ok": False, "reason": "error" if done.reason == "completed" else done.reason,
                    })
                observer.on_next(done)
                if state["completed"]:
                    observer.on_completed()

            def on_next(event: Event) -> None:
                if not isinstance(event, Done) or state["done"] is not None:
                    observer.on_next(event)
                    return
                state["done"] = event
                try:
                    waiting = barrier()
                except Exception as exc:  # a failing callback is a failed barrier
                    release(exc)
                    return
                held.disposable = waiting.subscribe(
                    on_next=lambda _: release(None), on_error=release,
                    on_completed=lambda: release(None), scheduler=scheduler,
                )

            def on_completed() -> None:
                state["completed"] = True
                if state["done"] is None or state["released"]:
                    observer.on_completed()

            body = source.subscribe(on_next, observer.on_error, on_completed, scheduler=scheduler)
            return CompositeDisposable(body, held)

        return reactivex.create(subscribe)

    return _durable

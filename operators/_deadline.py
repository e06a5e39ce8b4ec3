"""Turn deadline: a body that runs too long ends with an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import reactivex
from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SingleAssignmentDisposable

from core.errors import TurnDeadlineError

_T = TypeVar("_T")


def turn_deadline(
    seconds: float, *, scheduler: abc.SchedulerBase,
) -> Callable[[Observable[_T]], Observable[_T]]:
    """Fail with :class:`~core.errors.TurnDeadlineError` when the source has not ended
    ``seconds`` after its subscription; the source is disposed first (the model call
    closes).

    ::

        source:        -a-b-c-d-e-f-...      (never stops)
        deadline(5):   -a-b-#                (# = TurnDeadlineError at 5; source disposed)

        source:        -a-b|
        deadline(5):   -a-b|                 (ended in time: the timer is cancelled)

    Unlike ``ops.timeout`` (the gap between items, which a model streaming slowly for
    ever never exceeds) this bounds the whole body. Put it before the turn envelope, which
    turns the error into an ``error`` event, closes the open streams and sends ``done``.

    Args:
        seconds: The longest the source may run.
        scheduler: Where the timer runs (``AsyncIOScheduler(loop)``; a ``TestScheduler``).

    Example:
        >>> body.pipe(turn_deadline(600, scheduler=AsyncIOScheduler(loop)),
        ...           turn_envelope(...))  # doctest: +SKIP
    """

    def _deadline(source: Observable[_T]) -> Observable[_T]:
        def subscribe(
            observer: abc.ObserverBase[_T], _scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            body = SingleAssignmentDisposable()
            ended = False

            def expire(_: abc.SchedulerBase, __: Any = None) -> None:
                nonlocal ended
                if ended:
                    return
                ended = True
                body.dispose()
                observer.on_error(TurnDeadlineError(seconds=seconds))

            def on_error(exc: Exception) -> None:
                nonlocal ended
                if not ended:
                    ended = True
                    timer.dispose()
                    observer.on_error(exc)

            def on_completed() -> None:
                nonlocal ended
                if not ended:
                    ended = True
                    timer.dispose()
                    observer.on_completed()

            timer = scheduler.schedule_relative(seconds, expire)

            def on_next(value: _T) -> None:
                if not ended:
                    observer.on_next(value)

            body.disposable = source.subscribe(on_next, on_error, on_completed,
                                               scheduler=_scheduler)
            return CompositeDisposable(body, timer)

        return reactivex.create(subscribe)

    return _deadline

"""Numbering: one ``seq`` per request (``scan``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from reactivex import Observable
from reactivex import operators as ops

from core.events import EventBase

_E = TypeVar("_E", bound=EventBase)


def number_events(request_id: str) -> Callable[[Observable[_E]], Observable[_E]]:
    """Stamp ``request_id`` and a strictly increasing ``seq`` (1, 2, …) on each event.

    ::

        source:              -a-b-c|
        number_events("r"):  -1-2-3|   (a.seq=1, b.seq=2, c.seq=3; request_id="r")

    The one place seq numbers are assigned; put it after the turn envelope and before any
    sharing, so every sink sees the same numbers. The scan's state is the previous event,
    kept per subscription. Events are stamped in place: numbering takes ownership of the
    events a (cold) harness has just created, which avoids a copy per token.

    Example:
        >>> body.pipe(turn_envelope(...), number_events(request_id))  # doctest: +SKIP
    """

    def stamp(previous: _E | None, event: _E) -> _E | None:
        event.seq = 1 if previous is None else previous.seq + 1
        event.request_id = request_id
        return event

    def _number(source: Observable[_E]) -> Observable[_E]:
        seed: _E | None = None
        numbered: Observable[_E] = source.pipe(ops.scan(stamp, seed))  # type: ignore[arg-type]
        return numbered

    return _number

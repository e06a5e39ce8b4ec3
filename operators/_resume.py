"""Resuming: only the events after a client's cursor (``filter`` on seq)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from reactivex import Observable
from reactivex import operators as ops

from core.events import EventBase

_E = TypeVar("_E", bound=EventBase)


def resume_after(seq: int) -> Callable[[Observable[_E]], Observable[_E]]:
    """Pass only events with ``seq > seq``: what a client with that cursor has not seen.

    ::

        source:           -1-2-3-4-5|
        resume_after(3):  -------4-5|

    ``resume_after(0)`` passes everything. With ``since_seq=N`` or ``Last-Event-ID: N``
    a reconnecting client gets exactly the frames it missed; seq numbers only increase,
    so nothing is sent twice.

    Example:
        >>> turn.stream.pipe(resume_after(last_event_id), visible(trace=False))
        ... # doctest: +SKIP
    """

    def _resume(source: Observable[_E]) -> Observable[_E]:
        if seq <= 0:
            return source
        def unseen(event: _E) -> bool:
            return event.seq > seq

        return source.pipe(ops.filter(unseen))

    return _resume

"""Trace visibility (``filter``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from reactivex import Observable
from reactivex import operators as ops

from core.events import TRACE_TYPES, EventBase

_E = TypeVar("_E", bound=EventBase)


def visible(*, trace: bool) -> Callable[[Observable[_E]], Observable[_E]]:
    """Hide trace-only events (``llm_call``, ``route``, ``memory``) unless ``trace``.

    ::

        source:             -R-r-s-t-d|     (r = route, a trace event)
        visible(trace=False): -R---s-t-d|
        visible(trace=True):  -R-r-s-t-d|

    Seq numbers are assigned before this filter, so a client without trace sees gaps.

    Example:
        >>> turn.stream.pipe(visible(trace=False))  # doctest: +SKIP
    """

    def _visible(source: Observable[_E]) -> Observable[_E]:
        if trace:
            return source
        return source.pipe(ops.filter(lambda event: getattr(event, "type", "") not in TRACE_TYPES))

    return _visible

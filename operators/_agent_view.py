"""Per-subscriber agent visibility (``filter`` with per-subscription state)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

import reactivex
from reactivex import Observable, abc
from reactivex import operators as ops

from core.events import EventBase, StreamStart, stream_id_of

_E = TypeVar("_E", bound=EventBase)


def agent_view(
    *, max_depth: int | None = None, agents: Collection[str] | None = None,
) -> Callable[[Observable[_E]], Observable[_E]]:
    """Only the streams a subscriber asked for: at most ``max_depth`` deep and/or of the
    named ``agents``; events of no stream (``request_received``, ``route``, ``done``, a
    turn-level ``error``) always pass.

    ::

        source:                 -R-s-t-S-T-E-e-d|   (S…E a sub-agent's stream at depth 1)
        agent_view(max_depth=0): -R-s-t-------e-d|
        agent_view(agents={"researcher"}): only the researcher's stream's events, plus R and d

    A stream is known by its ``stream_start``; events of a stream this subscriber never
    saw start (it joined after a cursor) pass. State is per subscription.

    Example:
        >>> turn.stream.pipe(agent_view(max_depth=0))  # doctest: +SKIP
    """
    def _view(source: Observable[_E]) -> Observable[_E]:
        if max_depth is None and agents is None:
            return source

        def build(_: abc.SchedulerBase | None) -> Observable[_E]:
            return source.pipe(ops.filter(agent_filter(max_depth=max_depth, agents=agents)))

        return reactivex.defer(build)

    return _view


def agent_filter(
    *, max_depth: int | None = None, agents: Collection[str] | None = None,
) -> Callable[[EventBase], bool]:
    """The predicate :func:`agent_view` filters with (stateful: one per subscriber), for
    consumers that are not observables (e.g. a replay read from the store)."""
    wanted = None if agents is None else frozenset(agents)
    shown: dict[int, bool] = {}

    def keep(event: EventBase) -> bool:
        if isinstance(event, StreamStart):
            ok = (max_depth is None or event.depth <= max_depth) and (
                wanted is None or event.agent in wanted)
            shown[event.stream_id] = ok
            return ok
        stream_id = stream_id_of(event)
        return stream_id is None or shown.get(stream_id, True)

    return keep

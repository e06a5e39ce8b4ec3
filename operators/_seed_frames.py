"""Seed 003's ``/chat/stream`` frames from a turn's events (``scan`` + ``filter`` + ``map``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import reactivex
from reactivex import Observable
from reactivex import operators as ops

from core.events import Done, ErrorEvent, Event, StreamStart, Text, ToolResult

SeedFrame = dict[str, Any]


def to_seed_frames() -> Callable[[Observable[Event]], Observable[SeedFrame]]:
    """Map numbered events to the JSON objects of seed 003's stream, exactly its shapes::

        {"type":"token","token":"..."}
        {"type":"tool_result","tool":"fs.read","data":{...},"execution_id":"..."}
        {"type":"tool_error","tool":"fs.read","error":"msg","execution_id":"..."}
        {"type":"error","error":"msg"}
        {"type":"end","reason":"completed"}        (always last: completed, error, cancelled)

    ::

        events: -R-s-t("Hi")-o(ok)-u-e-D|
        frames: -----k("Hi")-r--------E|      (k token, r tool_result, E end)

    Only the top-level (depth 0) text becomes tokens; tool results of every stream are
    shown (a sub-agent's too). Other events have no frame in this wire.

    Example:
        >>> turn.stream.pipe(to_seed_frames())  # doctest: +SKIP
    """

    def step(state: _State, event: Event) -> _State:
        depths = state.depths
        frame: SeedFrame | None = None
        match event:
            case StreamStart(stream_id=stream_id, depth=depth):
                depths[stream_id] = depth
            case Text(stream_id=stream_id, delta=delta) if depths.get(stream_id, 0) == 0:
                frame = {"type": "token", "token": delta}
            case ToolResult(ok=True):
                frame = {"type": "tool_result", "tool": event.tool, "data": event.data,
                         "execution_id": event.execution_id}
            case ToolResult():
                frame = {"type": "tool_error", "tool": event.tool, "error": event.error or "",
                         "execution_id": event.execution_id}
            case ErrorEvent(error=message):
                frame = {"type": "error", "error": message}
            case Done(reason=reason):
                frame = {"type": "end", "reason": reason}
            case _:
                pass
        return _State(frame, depths)

    def has_frame(state: _State) -> bool:
        return state.frame is not None

    def frame_of(state: _State) -> SeedFrame:
        assert state.frame is not None
        return state.frame

    def _frames(source: Observable[Event]) -> Observable[SeedFrame]:
        # defer: every subscription folds from its own fresh state.
        return reactivex.defer(lambda _: source.pipe(
            ops.scan(step, _State(None, {})),
            ops.filter(has_frame),
            ops.map(frame_of),
        ))

    return _frames


class _State(NamedTuple):
    frame: SeedFrame | None
    depths: dict[int, int]

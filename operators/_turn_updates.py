"""Turn updates: a turn's events folded into snapshots of the answer (``scan``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, TypeAlias

import reactivex
from pydantic import BaseModel
from reactivex import Observable
from reactivex import operators as ops

from core.events import Done, ErrorEvent, Event, RequestReceived, StreamStart, Text

UpdateStatus: TypeAlias = Literal[
    "pending", "streaming", "complete", "error", "cancelled", "interrupted"
]


class TurnUpdate(BaseModel):
    """The state of a turn's answer after one event (what a chat UI re-renders)."""

    response_id: str
    session_id: str
    status: UpdateStatus
    content: str
    delta: str = ""
    event: str
    seq: int
    error: str | None = None


_FINAL: dict[str, UpdateStatus] = {
    "completed": "complete", "error": "error", "cancelled": "cancelled",
    "interrupted": "interrupted",
}


def turn_updates(*, session_id: str) -> Callable[[Observable[Event]], Observable[TurnUpdate]]:
    """Fold numbered events into :class:`TurnUpdate` snapshots, one per meaningful event.

    ::

        events:  -R-s-t("Hi")-t("!")-u-e-D|
        updates: -P---S("Hi")-S("Hi!")----C("Hi!")|
                  (P pending, S streaming, C complete; content is the answer so far)

    An update is emitted for ``request_received`` (pending), each top-level ``text``
    (streaming, with its ``delta``), ``error`` (the error noted) and ``done`` (the final
    status: complete, error, cancelled or interrupted). Other events change nothing a chat
    view shows and emit nothing.

    Example:
        >>> turn.stream.pipe(turn_updates(session_id=conversation_id))  # doctest: +SKIP
    """

    def step(state: _State, event: Event) -> _State:
        last, depths = state.update, state.depths
        base = last or TurnUpdate(
            response_id=event.request_id, session_id=session_id, status="pending",
            content="", event=event.type, seq=event.seq,
        )
        match event:
            case RequestReceived():
                return _State(base, True, depths)
            case StreamStart(stream_id=stream_id, depth=depth):
                depths[stream_id] = depth
                return _State(base, False, depths)
            case Text(stream_id=stream_id, delta=delta) if depths.get(stream_id, 0) == 0:
                update = base.model_copy(update={
                    "status": "streaming", "content": base.content + delta, "delta": delta,
                    "event": "text", "seq": event.seq,
                })
                return _State(update, True, depths)
            case ErrorEvent(error=message):
                update = base.model_copy(update={
                    "error": message, "delta": "", "event": event.type, "seq": event.seq})
                return _State(update, True, depths)
            case Done(reason=reason):
                update = base.model_copy(update={
                    "status": _FINAL[reason], "delta": "", "event": "done", "seq": event.seq})
                return _State(update, True, depths)
            case _:
                return _State(base, False, depths)

    def emitted(state: _State) -> bool:
        return state.emit

    def update_of(state: _State) -> TurnUpdate:
        assert state.update is not None
        return state.update

    def _updates(source: Observable[Event]) -> Observable[TurnUpdate]:
        # defer: every subscription folds from its own fresh state.
        return reactivex.defer(lambda _: source.pipe(
            ops.scan(step, _State(None, False, {})),
            ops.filter(emitted),
            ops.map(update_of),
        ))

    return _updates


class _State(NamedTuple):
    update: TurnUpdate | None
    emit: bool
    depths: dict[int, int]

"""Start-up recovery: close the turns a killed process left ``running`` in the store.

A ``kill -9`` (or a crash) leaves requests whose last stored event is not ``done``; their
followers would wait forever and the wire rules would not hold. On start-up each such
request is closed in the store as the wire requires: every open stream ends with status
``error``, then one ``turn_error`` event and one ``done`` (``ok: false, reason:
"interrupted"``), numbered after the last stored event. The request becomes
``interrupted`` and its assistant message keeps the text that was stored.

At most the last flush interval of events (``FLUSH_INTERVAL_MS``) is lost in a crash, and
a client may already have seen some of them. So the closing events are numbered after a
gap (:data:`SEQ_GAP`) rather than right after the last stored event: ids only ever
increase, and a client that saw more than was stored, resuming with its last id, still
gets the closing events (a gap is nothing new to a client: hidden trace events make gaps
too). A request stored without any event gets its ``request_received`` first.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time

from core.events import Done, ErrorEvent, Event, RequestReceived, StreamEnd
from core.turn import TurnState
from sinks.store import EventStore, MessageRow, RequestRow, ToolExecutionRow

log = logging.getLogger(__name__)

INTERRUPTED_ERROR = "interrupted: the server stopped before the turn finished"

#: Seq numbers skipped before the closing events: more than any turn can emit in a flush
#: interval (a turn's text is bounded by max_tokens ≤ 100,000 per model call).
SEQ_GAP = 10_000_000


async def recover_interrupted(store: EventStore) -> list[str]:
    """Close every request still ``running`` in the store; return their ids."""
    rows = await store.aquery("SELECT request_id FROM requests WHERE status = 'running'")
    recovered = [request_id for (request_id,) in rows]
    for request_id in recovered:
        await close_interrupted(store, request_id)
    if recovered:
        await store.flush()
        log.warning("closed %d requests interrupted by the last stop: %s",
                    len(recovered), ", ".join(recovered))
    return recovered


Closing = list[tuple[Event, str | None, int | None]]


class OpenStreams:
    """Folds a turn's events: which streams are still open (with their agent and depth)."""

    def __init__(self) -> None:
        self.streams: dict[int, tuple[str | None, int | None]] = {}
        self.open: list[int] = []

    def apply(self, event: Event) -> None:
        if event.type == "stream_start":
            self.streams[event.stream_id] = (event.agent, event.depth)
            self.open.append(event.stream_id)
        elif event.type == "stream_end" and event.stream_id in self.open:
            self.open.remove(event.stream_id)

    def of(self, stream_id: int) -> tuple[str | None, int | None]:
        """The agent and depth of a stream (``(None, None)`` when unknown)."""
        return self.streams.get(stream_id, (None, None))


def closing_events(state: TurnState, streams: OpenStreams, *, first_seq: int,
                   error: str = INTERRUPTED_ERROR) -> Closing:
    """The events that close an interrupted turn, numbered from ``first_seq``: its
    ``request_received`` when nothing was recorded, every open stream ending ``error``
    (innermost first), one ``turn_error`` and ``done`` (``reason: "interrupted"``); each
    with its agent and depth. Nothing when the turn already ended. ``state`` is folded on.

    Start-up recovery numbers them after :data:`SEQ_GAP`; the cluster's reaper
    (:mod:`sinks.cluster`) right after the log's last seq (its followers read only the log).
    """
    closing: Closing = []
    if state.status != "running":
        return closing
    if state.last_seq == 0:  # the row was written, the first event was not
        closing.append((RequestReceived(agent="assistant",
                                        conversation_id=state.conversation_id), None, None))
    for stream_id in reversed(streams.open):
        closing.append((StreamEnd(stream_id=stream_id, status="error"), *streams.of(stream_id)))
    closing.append((ErrorEvent(error=error, retryable=True), None, None))
    closing.append((Done(ok=False, duration_ms=0, reason="interrupted"), None, None))
    seq = first_seq - 1
    for event, _, _ in closing:
        seq += 1
        event.request_id = state.request_id
        event.seq = seq
        state.apply(event)
    return closing


async def close_interrupted(store: EventStore, request_id: str) -> None:
    """Close one request in the store as interrupted (its stored events read first; call
    :meth:`~sinks.store.EventStore.flush` before when some may still be queued)."""
    request = await store.request_row(request_id)
    if request is None:
        log.error("cannot close %s as interrupted: the store has no row of it", request_id)
        return
    state = TurnState(request_id, request["conversation_id"], request["model"] or "")
    streams = OpenStreams()
    async for event in store.events_since(request_id, 0):
        state.apply(event)
        streams.apply(event)
    started = _epoch(request["started_at"]) if request["started_at"] else time.time()
    finished = state.status != "running"  # its done was stored, its row was not
    gap = SEQ_GAP if state.last_seq else 0
    closing = closing_events(state, streams, first_seq=state.last_seq + gap + 1)
    for event, agent, depth in closing:
        store.append_event(event, agent=agent, depth=depth)
    now = time.time()
    store.put_request(RequestRow(
        request_id=request_id, conversation_id=request["conversation_id"], kind=request["kind"],
        status=state.status, started_at=started, trace=request["trace"], finished_at=now,
        duration_ms=state.duration_ms if finished else None,
        first_token_ms=request["first_token_ms"], model=request["model"],
        prompt_tokens=state.usage.prompt_tokens, completion_tokens=state.usage.completion_tokens,
        total_tokens=state.usage.total_tokens, last_seq=state.last_seq,
        error=state.error if finished else INTERRUPTED_ERROR,
    ))
    await _interrupt_tools(store, request_id, now)
    for message in await store.messages_of(request_id):
        if message["role"] == "assistant":
            store.put_message(MessageRow(
                message_id=message["message_id"], conversation_id=message["conversation_id"],
                request_id=request_id, ordinal=message["ordinal"], role="assistant",
                content=state.content,
                status={"completed": "complete"}.get(state.status, state.status),
                created_at=_epoch(message["created_at"]), updated_at=now,
            ))


async def _interrupt_tools(store: EventStore, request_id: str, now: float) -> None:
    """Tool executions the stop left ``running`` end ``interrupted``."""
    fields = [field.name for field in dataclasses.fields(ToolExecutionRow)]
    rows = await store.aquery(
        f"SELECT {', '.join(fields)} FROM tool_executions "
        "WHERE request_id = ? AND status = 'running'", [request_id])
    for values in rows:
        row = dict(zip(fields, values, strict=True))
        row["started_at"] = _epoch(row["started_at"])
        row.update(status="interrupted", ok=False, error=INTERRUPTED_ERROR, finished_at=now,
                   duration_ms=None)
        store.put_tool_execution(ToolExecutionRow(**row))


def _epoch(value: datetime.datetime) -> float:
    return value.replace(tzinfo=datetime.UTC).timestamp()

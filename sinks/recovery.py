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


async def close_interrupted(store: EventStore, request_id: str) -> None:
    """Close one request in the store as interrupted (its stored events read first; call
    :meth:`~sinks.store.EventStore.flush` before when some may still be queued)."""
    request = await store.request_row(request_id)
    if request is None:
        log.error("cannot close %s as interrupted: the store has no row of it", request_id)
        return
    state = TurnState(request_id, request["conversation_id"], request["model"] or "")
    streams: dict[int, tuple[str | None, int | None]] = {}
    open_streams: list[int] = []
    async for event in store.events_since(request_id, 0):
        state.apply(event)
        if event.type == "stream_start":
            streams[event.stream_id] = (event.agent, event.depth)
            open_streams.append(event.stream_id)
        elif event.type == "stream_end" and event.stream_id in open_streams:
            open_streams.remove(event.stream_id)
    started = _epoch(request["started_at"]) if request["started_at"] else time.time()
    closing: list[tuple[Event, str | None, int | None]] = []
    finished = state.status != "running"  # its done was stored, its row was not
    if not finished and state.last_seq == 0:  # the row was written, the first event was not
        closing.append((RequestReceived(agent="assistant",
                                        conversation_id=request["conversation_id"]), None, None))
    if not finished:
        for stream_id in reversed(open_streams):
            closing.append((StreamEnd(stream_id=stream_id, status="error"), *streams[stream_id]))
        closing.append((ErrorEvent(error=INTERRUPTED_ERROR, retryable=True), None, None))
        closing.append((Done(ok=False, duration_ms=0, reason="interrupted"), None, None))
    seq = state.last_seq + SEQ_GAP if state.last_seq and closing else state.last_seq
    for event, agent, depth in closing:
        seq += 1
        event.request_id = request_id
        event.seq = seq
        state.apply(event)
        store.append_event(event, agent=agent, depth=depth)
    now = time.time()
    store.put_request(RequestRow(
        request_id=request_id, conversation_id=request["conversation_id"], kind=request["kind"],
        status=state.status, started_at=started, trace=request["trace"], finished_at=now,
        duration_ms=state.duration_ms if finished else None,
        first_token_ms=request["first_token_ms"], model=request["model"],
        prompt_tokens=state.usage.prompt_tokens, completion_tokens=state.usage.completion_tokens,
        total_tokens=state.usage.total_tokens, last_seq=seq,
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

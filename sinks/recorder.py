"""The Recorder: the write side of the Archivist/Recorder split, one per turn.

It observes a turn's numbered, shared stream and writes to the event store: every event
(trace included), the request's row, the user messages when the turn starts and the
assistant message as it goes (``pending → streaming → complete | error | cancelled``), and
one ``tool_executions`` row per tool call, from its ``tool_call`` and ``tool_result`` events.
Deriving the rows from the events (rather than having tools write them) keeps one source of
truth: a replayed or re-recorded stream gives the same rows, and tools stay free of storage.
It also folds the events into a :class:`~core.turn.TurnState` and calls ``on_done``
with the final result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from reactivex import Observer

from core.events import (
    Done,
    Event,
    EventBase,
    RequestReceived,
    StreamStart,
    Text,
    ToolCall,
    ToolResult,
    stream_id_of,
)
from core.turn import TurnContext, TurnResult, TurnState
from sinks.store import MessageRow, RequestRow, ToolExecutionRow

#: The agent of a roundtable's depth-0 stream (:data:`pipeline.roundtable.MODERATOR`).
MODERATOR = "moderator"

log = logging.getLogger(__name__)


class RowSink(Protocol):
    """Where a :class:`TurnRecorder` writes: the write half of :class:`~sinks.store.EventStore`."""

    def append_event(self, event: EventBase, *, agent: str | None, depth: int | None) -> None: ...
    def put_request(self, row: RequestRow) -> None: ...
    def put_message(self, row: MessageRow) -> None: ...
    def put_tool_execution(self, row: ToolExecutionRow) -> None: ...


class _Discard:
    """A sink that keeps nothing: a recorder's state is rebuilt through it (:meth:`resume`)."""

    def append_event(self, event: EventBase, *, agent: str | None, depth: int | None) -> None:
        pass

    def put_request(self, row: RequestRow) -> None:
        pass

    def put_message(self, row: MessageRow) -> None:
        pass

    def put_tool_execution(self, row: ToolExecutionRow) -> None:
        pass


def turn_meta(ctx: TurnContext, *, started_at: float) -> bytes:
    """What a recorder in another process needs to know of a turn that no event carries
    (its kind, trace flag, model, input messages, start time): the ``m`` field of the
    turn's discovery entry (:attr:`sinks.event_log.RedisEventLog.turns_key`)."""
    return json.dumps({
        "request_id": ctx.request_id, "conversation_id": ctx.conversation_id, "kind": ctx.kind,
        "trace": ctx.trace, "model": ctx.model, "max_tokens": ctx.max_tokens,
        "started_at": started_at,
        "messages": [{"role": m["role"], "content": m.get("content") or ""} for m in ctx.messages],
    }, ensure_ascii=False, default=str).encode()


def context_of(meta: bytes | str) -> tuple[TurnContext, float]:
    """The turn context and start time a :func:`turn_meta` describes.

    Raises:
        ValueError: ``meta`` is not a turn meta (not JSON, or a field is missing).
    """
    try:
        data: dict[str, Any] = json.loads(meta)
        ctx = TurnContext(
            request_id=str(data["request_id"]), conversation_id=str(data["conversation_id"]),
            messages=list(data["messages"]), trace=bool(data["trace"]), model=str(data["model"]),
            max_tokens=data.get("max_tokens"), kind=str(data["kind"]))
        return ctx, float(data["started_at"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a turn meta: {exc!r}") from exc


class TurnRecorder(Observer[Event]):
    """Records one turn. ``store`` may be None (state and result only, e.g. in examples).

    ``started_at`` (epoch seconds, default now) is the request's start: a recorder in
    another process (:mod:`sinks.log_recorder`) passes the owner's.
    """

    def __init__(
        self, ctx: TurnContext, *, store: RowSink | None,
        on_done: Callable[[TurnResult], None] | None = None, started_at: float | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.store = store
        self.on_done = on_done
        self.state = TurnState(ctx.request_id, ctx.conversation_id, ctx.model)
        self._streams: dict[int, tuple[str, int]] = {}
        # A roundtable's panelists (depth-1 streams under the moderator) and what they said,
        # kept as messages of their own so a follow-up turn remembers them (issue 14).
        self._panelists: dict[int, tuple[str, list[str]]] = {}
        self._tools: dict[str, ToolExecutionRow] = {}
        now = time.time() if started_at is None else started_at
        self._request = RequestRow(
            request_id=ctx.request_id, conversation_id=ctx.conversation_id, kind=ctx.kind,
            status="running", started_at=now, trace=ctx.trace, model=ctx.model,
        )
        self._assistant = MessageRow(
            message_id=f"{ctx.request_id}:assistant", conversation_id=ctx.conversation_id,
            request_id=ctx.request_id, ordinal=len(ctx.messages), role="assistant", content="",
            status="pending", created_at=now, updated_at=now,
        )

    @property
    def started_at(self) -> float:
        """The request's start (epoch seconds)."""
        return self._request.started_at

    def start(self) -> None:
        """Persist the request row, this turn's messages and the pending assistant message."""
        if self.store is None:
            return
        self.store.put_request(self._request)
        for ordinal, message in enumerate(self.ctx.messages):
            self.store.put_message(MessageRow(
                message_id=f"{self.ctx.request_id}:{ordinal}",
                conversation_id=self.ctx.conversation_id, request_id=self.ctx.request_id,
                ordinal=ordinal, role=message["role"], content=message.get("content") or "",
                status="complete", created_at=self._request.started_at,
                updated_at=self._request.started_at,
            ))
        self.store.put_message(self._assistant)

    def resume(self, recorded: Iterable[Event]) -> None:
        """Take up a turn of which ``recorded`` (in order, from seq 1) is already stored.

        The state (text so far, open streams, tool calls) is rebuilt from those events
        without writing them again; then every row derived so far is written again as it
        stands (upserts: the same values), since a recorder that stopped may have committed
        a batch's events but not the upserts that came after them. When the events end
        with ``done`` the turn is finished here too (its final rows written).
        """
        sink, self.store = self.store, _Discard()
        done = False
        try:
            for event in recorded:
                self._record(event)
                done = isinstance(event, Done)
        finally:
            self.store = sink
        self.start()  # the request, its messages and the assistant message as they stand
        if sink is not None:
            for row in self._tools.values():
                sink.put_tool_execution(row)
        if done:
            self._finish()

    def _on_next_core(self, event: Event) -> None:
        try:
            self._record(event)
        except Exception:  # a failing sink must never break the turn for other sinks
            log.exception("recording %s seq=%s failed", event.type, event.seq)
        if isinstance(event, Done):
            self._finish()

    def _record(self, event: Event) -> None:
        state = self.state
        state.apply(event)
        agent: str | None = None
        depth: int | None = None
        match event:
            case StreamStart(stream_id=stream_id, agent=agent, depth=depth):
                self._streams[stream_id] = (agent, depth)
                parent = self._streams.get(event.parent_stream_id or -1)
                if depth == 1 and parent is not None and parent[0] == MODERATOR:
                    self._panelists[stream_id] = (agent, [])
            case RequestReceived(agent=agent):
                pass
            case _:
                owner = stream_id_of(event)
                if owner is not None:
                    agent, depth = self._streams.get(owner, (None, None))
                    if isinstance(event, Text) and owner in self._panelists:
                        self._panelists[owner][1].append(event.delta)
        store = self.store
        if store is not None:
            store.append_event(event, agent=agent, depth=depth)
            if isinstance(event, Text) and self._assistant.status == "pending":
                self._assistant.status = "streaming"
                self._assistant.updated_at = event.ts
                store.put_message(self._assistant)
            if isinstance(event, ToolCall | ToolResult):
                self._record_tool(store, event, agent)

    def _record_tool(self, store: RowSink, event: ToolCall | ToolResult, agent: str | None) -> None:
        row = self._tools.get(event.execution_id)
        if row is None:
            row = self._tools[event.execution_id] = ToolExecutionRow(
                execution_id=event.execution_id, request_id=self.ctx.request_id,
                conversation_id=self.ctx.conversation_id, tool=event.tool, params="{}",
                status="running", started_at=event.ts, stream_id=event.stream_id, agent=agent,
            )
        if isinstance(event, ToolCall):
            row.params = json.dumps(event.params, ensure_ascii=False, default=str)
            row.started_at = event.ts
            if event.side == "client":  # the client runs it: no result will come here
                row.status = "client"
                row.finished_at = event.ts
        else:
            row.status = "ok" if event.ok else "error"
            row.ok = event.ok
            row.result = json.dumps(event.data, ensure_ascii=False, default=str) if event.ok else None
            row.error = event.error
            row.finished_at = event.ts
            row.duration_ms = event.duration_ms
        store.put_tool_execution(row)

    def _finish(self) -> None:
        result = self.state.result()
        try:
            self._write_final(result)
        except Exception:  # the result must resolve even if the store cannot write
            log.exception("recording the end of turn %s failed", self.ctx.request_id)
        if self.on_done is not None:
            self.on_done(result)

    def _write_final(self, result: TurnResult) -> None:
        if self.store is not None:
            now = time.time()
            for row in self._tools.values():  # calls the turn ended before they finished
                if row.status == "running":
                    row.status = "cancelled"
                    row.finished_at = now
                    self.store.put_tool_execution(row)
            request = self._request
            request.status = result.status
            request.finished_at = now
            request.duration_ms = result.duration_ms
            request.first_token_ms = result.first_token_ms
            request.model = result.model
            request.prompt_tokens = result.usage.prompt_tokens
            request.completion_tokens = result.usage.completion_tokens
            request.total_tokens = result.usage.total_tokens
            request.last_seq = result.last_seq
            request.error = result.error
            request.cost_usd = result.cost_usd
            self.store.put_request(request)
            self._assistant.content = result.content
            self._assistant.cost_usd = result.cost_usd
            self._assistant.status = {"completed": "complete"}.get(result.status, result.status)
            self._assistant.updated_at = now
            self.store.put_message(self._assistant)
            for k, (name, parts) in enumerate(self._panelists.values(), start=1):
                if parts:
                    self.store.put_message(dataclasses.replace(
                        self._assistant, message_id=f"{self.ctx.request_id}:panelist:{k}",
                        ordinal=self._assistant.ordinal + k, content=f"[{name}] {''.join(parts)}",
                        status="complete", cost_usd=None))

    def _on_error_core(self, error: Exception) -> None:
        # The turn envelope turns failures into events; reaching here is a bug upstream.
        log.error("turn %s stream failed: %r", self.ctx.request_id, error)

    def _on_completed_core(self) -> None:
        pass

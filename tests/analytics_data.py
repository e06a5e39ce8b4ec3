"""Synthetic turns with known timing, tokens, tools and panelists, for the analysts' views.

Each :class:`TurnBuilder` writes a request's events (with exact timestamps), its request
row and its messages through the real :class:`~sinks.store.EventStore`; the test computes
what the views must say from :attr:`TurnBuilder.records`, never from constants.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import duckdb

from core.events import (
    Done,
    ErrorEvent,
    EventBase,
    RequestReceived,
    StreamEnd,
    StreamStart,
    StreamStatus,
    Text,
    TokenUsage,
    ToolCall,
    ToolResult,
)
from sinks.store import EventStore, MessageRow, RequestRow
from sinks.views import create_views

DAY1 = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.UTC).timestamp()
DAY2 = dt.datetime(2025, 3, 2, 17, 30, tzinfo=dt.UTC).timestamp()


@dataclasses.dataclass(slots=True)
class Record:
    ts: float
    event: Any
    agent: str | None
    depth: int | None


class TurnBuilder:
    """One request's events, in order, at ``start + at`` seconds."""

    def __init__(self, request_id: str, conversation_id: str, start: float, *, model: str,
                 user: str = "hello") -> None:
        self.request_id = request_id
        self.conversation_id = conversation_id
        self.start = start
        self.model = model
        self.user = user
        self.records: list[Record] = []
        self.streams: dict[int, tuple[str, int]] = {}
        self.add(0.0, RequestReceived(agent="assistant", conversation_id=conversation_id))

    def add(self, at: float, event: EventBase) -> TurnBuilder:
        ts = self.start + at
        event = event.model_copy(update={"request_id": self.request_id,
                                         "seq": len(self.records) + 1, "ts": ts})
        agent: str | None = None
        depth: int | None = None
        if isinstance(event, StreamStart):
            self.streams[event.stream_id] = (event.agent, event.depth)
            agent, depth = event.agent, event.depth
        elif isinstance(event, RequestReceived):
            agent = event.agent
        elif (stream_id := getattr(event, "stream_id", None)) is not None:
            agent, depth = self.streams[stream_id]
        self.records.append(Record(ts=ts, event=event, agent=agent, depth=depth))
        return self

    def stream(self, at: float, stream_id: int, agent: str, depth: int = 0,
               parent: int | None = None) -> TurnBuilder:
        return self.add(at, StreamStart(stream_id=stream_id, agent=agent, depth=depth,
                                        parent_stream_id=parent))

    def text(self, at: float, stream_id: int, delta: str) -> TurnBuilder:
        return self.add(at, Text(stream_id=stream_id, delta=delta))

    def tool(self, at: float, stream_id: int, tool: str, *, ok: bool, duration_ms: float,
             answered: bool = True) -> TurnBuilder:
        execution_id = f"{self.request_id}:x{len(self.records)}"
        self.add(at, ToolCall(stream_id=stream_id, tool=tool, execution_id=execution_id,
                              params={"q": tool}))
        if answered:
            self.add(at + duration_ms / 1000, ToolResult(
                stream_id=stream_id, tool=tool, execution_id=execution_id, ok=ok,
                data={"hits": 1} if ok else None, error=None if ok else f"{tool} failed",
                duration_ms=duration_ms))
        return self

    def usage(self, at: float, stream_id: int, model: str, prompt: int, completion: int) -> TurnBuilder:
        return self.add(at, TokenUsage(stream_id=stream_id, model=model, prompt_tokens=prompt,
                                       completion_tokens=completion, total_tokens=prompt + completion))

    def end(self, at: float, stream_id: int, status: StreamStatus = "ok") -> TurnBuilder:
        return self.add(at, StreamEnd(stream_id=stream_id, status=status))

    def error(self, at: float, stream_id: int, message: str) -> TurnBuilder:
        return self.add(at, ErrorEvent(stream_id=stream_id, error=message, retryable=False))

    def done(self, at: float, *, ok: bool = True) -> TurnBuilder:
        return self.add(at, Done(ok=ok, duration_ms=round(at * 1000, 3),
                                 reason="completed" if ok else "error"))

    # -- what the turn means ------------------------------------------------------------
    def of_type(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.event.type == kind]

    @property
    def finished(self) -> bool:
        return bool(self.of_type("done"))

    @property
    def status(self) -> str:
        if not self.finished:
            return "running"
        return "completed" if self.of_type("done")[0].event.ok else "error"

    @property
    def text_of_top(self) -> str:
        return "".join(r.event.delta for r in self.of_type("text") if not r.depth)

    def write(self, store: EventStore) -> None:
        for record in self.records:
            store.append_event(record.event, agent=record.agent, depth=record.depth)
        self.write_rows(store)

    def write_rows(self, store: EventStore) -> None:
        """The request row and the messages, as they stand now."""
        done = self.of_type("done")
        texts = self.of_type("text")
        usage = [r.event for r in self.of_type("token_usage")]
        finished_at = done[0].ts if done else None
        store.put_request(RequestRow(
            request_id=self.request_id, conversation_id=self.conversation_id, kind="orchestrate",
            status=self.status, started_at=self.start, finished_at=finished_at,
            duration_ms=done[0].event.duration_ms if done else None,
            first_token_ms=round((texts[0].ts - self.start) * 1000, 3) if texts else None,
            model=self.model,
            prompt_tokens=sum(u.prompt_tokens for u in usage) if done else None,
            completion_tokens=sum(u.completion_tokens for u in usage) if done else None,
            total_tokens=sum(u.total_tokens for u in usage) if done else None,
            last_seq=len(self.records), error=None,
        ))
        store.put_message(MessageRow(
            message_id=f"{self.request_id}:0", conversation_id=self.conversation_id,
            request_id=self.request_id, ordinal=0, role="user", content=self.user,
            status="complete", created_at=self.start, updated_at=self.start))
        store.put_message(MessageRow(
            message_id=f"{self.request_id}:assistant", conversation_id=self.conversation_id,
            request_id=self.request_id, ordinal=1, role="assistant", content=self.text_of_top,
            status={"completed": "complete", "running": "streaming"}.get(self.status, self.status),
            created_at=self.start, updated_at=finished_at or self.start))


def synthetic_turns() -> list[TurnBuilder]:
    """Two conversations of plain turns with tools, a failed turn, a roundtable, a running turn."""
    a1 = (TurnBuilder("req_a1", "conv_a", DAY1 + 10, model="m-small", user="first")
          .stream(0.010, 1, "assistant")
          .tool(0.050, 1, "search", ok=True, duration_ms=40.0)
          .text(0.120, 1, "Hel").text(0.150, 1, "lo").text(0.200, 1, " there")
          .usage(0.210, 1, "m-small", 10, 3).end(0.220, 1).done(0.250))
    a2 = (TurnBuilder("req_a2", "conv_a", DAY1 + 100, model="m-small", user="second")
          .stream(0.020, 1, "assistant")
          .tool(0.030, 1, "search", ok=False, duration_ms=15.5)
          .tool(0.060, 1, "calc", ok=True, duration_ms=2.25)
          .text(0.300, 1, "Again").text(0.310, 1, ", yes")
          .usage(0.390, 1, "m-small", 20, 5).end(0.395, 1).done(0.400))
    b1 = (TurnBuilder("req_b1", "conv_b", DAY2, model="m-large", user="third")
          .stream(0.005, 1, "assistant")
          .tool(0.010, 1, "calc", ok=False, duration_ms=7.0)
          .tool(0.030, 1, "fetch", ok=False, duration_ms=1.0, answered=False)
          .text(0.500, 1, "Partial")
          .usage(0.600, 1, "m-large", 7, 2)
          .error(0.700, 1, "upstream broke").end(0.750, 1, "error").done(0.800, ok=False))
    # A roundtable: a moderator (depth 0) and three panelists (depth 1), alice and bob twice.
    rt = (TurnBuilder("req_rt", "conv_rt", DAY2 + 60, model="m-small", user="debate")
          .stream(0.001, 1, "moderator").text(0.002, 1, "Welcome.")
          .stream(0.010, 2, "alice", 1, parent=1).stream(0.011, 3, "bob", 1, parent=1)
          .stream(0.012, 4, "carol", 1, parent=1)
          .text(0.050, 2, "I think so.").text(0.090, 3, "No.").text(0.150, 4, "Maybe, it depends.")
          .text(0.160, 2, " Because.")
          .usage(0.170, 2, "m-small", 30, 6).usage(0.171, 3, "m-large", 30, 2)
          .usage(0.172, 4, "m-small", 30, 9)
          .end(0.180, 2).end(0.181, 3).end(0.182, 4)
          .stream(0.200, 5, "alice", 1, parent=1).stream(0.201, 6, "bob", 1, parent=1)
          .text(0.230, 5, "Still yes.").text(0.320, 6, "Fine, yes.")
          .usage(0.330, 5, "m-small", 40, 4).usage(0.331, 6, "m-large", 40, 4)
          .end(0.340, 5).end(0.341, 6).end(0.350, 1).done(0.360))
    running = (TurnBuilder("req_run", "conv_b", DAY2 + 3600, model="m-large", user="fourth")
               .stream(0.010, 1, "assistant").text(0.400, 1, "Thinking"))
    return [a1, a2, b1, rt, running]


def create_store_views(store: EventStore) -> None:
    """Create the views in a store's database (DuckDB hands out the same instance per file
    in one process), as ``EventStore.open`` will once it calls ``create_views`` itself."""
    con = duckdb.connect(store.path)
    try:
        create_views(con)
    finally:
        con.close()


async def record(store: EventStore, turns: list[TurnBuilder]) -> None:
    for turn in turns:
        turn.write(store)
    await store.flush()

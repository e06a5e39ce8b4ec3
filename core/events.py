"""The event model: one pydantic class per wire type, joined in a discriminated union.

Every event carries ``request_id`` and ``seq``; harnesses create events with both unset
(``""`` and ``0``) and the numbering operator stamps them at one point of the pipeline
(:func:`operators.number_events`). ``ts`` is the creation time (epoch seconds), so latency
can be measured from the moment a harness produced an event to the moment a client got it.

One module-level :data:`EVENT_ADAPTER` parses any event from JSON or a dict (the store and
the SSE readers use it); ``event.model_dump_json()`` writes the wire form.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

StreamStatus: TypeAlias = Literal["ok", "error", "cancelled"]
DoneReason: TypeAlias = Literal["completed", "error", "cancelled", "interrupted"]
Visibility: TypeAlias = Literal["public", "trace"]


class EventBase(BaseModel):
    """Fields every event has. ``seq`` and ``request_id`` are set by numbering."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = ""
    seq: int = 0
    ts: float = Field(default_factory=time.time)


class RequestReceived(EventBase):
    """Always the first event of a request (seq 1)."""

    type: Literal["request_received"] = "request_received"
    agent: str
    conversation_id: str


class StreamStart(EventBase):
    """Opens one agent's turn; closed by exactly one :class:`StreamEnd`."""

    type: Literal["stream_start"] = "stream_start"
    stream_id: int
    agent: str
    depth: int = 0
    parent_stream_id: int | None = None


class Text(EventBase):
    """A piece of model output."""

    type: Literal["text"] = "text"
    stream_id: int
    delta: str


class ToolCall(EventBase):
    type: Literal["tool_call"] = "tool_call"
    stream_id: int
    tool: str
    execution_id: str
    params: dict[str, Any] = Field(default_factory=dict)


class ToolResult(EventBase):
    type: Literal["tool_result"] = "tool_result"
    stream_id: int
    tool: str
    execution_id: str
    ok: bool
    data: Any = None
    error: str | None = None
    duration_ms: float = 0.0


class TokenUsage(EventBase):
    type: Literal["token_usage"] = "token_usage"
    stream_id: int
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    #: USD for this call by the price table (``PRICES``); None for an unpriced model.
    cost_usd: float | None = None


class Advisor(EventBase):
    type: Literal["advisor"] = "advisor"
    stream_id: int
    kind: str
    note: str | None = None


class StreamEnd(EventBase):
    """Closes one :class:`StreamStart`. ``finish_reason`` is the model's, when known."""

    type: Literal["stream_end"] = "stream_end"
    stream_id: int
    status: StreamStatus = "ok"
    finish_reason: str | None = None


class ErrorEvent(EventBase):
    """A failure; the turn still closes its streams and sends ``done``."""

    type: Literal["error"] = "error"
    stream_id: int | None = None
    error: str
    retryable: bool = False


class Done(EventBase):
    """Always the last event of a request, exactly once."""

    type: Literal["done"] = "done"
    ok: bool
    duration_ms: float
    reason: DoneReason


class LlmCall(EventBase):
    """Trace-only: the exact messages sent to a model."""

    type: Literal["llm_call"] = "llm_call"
    stream_id: int
    model: str
    messages: list[dict[str, Any]]


class Route(EventBase):
    """Trace-only: the router's decision."""

    type: Literal["route"] = "route"
    route: str
    reason: str | None = None


class Memory(EventBase):
    """Trace-only: how many earlier messages the memory harness loaded."""

    type: Literal["memory"] = "memory"
    messages_loaded: int


Event: TypeAlias = Annotated[
    RequestReceived
    | StreamStart
    | Text
    | ToolCall
    | ToolResult
    | TokenUsage
    | Advisor
    | StreamEnd
    | ErrorEvent
    | Done
    | LlmCall
    | Route
    | Memory,
    Field(discriminator="type"),
]

EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)

#: Event types shown to clients only when they ask for ``trace: true``; always stored.
TRACE_TYPES: Final[frozenset[str]] = frozenset({"llm_call", "route", "memory"})


def is_trace(event: EventBase) -> bool:
    """Whether an event is trace-only (hidden unless the client asks for trace)."""
    return getattr(event, "type", "") in TRACE_TYPES


def visibility(event: EventBase) -> Visibility:
    """The ``visibility`` column of the events table."""
    return "trace" if is_trace(event) else "public"


def stream_id_of(event: EventBase) -> int | None:
    """The stream an event belongs to, if any."""
    value = getattr(event, "stream_id", None)
    return value if isinstance(value, int) else None

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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter

StreamStatus: TypeAlias = Literal["ok", "error", "cancelled"]
DoneReason: TypeAlias = Literal["completed", "error", "cancelled", "interrupted"]
Visibility: TypeAlias = Literal["public", "trace"]


def whole_ms(value: Any) -> Any:
    """Round a float of milliseconds to a whole number (events stored before durations
    were integers hold floats such as ``354.006``); anything else is left to pydantic."""
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return round(value)
    return value


#: Whole milliseconds: every ``*_ms`` field on the wire is an integer (typed clients decode
#: an ``int``); a float read back from an older store is rounded.
Millis: TypeAlias = Annotated[int, BeforeValidator(whole_ms)]

#: The ``type`` of the turn-level error event. Not ``error``: a native frame ``event: error``
#: fires EventSource's own ``onerror`` handler (browsers, Node's ``eventsource``).
TURN_ERROR: Final = "turn_error"


class EventBase(BaseModel):
    """Fields every event has. ``seq`` and ``request_id`` are set by numbering."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = ""
    seq: int = 0
    ts: float = Field(default_factory=time.time)


def _unset(value: Any) -> bool:
    """Whether an optional field is left out of the wire form (it is None)."""
    return value is None


# Optional fields are left out of the wire form while None (``exclude_if=_unset``), so events
# that do not use them keep their plain form; unlike a model serializer, at no cost per event.


class RequestReceived(EventBase):
    """Always the first event of a request (seq 1)."""

    type: Literal["request_received"] = "request_received"
    agent: str
    conversation_id: str


class StreamStart(EventBase):
    """Opens one agent's turn; closed by exactly one :class:`StreamEnd`.

    ``choice`` (only when the request asked for ``n > 1``): which of the model's choices
    this stream carries; choices 1… are child streams of choice 0's.
    """

    type: Literal["stream_start"] = "stream_start"
    stream_id: int
    agent: str
    depth: int = 0
    parent_stream_id: int | None = None
    choice: int | None = Field(default=None, exclude_if=_unset)


class Text(EventBase):
    """A piece of model output; ``logprobs`` (only when the request asked for them) are
    the provider's per-token log probabilities of this piece (OpenAI's ``content`` list);
    ``refusal: true`` marks a piece of the model's refusal (OpenAI's ``delta.refusal``)."""

    type: Literal["text"] = "text"
    stream_id: int
    delta: str
    logprobs: list[dict[str, Any]] | None = Field(default=None, exclude_if=_unset)
    refusal: Literal[True] | None = Field(default=None, exclude_if=_unset)


class ToolCall(EventBase):
    """A tool call. ``side: "client"`` marks a call of a client's own tool (the OpenAI
    wire): the server does not run it and no ``tool_result`` follows; ``call_id`` is the
    model's id of the call (the client's ``tool_call_id``). Both are absent otherwise."""

    type: Literal["tool_call"] = "tool_call"
    stream_id: int
    tool: str
    execution_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    side: Literal["client"] | None = Field(default=None, exclude_if=_unset)
    call_id: str | None = Field(default=None, exclude_if=_unset)


class ToolCallDelta(EventBase):
    """A piece of a client's tool call as the model streams it (the OpenAI wire's client
    tools): the first piece of a call has its ``call_id`` and ``name``, later ones add to
    its ``arguments``. ``index`` numbers the model's calls within the stream. The complete
    call follows as a ``tool_call`` with ``side: "client"``."""

    type: Literal["tool_call_delta"] = "tool_call_delta"
    stream_id: int
    index: int
    call_id: str | None = Field(default=None, exclude_if=_unset)
    name: str | None = Field(default=None, exclude_if=_unset)
    arguments: str = ""


class ToolResult(EventBase):
    type: Literal["tool_result"] = "tool_result"
    stream_id: int
    tool: str
    execution_id: str
    ok: bool
    data: Any = None
    error: str | None = None
    duration_ms: Millis = 0


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
    """A failure (wire type ``turn_error``); the turn still closes its streams and sends ``done``."""

    type: Literal["turn_error"] = "turn_error"
    stream_id: int | None = None
    error: str
    retryable: bool = False


class Done(EventBase):
    """Always the last event of a request, exactly once."""

    type: Literal["done"] = "done"
    ok: bool
    duration_ms: Millis
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
    | ToolCallDelta
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

#: An alias that says what the event is, beside its historical class name.
TurnError = ErrorEvent

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

"""A turn's input, context, running state and result."""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from typing import Any, Literal, NotRequired, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import TypedDict  # pydantic wants it on Python < 3.12

from core.events import (
    Done,
    ErrorEvent,
    Event,
    LlmCall,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
)

TurnStatus: TypeAlias = Literal["running", "completed", "cancelled", "error", "interrupted"]


def new_id(prefix: str) -> str:
    """A short unique id such as ``req_3f9c…``."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class TextPart(TypedDict):
    """One of OpenAI's content parts; only ``text`` parts are accepted."""

    type: Literal["text"]
    text: NotRequired[str]


class ToolCallFunction(BaseModel):
    """The function of an assistant's tool call: its name and arguments JSON, as sent."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    arguments: str = ""


class MessageToolCall(BaseModel):
    """A tool call in an assistant message (OpenAI's ``tool_calls`` item)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=400)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One chat message; ``content`` may be OpenAI's list of text parts.

    Tool loops of a client pass through as OpenAI has them: an assistant message with
    ``tool_calls`` (its ``content`` may be null), then one ``role: "tool"`` message per call
    with its ``tool_call_id``. :meth:`as_openai` gives them back unchanged.
    """

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Required, except beside an assistant's tool_calls; null (as OpenAI allows for
    # assistant messages) reads as "".
    content: str = ""
    name: str | None = Field(default=None, max_length=200)
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=400)

    # The JSON schema (GET /openapi.json) states what is accepted: a string, null or parts.
    @field_validator("content", mode="before", json_schema_input_type=str | None | list[TextPart])
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError("only text content parts are supported")
                text = part.get("text", "")
                if not isinstance(text, str):  # refused, not stringified (e.g. "None", "{}")
                    raise ValueError("a text part's text must be a string")
                texts.append(text)
            return "".join(texts)
        return value

    @model_validator(mode="before")
    @classmethod
    def _content_given(cls, value: Any) -> Any:
        if isinstance(value, dict) and "content" not in value and not value.get("tool_calls"):
            raise ValueError("content is required (it may be absent only beside tool_calls)")
        return value

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("tool_call_id belongs to tool messages only")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages only")
        return self

    def as_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
            out["content"] = self.content or None  # OpenAI's null content beside calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ToolCallSpec(BaseModel):
    """A tool call a request names directly: ``{"name": "fs.read", "params": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)


class TurnInput(BaseModel):
    """What a turn needs. ``conversation_id`` is created when absent.

    With a ``conversation_id``, ``messages`` are the new messages of this turn; memory
    prepends the conversation's earlier messages from the store.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=200)
    trace: bool = False
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=100_000)
    kind: str = "orchestrate"
    tool_calls: list[ToolCallSpec] = Field(default_factory=list)
    #: Request parameters sent to the model as given (temperature, stop, n, a client's
    #: ``tools`` and ``tool_choice``…): the OpenAI wire forwards its caller's.
    model_params: dict[str, Any] = Field(default_factory=dict)
    #: Whether the server's own tools are offered to the model (the agent loop).
    server_tools: bool = True


@dataclasses.dataclass
class TurnContext:
    """Per-turn state shared by the harnesses of one turn (created fresh by ``run``)."""

    request_id: str
    conversation_id: str
    messages: list[dict[str, Any]]
    trace: bool
    model: str
    max_tokens: int | None
    kind: str
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    route: str | None = None
    #: Tool calls the request named directly (run by the tool harness).
    tool_calls: list[ToolCallSpec] = dataclasses.field(default_factory=list)
    #: Messages the tool harness adds for the model: its calls and their results.
    tool_context: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: True when the conversation id was made for this turn: there is no history to load.
    new_conversation: bool = False
    #: Request parameters forwarded to the model unchanged (see :class:`TurnInput`); with
    #: ``tools`` in them the model's tool calls are the client's to run.
    model_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Whether the server's own tools are offered (never, beside a client's ``tools``).
    server_tools: bool = True
    #: The router's ``delegate`` decision: the sub-agent and its task (issue 14).
    route_agent: str | None = None
    route_task: str | None = None
    _stream_ids: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def next_stream_id(self) -> int:
        """A stream id unique within this request."""
        return next(self._stream_ids)


class TurnUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TurnResult(BaseModel):
    """The final state of a turn."""

    request_id: str
    conversation_id: str
    status: TurnStatus
    content: str
    model: str
    finish_reason: str | None = None
    usage: TurnUsage = Field(default_factory=TurnUsage)
    duration_ms: int | None = None
    first_token_ms: int | None = None
    error: str | None = None
    last_seq: int = 0
    cost_usd: float | None = None


@dataclasses.dataclass
class TurnState:
    """A fold over a turn's events: what the recorder writes and the result reports.

    The assistant's content is the text of the top-level (depth 0) streams; the model is
    the last top-level stream's (a sub-agent's or advisor's call does not rename the
    request); ``cost_usd`` sums every priced ``token_usage`` (sub-agents, panelists, router,
    advisor, tool rounds). A cancelled turn counts one completion token per text piece of
    the streams whose usage never arrived.
    """

    request_id: str
    conversation_id: str
    model: str
    started: float = dataclasses.field(default_factory=time.time)
    status: TurnStatus = "running"
    parts: list[str] = dataclasses.field(default_factory=list)
    depths: dict[int, int] = dataclasses.field(default_factory=dict)
    finish_reason: str | None = None
    usage: TurnUsage = dataclasses.field(default_factory=TurnUsage)
    first_token_ms: int | None = None
    duration_ms: int | None = None
    error: str | None = None
    last_seq: int = 0
    cost_usd: float | None = None
    _streamed: dict[int, int] = dataclasses.field(default_factory=dict)
    _usage_seen: set[int] = dataclasses.field(default_factory=set)
    _pending_model: dict[int, str] = dataclasses.field(default_factory=dict)

    def apply(self, event: Event) -> None:
        """Fold one numbered event into the state."""
        self.last_seq = event.seq
        match event:
            case Text(stream_id=stream_id, delta=delta):
                self._streamed[stream_id] = self._streamed.get(stream_id, 0) + 1
                if self.depths.get(stream_id, 0) == 0:
                    self.parts.append(delta)
                if self.first_token_ms is None:
                    self.first_token_ms = round((event.ts - self.started) * 1000)
            case StreamStart(stream_id=stream_id, depth=depth):
                self.depths[stream_id] = depth
                pending = self._pending_model.pop(stream_id, None)
                if pending is not None and depth == 0:
                    self.model = pending
            case StreamEnd(stream_id=stream_id, finish_reason=reason):
                if reason and self.depths.get(stream_id, 0) == 0:
                    self.finish_reason = reason
            case TokenUsage(stream_id=stream_id):
                self._usage_seen.add(stream_id)
                if event.cost_usd is not None:
                    self.cost_usd = round((self.cost_usd or 0.0) + event.cost_usd, 10)
                if self.depths.get(stream_id, 0) == 0:
                    self.model = event.model or self.model
                self.usage.prompt_tokens += event.prompt_tokens
                self.usage.completion_tokens += event.completion_tokens
                self.usage.total_tokens += event.total_tokens
            case LlmCall(stream_id=stream_id, model=model):
                if stream_id not in self.depths:  # its stream_start follows: decide then
                    self._pending_model[stream_id] = model
                elif self.depths[stream_id] == 0:
                    self.model = model
            case ErrorEvent(error=message):
                self.error = message if self.error is None else self.error
            case Done(ok=ok, reason=reason, duration_ms=duration_ms):
                self.duration_ms = duration_ms
                if reason == "cancelled":
                    self.status = "cancelled"
                    streamed = sum(n for sid, n in self._streamed.items()
                                   if sid not in self._usage_seen)
                    self.usage.completion_tokens += streamed
                    self.usage.total_tokens += streamed
                elif reason == "interrupted":
                    self.status = "interrupted"
                else:
                    self.status = "completed" if ok else "error"
            case _:
                pass

    @property
    def content(self) -> str:
        return "".join(self.parts)

    def result(self) -> TurnResult:
        return TurnResult(
            request_id=self.request_id, conversation_id=self.conversation_id,
            status=self.status, content=self.content, model=self.model,
            finish_reason=self.finish_reason, usage=self.usage.model_copy(),
            duration_ms=self.duration_ms, first_token_ms=self.first_token_ms,
            error=self.error, last_seq=self.last_seq, cost_usd=self.cost_usd,
        )

"""A turn's input, context, running state and result."""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class ChatMessage(BaseModel):
    """One chat message; ``content`` may be OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str  # required; null (as OpenAI allows for assistant messages) reads as ""

    @field_validator("content", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError("only text content parts are supported")
                texts.append(str(part.get("text", "")))
            return "".join(texts)
        return value

    def as_openai(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


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


@dataclasses.dataclass
class TurnContext:
    """Per-turn state shared by the harnesses of one turn (created fresh by ``run``)."""

    request_id: str
    conversation_id: str
    messages: list[dict[str, str]]
    trace: bool
    model: str
    max_tokens: int | None
    kind: str
    history: list[dict[str, str]] = dataclasses.field(default_factory=list)
    route: str | None = None
    #: Tool calls the request named directly (run by the tool harness).
    tool_calls: list[ToolCallSpec] = dataclasses.field(default_factory=list)
    #: Messages the tool harness adds for the model: its calls and their results.
    tool_context: list[dict[str, Any]] = dataclasses.field(default_factory=list)
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
    duration_ms: float | None = None
    first_token_ms: float | None = None
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
    first_token_ms: float | None = None
    duration_ms: float | None = None
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
                    self.first_token_ms = round((event.ts - self.started) * 1000, 3)
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

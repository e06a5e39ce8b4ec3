"""HTTP request bodies and the JSON error shape (OpenAI's) used on every endpoint."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from core.errors import PipelineError
from core.turn import ChatMessage, ToolCallSpec

_B = TypeVar("_B", bound=BaseModel)


class ApiError(PipelineError):
    """An error answered as ``{"error": {"message", "type", "code"}}`` with ``status``
    (and ``headers``, e.g. ``Retry-After`` on a 429 or 503)."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        code: str | None = None, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


class OrchestrateRequest(BaseModel):
    """Body of ``POST /v1/orchestrate``."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=200)
    trace: StrictBool = False
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    on_disconnect: Literal["continue", "cancel"] = "continue"
    background: StrictBool = False
    tool_calls: list[ToolCallSpec] = Field(default_factory=list, max_length=64)
    #: Issue 14: see only streams this deep (0: the top level) and/or of these agents.
    max_depth: StrictInt | None = Field(default=None, ge=0)
    agents: list[str] | None = Field(default=None, max_length=64)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions``: the fields we use; others are ignored, as
    OpenAI clients send many (temperature, user, …). ``conversation_id`` is our extension
    (``extra_body`` in the ``openai`` SDK) to continue a stored conversation."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=200)


async def read_body(request: web.Request, model: type[_B]) -> _B:
    """Read and validate a JSON body; every failure is a 400 that says what was wrong."""
    raw = await request.read()  # over client_max_size → 413 via the middleware
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(400, f"invalid body: {problems}", code="invalid_body", param=where) from exc

"""HTTP request bodies and the JSON error shape (OpenAI's) used on every endpoint."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

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


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ChatTool(BaseModel):
    """A client's function tool (OpenAI's ``tools`` item)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: ToolFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    #: Accepted without effect: this server's stream has no obfuscation padding.
    include_obfuscation: StrictBool | None = None


#: Chat-completions fields sent to the model as the client gave them (null = not given).
FORWARDED_PARAMS: tuple[str, ...] = (
    "temperature", "top_p", "stop", "seed", "response_format", "logprobs", "top_logprobs",
    "user", "presence_penalty", "frequency_penalty", "logit_bias", "n", "metadata", "store",
    "service_tier", "reasoning_effort", "verbosity", "modalities", "prediction",
    "parallel_tool_calls", "tools", "tool_choice", "web_search_options", "prompt_cache_key",
    "safety_identifier", "prompt_cache_retention",
)
#: Chat-completions fields refused with a 400 that names them, and why.
REFUSED_PARAMS: dict[str, str] = {
    "audio": "audio output is not supported by this server (its stream carries text only)",
    "functions": "the legacy 'functions' parameter is not supported; send 'tools' instead",
    "function_call": "the legacy 'function_call' parameter is not supported; send 'tool_choice'",
}


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions``.

    :data:`FORWARDED_PARAMS` go to the model unchanged (after a check of their shape);
    :data:`REFUSED_PARAMS` are a 400; our extensions are ``conversation_id`` (``extra_body``
    in the ``openai`` SDK: continue a stored conversation) and ``on_disconnect``. Other
    fields are kept in ``model_extra``: forwarded or refused as ``OPENAI_WIRE_EXTRA_FIELDS``
    says."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=200)
    on_disconnect: Literal["continue", "cancel"] | None = None
    # Forwarded; checked here so a bad value is our 400, not a provider's 502.
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=128)
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    parallel_tool_calls: StrictBool | None = None
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("response_format")
    @classmethod
    def _format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ValueError("json_schema needs an object with a 'name'")
            if "schema" in spec and not isinstance(spec["schema"], dict):
                raise ValueError("json_schema.schema must be a JSON schema object")
        return value

    def forwarded(self) -> dict[str, Any]:
        """The parameters to send to the model, as given (fields sent as null left out)."""
        raw = self.model_dump(include=set(FORWARDED_PARAMS), exclude_unset=True, by_alias=True)
        extra = {k: v for k, v in (self.model_extra or {}).items() if k in FORWARDED_PARAMS}
        return {k: v for k, v in {**raw, **extra}.items() if v is not None}

    def unknown(self) -> dict[str, Any]:
        """Fields no one here knows (vendor extras), by name."""
        return {k: v for k, v in (self.model_extra or {}).items()
                if k not in FORWARDED_PARAMS and k not in REFUSED_PARAMS}


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

"""HTTP request bodies and the JSON error shape (OpenAI's) used on every endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable
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
_T = TypeVar("_T")


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


@dataclasses.dataclass(frozen=True, slots=True)
class BodyLimits:
    """What :func:`read_body` refuses (the door settings; ``create_app`` puts them under
    :data:`BODY_LIMITS`)."""

    max_messages: int = 2048
    max_json_depth: int = 64
    body_timeout_s: float = 30.0


BODY_LIMITS = web.AppKey("body_limits", BodyLimits)
#: Bodies larger than this are parsed and validated on a worker thread, not on the loop.
OFFLOAD_BYTES = 64 * 1024
#: Keys whose string values are identifiers (ids, models, tool and panelist names): no
#: control characters in them, anywhere in a body (``tool_calls[].name``, ``panelists[].model``…).
ID_KEYS = frozenset({"conversation_id", "session_id", "sessionId", "response_id", "request_id",
                     "previous_response_id", "model", "provider", "name", "tool",
                     "execution_id"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _surrogate(text: str) -> bool:
    """True when ``text`` holds a lone surrogate (it cannot be encoded as UTF-8)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _where(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path) or "body"


def check_text(text: str, *, field: str, identifier: bool = False) -> None:
    """Refuse (400 naming ``field``) a string with a lone surrogate, or, for an
    identifier, with a control character (CR, LF, NUL, ESC, …)."""
    if _surrogate(text):
        raise ApiError(400, f"{field}: the text holds a lone surrogate (not valid Unicode)",
                       code="invalid_text", param=field)
    if identifier and _CONTROL.search(text):
        raise ApiError(400, f"{field}: control characters are not allowed in an identifier",
                       code="invalid_identifier", param=field)


def check_json(data: Any, *, max_depth: int) -> None:
    """Walk a parsed JSON value (without recursion): nesting at most ``max_depth``, no lone
    surrogate in any string or key, no control character in identifiers (:data:`ID_KEYS`).

    Raises:
        ApiError: 400 naming the field.
    """
    stack: list[tuple[Any, tuple[str | int, ...], bool]] = [(data, (), False)]
    while stack:
        value, path, identifier = stack.pop()
        if isinstance(value, str):
            check_text(value, field=_where(path), identifier=identifier)
        elif isinstance(value, dict | list):
            if len(path) >= max_depth:
                where = _where(path[:8]) + ("…" if len(path) > 8 else "")
                raise ApiError(400, f"{where}: JSON nested deeper than {max_depth} levels "
                               "(MAX_JSON_DEPTH)", code="invalid_json", param=where)
            if isinstance(value, dict):
                for key, item in value.items():
                    check_text(key, field=_where((*path, key)))
                    stack.append((item, (*path, key), key in ID_KEYS))
            else:
                stack.extend((item, (*path, index), False) for index, item in enumerate(value))


def parse_json(raw: bytes | str, validate: Callable[[Any], _T], *, limits: BodyLimits) -> _T:
    """Decode, check (:func:`check_json`, the message cap) and ``validate`` one JSON object
    (e.g. ``Model.model_validate``); every failure is an :class:`ApiError` 400 that says
    what was wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, f"body is not valid JSON: nested deeper than {limits.max_json_depth}"
                       " levels (MAX_JSON_DEPTH)", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object", code="invalid_body")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise ApiError(400, f"messages: {len(messages)} messages; the limit is "
                       f"{limits.max_messages} (MAX_MESSAGES)", code="too_many_messages",
                       param="messages")
    check_json(data, max_depth=limits.max_json_depth)
    try:
        return validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(400, f"invalid body: {problems}", code="invalid_body", param=where) from exc


async def read_body(request: web.Request, model: type[_B]) -> _B:
    """Read and validate a JSON body; every failure is a 400 that says what was wrong.

    A body over ``MAX_BODY_BYTES`` is a 413 (announced ones before a byte is read, in the
    door middleware); one that does not arrive within ``BODY_TIMEOUT_S`` a 408. Large
    bodies are parsed on a worker thread so the event loop keeps serving others.
    """
    limits = request.app.get(BODY_LIMITS) or BodyLimits()
    try:  # over client_max_size → 413 via the middleware
        async with asyncio.timeout(limits.body_timeout_s):  # (no task, as wait_for makes)
            raw = await request.read()
    except TimeoutError as exc:
        raise ApiError(408, f"the body did not arrive within {limits.body_timeout_s:g}s "
                       "(BODY_TIMEOUT_S)", code="body_timeout", headers={"Connection": "close"}
                       ) from exc
    if len(raw) > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_json, raw, model.model_validate, limits=limits)
    return parse_json(raw, model.model_validate, limits=limits)

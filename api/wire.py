"""HTTP request bodies and the JSON error shape (OpenAI's) used on every endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


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
ID_KEYS = frozenset({"conversation_id", "session_id", "response_id", "request_id", "model",
                     "name", "tool", "execution_id"})
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
        raw = await asyncio.wait_for(request.read(), limits.body_timeout_s)
    except TimeoutError as exc:
        raise ApiError(408, f"the body did not arrive within {limits.body_timeout_s:g}s "
                       "(BODY_TIMEOUT_S)", code="body_timeout", headers={"Connection": "close"}
                       ) from exc
    if len(raw) > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse_json, raw, model.model_validate, limits=limits)
    return parse_json(raw, model.model_validate, limits=limits)

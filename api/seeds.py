"""The seeds' own wires (issue 14), each one operator over the same turn:

* ``POST /chat/stream`` (seed 003): body ``{message, session_id?, model?, provider?,
  tool_calls?}``; SSE ``data:`` lines holding exactly the seed's objects
  (:func:`operators.to_seed_frames`), ``{"type":"end","reason":…}`` last. ``session_id`` is
  the conversation; ``provider`` + ``model`` name ``provider/model``.
* ``POST /api/chat/stream`` (seed 001): body ``{"sessionId", "content"}``; ``data: <Turn
  JSON>`` per update (:func:`operators.turn_updates`: ``status`` and the ``content`` so
  far), the last one ``complete`` (or ``error``/``cancelled``).

Both are ordinary turns: recorded, and replayable natively with
``GET /v1/requests/{id}/events`` (``X-Request-Id`` names it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from api.common import (
    CLIENTS,
    COORDINATOR,
    ORCHESTRATOR,
    REGISTRY,
    SETTINGS,
    _last_words,
    _turn_headers,
    admit,
    check_model,
)
from api.wire import ApiError, read_body
from core.errors import BufferOverflowError
from core.turn import ChatMessage, ToolCallSpec, TurnInput
from operators import to_seed_frames
from sinks.sse import FrameWriter, json_frame, open_sse

log = logging.getLogger(__name__)


class ChatStreamRequest(BaseModel):
    """Body of ``POST /chat/stream`` (seed 003)."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1)
    session_id: str | None = Field(default=None, min_length=1, max_length=200)
    model: str | None = Field(default=None, min_length=1)
    provider: str | None = Field(default=None, min_length=1)
    tool_calls: list[ToolCallSpec] = Field(default_factory=list, max_length=64)


class ApiChatStreamRequest(BaseModel):
    """Body of ``POST /api/chat/stream`` (seed 001)."""

    model_config = ConfigDict(extra="forbid")

    sessionId: str | None = Field(default=None, min_length=1, max_length=200)
    content: str = Field(min_length=1)


def _model(request: web.Request, body: ChatStreamRequest) -> str:
    if body.provider is None:
        return check_model(request, body.model)
    registry = request.app[REGISTRY]
    entry = registry.entries.get(body.provider)
    if entry is None:
        raise ApiError(404, f"no provider {body.provider!r}; providers: "
                       + ", ".join(registry.entries), code="model_not_found", param="provider")
    model = body.model or (entry.models[0] if entry.models else "")
    return check_model(request, f"{body.provider}/{model}")


async def chat_stream(request: web.Request) -> web.StreamResponse:
    """``POST /chat/stream`` (seed 003)."""
    body = await read_body(request, ChatStreamRequest)
    admit(request)
    model = _model(request, body)
    limit = request.app[SETTINGS].max_tool_calls_per_step
    if len(body.tool_calls) > limit:
        raise ApiError(400, f"tool_calls: {len(body.tool_calls)} calls; the limit is {limit} "
                       "(MAX_TOOL_CALLS_PER_STEP)", code="invalid_body", param="tool_calls")
    turn = request.app[ORCHESTRATOR].run(TurnInput(
        messages=[ChatMessage(role="user", content=body.message)],
        conversation_id=body.session_id, model=model, kind="chat.stream",
        tool_calls=body.tool_calls,
    ))
    settings = request.app[SETTINGS]
    frames = turn.view(to_seed_frames(), max_buffer=settings.client_buffer_events)
    return await _stream_data(request, frames, headers=_turn_headers(turn))


async def api_chat_stream(request: web.Request) -> web.StreamResponse:
    """``POST /api/chat/stream`` (seed 001)."""
    body = await read_body(request, ApiChatStreamRequest)
    admit(request)
    handle = await request.app[COORDINATOR].stream_request(body.sessionId, body.content)
    updates = _dumped(handle.updates)
    return await _stream_data(request, updates, headers={
        "X-Request-Id": handle.response_id, "X-Conversation-Id": handle.session_id})


async def _dumped(updates: AsyncGenerator[Any]) -> AsyncGenerator[dict[str, Any]]:
    async with contextlib.aclosing(updates) as source:
        async for update in source:
            yield update.model_dump(mode="json")


async def _stream_data(
    request: web.Request, items: AsyncGenerator[dict[str, Any]], *, headers: dict[str, str],
) -> web.StreamResponse:
    """``data: <JSON>`` per item; a client that falls behind or blocks gets a final error
    object and is cut off (the turn runs on and is recorded)."""
    app = request.app
    settings = app[SETTINGS]
    response = await open_sse(request, headers=headers)
    writer = FrameWriter(request, response, timeout_s=settings.client_write_timeout_s)
    app[CLIENTS].open += 1
    try:
        async with contextlib.aclosing(items) as source:
            async for item in source:
                await writer.write(json_frame(item))
    except (BufferOverflowError, TimeoutError) as exc:
        app[CLIENTS].cut_off += 1
        await _last_words(response, json_frame(
            {"type": "error", "error": str(exc) or "client too slow"}))
    except ConnectionResetError:
        pass  # the client left; the turn runs on and is recorded
    except Exception:
        log.exception("seed stream %s failed", request.path)
        await _last_words(response, json_frame(
            {"type": "error", "error": "internal server error"}))
    finally:
        app[CLIENTS].open -= 1
    return response

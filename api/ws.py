"""The WebSocket wire ``/v1/ws`` (seed 001's SessionCoordinator over a socket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Annotated, Literal

from aiohttp import WSMessage, WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from api.cluster import cancel_elsewhere, wait_registered
from api.common import (
    COORDINATOR,
    ORCHESTRATOR,
    SETTINGS,
    admit,
    check_model,
)
from api.wire import BODY_LIMITS, ApiError, BodyLimits, parse_json
from core.errors import BufferOverflowError
from pipeline.sessions import SessionCoordinator, TurnFailedError
from sinks.cluster import RemoteCancelError
from sinks.sse import frame_json

log = logging.getLogger(__name__)


class WsChat(BaseModel):
    """A ``chat`` message on ``/v1/ws``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["chat"]
    content: str = Field(min_length=1)
    session_id: str | None = Field(default=None, min_length=1, max_length=200)
    model: str | None = None


class WsCancel(BaseModel):
    """A ``cancel`` message on ``/v1/ws``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]
    response_id: str


_WS_MESSAGE: TypeAdapter[WsChat | WsCancel] = TypeAdapter(
    Annotated[WsChat | WsCancel, Field(discriminator="type")]
)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """``/v1/ws``: ``{"type": "chat", "content", "session_id"?}`` starts a turn; the socket
    gets ``response_id``, then ``update`` frames, then ``complete``. ``{"type": "cancel",
    "response_id"}`` cancels. Bad messages (invalid JSON or fields, binary frames, a cancel
    of an id that is not running, a refusal at the door) get an ``error`` frame; the socket
    stays open.
    Closing the socket abandons the updates; the turns run on."""
    app = request.app
    ws = web.WebSocketResponse(heartbeat=app[SETTINGS].heartbeat_s,
                               max_msg_size=app[SETTINGS].max_body_bytes)
    await ws.prepare(request)
    chats: set[asyncio.Task[None]] = set()
    try:
        async for message in ws:
            if message.type == WSMsgType.ERROR:  # e.g. over max_msg_size: aiohttp closes it
                break
            try:
                parsed = _ws_message(request, message)
                if isinstance(parsed, WsChat):
                    check_model(request, parsed.model)
                    admit(request)
                else:
                    await _cancel(app, parsed)
                    continue
            except ApiError as exc:
                await ws.send_json({"type": "error", **exc.body()}, dumps=frame_json)
                continue
            task = asyncio.create_task(_ws_chat(ws, app[COORDINATOR], parsed, app=app))
            chats.add(task)
            task.add_done_callback(_ws_chat_ended(chats))
    finally:
        for task in chats:  # tasks made in a handler are not cancelled with it
            task.cancel()
        await asyncio.gather(*chats, return_exceptions=True)
    return ws


async def _cancel(app: web.Application, cancel: WsCancel) -> None:
    """Cancel a running turn: here, or through its owner when another worker runs it
    (issue 13); a turn running nowhere is a 404, an owner out of reach a 503."""
    turn = app[ORCHESTRATOR].live.get(cancel.response_id)
    if turn is not None:
        turn.cancel()
        return
    try:
        forwarded = await cancel_elsewhere(app, cancel.response_id)
    except RemoteCancelError as exc:
        raise ApiError(503, str(exc), type="server_error", code="owner_unreachable") from exc
    if forwarded is None or not forwarded.get("cancelled"):
        raise ApiError(404, f"no running response {cancel.response_id!r} to cancel",
                       code="response_not_found", param="response_id")


def _ws_message(request: web.Request, message: WSMessage) -> WsChat | WsCancel:
    """One client message, checked like a request body (:func:`api.wire.parse_json`);
    anything but a text frame is refused."""
    if message.type != WSMsgType.TEXT:
        raise ApiError(400, f"only text frames with JSON messages are accepted, got "
                       f"{message.type.name.lower()}", code="invalid_message")
    limits = request.app.get(BODY_LIMITS) or BodyLimits()
    try:
        return parse_json(message.data, _WS_MESSAGE.validate_python, limits=limits)
    except ApiError as exc:
        raise ApiError(400, exc.message.replace("body", "message", 1), code="invalid_message",
                       param=exc.param) from exc


def _ws_chat_ended(chats: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def ended(task: asyncio.Task[None]) -> None:
        chats.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # e.g. the socket closed under a send: the turn is unaffected and recorded.
            log.info("websocket chat ended early: %r", task.exception())

    return ended


async def _ws_chat(ws: web.WebSocketResponse, coordinator: SessionCoordinator, chat: WsChat,
                   *, app: web.Application | None = None) -> None:
    handle = await coordinator.stream_request(chat.session_id, chat.content, model=chat.model)
    if app is not None:  # the response id works on every worker once it is sent (issue 13)
        await wait_registered(app, handle.response_id)
    await ws.send_json({"type": "response_id", "response_id": handle.response_id,
                        "session_id": handle.session_id}, dumps=frame_json)
    note: str | None = None
    try:
        async with contextlib.aclosing(handle.updates) as updates:
            async for update in updates:
                await ws.send_json({"type": "update", "turn": update.model_dump(mode="json")},
                                  dumps=frame_json)
    except BufferOverflowError as exc:  # this socket fell behind; the turn went on
        note = f"{exc}; GET /v1/requests/{handle.response_id} for the round"
    try:
        result = await handle.completion
        status, error = result.status, note
    except TurnFailedError as exc:
        status, error = exc.result.status, exc.result.error or note
    await ws.send_json({"type": "complete", "response_id": handle.response_id,
                        "status": status, "error": error}, dumps=frame_json)




"""Shared by every wire: the app keys, JSON errors in OpenAI's shape, model checks,
cursors, and the native SSE writer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from api.wire import ApiError
from core.config import Settings
from core.errors import BufferOverflowError
from core.events import Event
from pipeline.offline_model import OfflineModelServer
from pipeline.orchestrator import StreamingOrchestrator, Turn
from pipeline.providers import OpenAIProvider
from pipeline.sessions import SessionCoordinator
from pipeline.tools import ToolRegistry
from sinks.event_log import RedisEventLog
from sinks.sse import comment_frame, event_frame, open_sse, retry_frame
from sinks.store import EventStore

log = logging.getLogger(__name__)


ROUNDTABLE_MODEL = "roundtable"
WEB_ROOT = Path(__file__).resolve().parent.parent / "sinks" / "web"

@dataclasses.dataclass
class ClientStats:
    """Open SSE streams, and how many clients were cut off for falling behind."""

    open: int = 0
    cut_off: int = 0

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", EventStore)
PROVIDER = web.AppKey("provider", OpenAIProvider)
MODELS: web.AppKey[list[str]] = web.AppKey("models")
ORCHESTRATOR = web.AppKey("orchestrator", StreamingOrchestrator)
OFFLINE = web.AppKey("offline", OfflineModelServer)
CLIENTS = web.AppKey("clients", ClientStats)
COORDINATOR = web.AppKey("coordinator", SessionCoordinator)
TOOLS = web.AppKey("tools", ToolRegistry)
EVENT_LOG = web.AppKey("event_log", RedisEventLog)  # only with EVENT_LOG=redis://… (issue 13)



# -- errors: JSON in OpenAI's shape on every endpoint ----------------------------------
@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[SETTINGS].max_body_bytes
        error = ApiError(413, f"request body over the limit of {limit} bytes (MAX_BODY_BYTES)",
                         code="body_too_large")
        return web.json_response(error.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        error = ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code)
        return web.json_response(error.body(), status=exc.status, headers=_allow(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        error = ApiError(500, "internal server error", type="server_error", code="internal")
        return web.json_response(error.body(), status=500)


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def admit(request: web.Request) -> None:
    """Refuse a new turn at the door, before anything starts, when the server cannot take it.

    Every handler that starts a turn calls this first (orchestrate, roundtable, chat
    completions, the WebSocket's chat). Raises :class:`ApiError` (a 4xx/503).
    """


def check_model(request: web.Request, model: str | None) -> str:
    """The model to use; an unknown one is a 404 ``model_not_found``."""
    settings = request.app[SETTINGS]
    chosen = model or settings.default_model
    if chosen not in request.app[MODELS]:
        raise ApiError(404, f"The model {chosen!r} does not exist; GET /v1/models lists them.",
                       code="model_not_found", param="model")
    return chosen



async def stream_native(
    request: web.Request, events: AsyncGenerator[Event | None], *, headers: dict[str, str],
    on_written: Callable[[int], None] | None = None,
    on_disconnect: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Write native SSE frames: ``retry:`` advice and a comment at once, then the events,
    and a comment heartbeat for each ``None`` in ``events`` (a live turn's iterator yields
    one per ``HEARTBEAT_S`` of silence: ``turn.events(idle_s=...)``).

    A client that falls more than ``CLIENT_BUFFER_EVENTS`` behind, or whose writes block
    for ``CLIENT_WRITE_TIMEOUT_S``, gets a final comment and is disconnected; it resumes
    from its last event id without loss. The producer never waits for a client.
    ``on_disconnect`` runs when the client goes away first (the handler is cancelled, or a
    write finds the connection closed); a client leaving is normal, not an error.
    """
    app = request.app
    settings = app[SETTINGS]
    response = await open_sse(request, headers=headers)
    app[CLIENTS].open += 1
    try:
        await response.write(retry_frame(settings.sse_retry_ms) + comment_frame("stream open"))
        async with contextlib.aclosing(events) as source:
            async for event in source:
                frame = comment_frame("keep-alive") if event is None else event_frame(event)
                await asyncio.wait_for(response.write(frame), settings.client_write_timeout_s)
                if on_written is not None and event is not None:
                    on_written(event.seq)
    except BufferOverflowError as exc:
        app[CLIENTS].cut_off += 1
        await _last_words(response, comment_frame(f"{exc}; reconnect with Last-Event-ID to resume"))
    except TimeoutError:
        app[CLIENTS].cut_off += 1
        log.warning("cut off a client whose writes blocked for %.0fs", settings.client_write_timeout_s)
    except ConnectionResetError:  # the write found the client gone (wait_for re-raises it)
        if on_disconnect is not None:
            on_disconnect()
    except asyncio.CancelledError:  # handler_cancellation: the client dropped the connection
        if on_disconnect is not None:
            on_disconnect()
        raise
    except Exception:
        # The stream has started: a JSON error response can no longer be sent. Say so in a
        # comment and end the stream; the client resumes from its last id.
        log.exception("native stream %s failed", request.path)
        await _last_words(response, comment_frame("server error; reconnect with Last-Event-ID"))
    finally:
        app[CLIENTS].open -= 1
    return response


async def _last_words(response: web.StreamResponse, frame: bytes) -> None:
    """A final frame for a client that may already be gone (never blocks long, never raises)."""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        await asyncio.wait_for(response.write(frame), 1.0)



def parse_cursor(request: web.Request) -> int:
    """The client's cursor: the larger of ``since_seq`` and ``Last-Event-ID``; 0 = all.

    The larger wins because an EventSource opened on ``…?since_seq=N`` keeps that URL and
    sends its progress as ``Last-Event-ID`` on every reconnect.
    """
    cursor = 0
    for name, raw in (("since_seq", request.query.get("since_seq")),
                      ("Last-Event-ID", request.headers.get("Last-Event-ID"))):
        if raw is None or raw == "":
            continue
        text = raw
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise ApiError(400, f"{name} must be a non-negative integer, got {raw[:40]!r}",
                           code="invalid_cursor", param=name)
        cursor = max(cursor, int(text))
    return cursor


def parse_flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false, got {raw!r}", code="invalid_query",
                       param=name)
    return raw in ("true", "1")



def _accepted(turn: Turn) -> web.Response:
    """``202``: the turn runs on; follow it with its events URL (``background: true``)."""
    return web.json_response(
        {"request_id": turn.request_id, "conversation_id": turn.conversation_id,
         "status": "running", "events_url": f"/v1/requests/{turn.request_id}/events"},
        status=202, headers=_turn_headers(turn),
    )


def _turn_headers(turn: Turn) -> dict[str, str]:
    return {"X-Request-Id": turn.request_id, "X-Conversation-Id": turn.conversation_id}




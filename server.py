"""The HTTP server: native SSE, OpenAI-compatible endpoints, health; graceful stop.

Run ``python server.py --host 127.0.0.1 --port 8080 --db ./data/events.duckdb``; every
setting also comes from the environment (see :class:`pipeline.config.Settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from reactivex import compose

from operators import ChatChunk, resume_after, to_chat_chunks, visible
from pipeline.config import Settings
from pipeline.errors import BufferOverflowError
from pipeline.events import Event, is_trace
from pipeline.harnesses import MemoryHarness
from pipeline.offline_model import OfflineModelServer
from pipeline.orchestrator import StreamingOrchestrator, Turn
from pipeline.providers import OpenAIProvider
from pipeline.roundtable import Pacer, Panelist, RoundtableHarness, RoundtableRequest, panel_names
from pipeline.sessions import SessionCoordinator, TurnFailedError
from pipeline.tools import ToolRegistry, build_registry, speech_provider_info
from pipeline.turn import TurnInput
from pipeline.wire import ApiError, ChatCompletionRequest, OrchestrateRequest, read_body
from sinks.analytics_http import ANALYTICS, Analytics, add_analytics_routes
from sinks.recovery import recover_interrupted
from sinks.sse import DONE_FRAME, comment_frame, data_frame, event_frame, open_sse, retry_frame
from sinks.store import EventStore

log = logging.getLogger("server")

ROUNDTABLE_MODEL = "roundtable"
WEB_ROOT = Path(__file__).resolve().parent / "sinks" / "web"

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



# -- errors: JSON in OpenAI's shape on every endpoint ----------------------------------
@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
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


def check_model(request: web.Request, model: str | None) -> str:
    """The model to use; an unknown one is a 404 ``model_not_found``."""
    settings = request.app[SETTINGS]
    chosen = model or settings.default_model
    if chosen not in request.app[MODELS]:
        raise ApiError(404, f"The model {chosen!r} does not exist; GET /v1/models lists them.",
                       code="model_not_found", param="model")
    return chosen


# -- handlers -------------------------------------------------------------------------
async def orchestrate(request: web.Request) -> web.StreamResponse:
    """``POST /v1/orchestrate``: run a turn and stream its native SSE frames.

    With ``background: true`` the answer is ``202`` at once and the turn runs on; follow it
    with ``GET /v1/requests/{id}/events``.
    """
    body = await read_body(request, OrchestrateRequest)
    model = check_model(request, body.model)
    limit = request.app[SETTINGS].max_tool_calls_per_step
    if len(body.tool_calls) > limit:
        raise ApiError(400, f"tool_calls: {len(body.tool_calls)} calls; the limit is {limit} "
                       "(MAX_TOOL_CALLS_PER_STEP)", code="invalid_body", param="tool_calls")
    turn = request.app[ORCHESTRATOR].run(TurnInput(
        messages=body.messages, conversation_id=body.conversation_id, trace=body.trace,
        model=model, max_tokens=body.max_tokens, kind="orchestrate", tool_calls=body.tool_calls,
    ))
    if body.background:
        return _accepted(turn)
    settings = request.app[SETTINGS]
    events = turn.events(trace=body.trace, max_buffer=settings.client_buffer_events,
                         idle_s=settings.heartbeat_s)
    return await stream_native(
        request, events, headers=_turn_headers(turn),
        on_disconnect=turn.cancel if body.on_disconnect == "cancel" else None,
    )


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


def start_roundtable(app: web.Application, spec: RoundtableRequest, *, kind: str,
                     paced: bool) -> tuple[Turn, Pacer]:
    """Validate a roundtable against the limits and models, then start it."""
    settings = app[SETTINGS]
    if spec.rounds > settings.roundtable_max_rounds:
        raise ApiError(400, f"rounds must be at most {settings.roundtable_max_rounds} "
                            "(ROUNDTABLE_MAX_ROUNDS)", code="invalid_body", param="rounds")
    if len(spec.panelists) > settings.roundtable_max_panelists:
        raise ApiError(400, f"at most {settings.roundtable_max_panelists} panelists "
                            "(ROUNDTABLE_MAX_PANELISTS)", code="invalid_body", param="panelists")
    for panelist in spec.panelists:
        model = panelist.model or settings.default_model
        if model not in app[MODELS] or model == ROUNDTABLE_MODEL:
            raise ApiError(404, f"panelist {panelist.name!r}: the model {model!r} does not "
                                "exist; GET /v1/models lists them.",
                           code="model_not_found", param="panelists")
    pacer = Pacer(window=settings.roundtable_window, paced=paced)
    harness = RoundtableHarness(
        provider=app[PROVIDER], spec=spec, pacer=pacer,
        memory=MemoryHarness(app[STORE], limit=settings.history_max_messages),
        max_buffer_per_panelist=settings.roundtable_max_queue,
    )
    turn = app[ORCHESTRATOR].run(
        TurnInput(messages=spec.opening_messages(), conversation_id=spec.conversation_id,
                  trace=spec.trace, max_tokens=spec.max_tokens, kind=kind),
        body=harness.body,
    )
    return turn, pacer


async def roundtable(request: web.Request) -> web.StreamResponse:
    """``POST /v1/roundtable``: several panelists in one native stream (see
    :mod:`pipeline.roundtable`). The posting client paces the panel: when it reads slower
    than the panel speaks, panelists' events are released round-robin."""
    body = await read_body(request, RoundtableRequest)
    turn, pacer = start_roundtable(request.app, body, kind="roundtable",
                                   paced=not body.background)
    if body.background:
        return _accepted(turn)
    # The client paces the panel by what it has consumed, hidden trace events included:
    # credit spent on an llm_call it never sees must come back, or the panel would stall.
    settings = request.app[SETTINGS]
    everything = turn.events(trace=True, max_buffer=settings.client_buffer_events,
                             idle_s=settings.heartbeat_s)
    events = _acking_hidden(everything, trace=body.trace, ack=pacer.ack)
    try:
        return await stream_native(
            request, events, headers=_turn_headers(turn), on_written=pacer.ack,
            on_disconnect=turn.cancel if body.on_disconnect == "cancel" else None,
        )
    finally:
        pacer.unlimited()  # the pacing client is gone: the panel must never wait for it


async def _acking_hidden(
    events: AsyncGenerator[Event | None], *, trace: bool, ack: Callable[[int], None]
) -> AsyncGenerator[Event | None]:
    """The client's view of ``events``; trace events it does not see are acknowledged
    as consumed when they pass (idle marks pass through)."""
    async with contextlib.aclosing(events) as source:
        async for event in source:
            if event is None or trace or not is_trace(event):
                yield event
            else:
                ack(event.seq)


async def index_page(request: web.Request) -> web.FileResponse:
    """``GET /``: the roundtable viewer (no build step)."""
    return web.FileResponse(WEB_ROOT / "index.html")


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


async def request_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/requests/{id}/events``: every event after the cursor, then the live tail.

    A cursor at or past the end of a finished request gets ``204 No Content``.

    A live turn is followed through its hot stream, which replays what the client missed
    before the live events, so nothing is lost or repeated while the store writes in
    batches. A finished request (also after a restart) is read from the store.
    """
    request_id = request.match_info["request_id"]
    since = parse_cursor(request)
    trace = parse_flag(request, "trace")
    app = request.app
    turn = app[ORCHESTRATOR].live.get(request_id)
    events: AsyncGenerator[Event | None]
    if turn is not None:
        events = turn.view(
            compose(resume_after(since), visible(trace=trace)),
            max_buffer=app[SETTINGS].client_buffer_events, idle_s=app[SETTINGS].heartbeat_s,
        )
    else:
        store = app[STORE]
        await store.flush()  # a turn that just finished may still be queued
        row = await store.request_row(request_id)
        if row is None:
            raise ApiError(404, f"no request {request_id!r}", code="request_not_found")
        if since and row["last_seq"] is not None and since >= row["last_seq"]:
            # Finished and fully seen: 204 tells EventSource to stop reconnecting.
            return web.Response(status=204, headers={"X-Request-Id": request_id})
        events = _stored(store, request_id, since, trace=trace)
    return await stream_native(request, events, headers={"X-Request-Id": request_id})


async def _stored(
    store: EventStore, request_id: str, since: int, *, trace: bool
) -> AsyncGenerator[Event | None]:
    async for event in store.events_since(request_id, since):
        if trace or not is_trace(event):
            yield event


async def request_status(request: web.Request) -> web.Response:
    """``GET /v1/requests/{id}``: status and the round (request, messages, usage, timings)."""
    request_id = request.match_info["request_id"]
    round_ = await request.app[COORDINATOR].get_round(request_id)
    if round_ is None:
        raise ApiError(404, f"no request {request_id!r}", code="request_not_found")
    return web.json_response(round_.model_dump(mode="json"))


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
    "response_id"}`` cancels. Bad messages get an ``error`` frame; the socket stays open.
    Closing the socket abandons the updates; the turns run on."""
    app = request.app
    ws = web.WebSocketResponse(heartbeat=app[SETTINGS].heartbeat_s,
                               max_msg_size=app[SETTINGS].max_body_bytes)
    await ws.prepare(request)
    chats: set[asyncio.Task[None]] = set()
    try:
        async for message in ws:
            if message.type != web.WSMsgType.TEXT:
                continue
            try:
                parsed = _WS_MESSAGE.validate_json(message.data)
                if isinstance(parsed, WsChat):
                    check_model(request, parsed.model)
            except ValidationError as exc:
                await ws.send_json({"type": "error", **ApiError(
                    400, f"invalid message: {exc.errors()[0]['msg']}", code="invalid_message",
                ).body()})
                continue
            except ApiError as exc:
                await ws.send_json({"type": "error", **exc.body()})
                continue
            if isinstance(parsed, WsCancel):
                turn = app[ORCHESTRATOR].live.get(parsed.response_id)
                if turn is not None:
                    turn.cancel()
                continue
            task = asyncio.create_task(_ws_chat(ws, app[COORDINATOR], parsed))
            chats.add(task)
            task.add_done_callback(_ws_chat_ended(chats))
    finally:
        for task in chats:  # tasks made in a handler are not cancelled with it
            task.cancel()
        await asyncio.gather(*chats, return_exceptions=True)
    return ws


def _ws_chat_ended(chats: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def ended(task: asyncio.Task[None]) -> None:
        chats.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # e.g. the socket closed under a send: the turn is unaffected and recorded.
            log.info("websocket chat ended early: %r", task.exception())

    return ended


async def _ws_chat(ws: web.WebSocketResponse, coordinator: SessionCoordinator, chat: WsChat) -> None:
    handle = await coordinator.stream_request(chat.session_id, chat.content, model=chat.model)
    await ws.send_json({"type": "response_id", "response_id": handle.response_id,
                        "session_id": handle.session_id})
    note: str | None = None
    try:
        async with contextlib.aclosing(handle.updates) as updates:
            async for update in updates:
                await ws.send_json({"type": "update", "turn": update.model_dump(mode="json")})
    except BufferOverflowError as exc:  # this socket fell behind; the turn went on
        note = f"{exc}; GET /v1/requests/{handle.response_id} for the round"
    try:
        result = await handle.completion
        status, error = result.status, note
    except TurnFailedError as exc:
        status, error = exc.result.status, exc.result.error or note
    await ws.send_json({"type": "complete", "response_id": handle.response_id,
                        "status": status, "error": error})


async def request_cancel(request: web.Request) -> web.Response:
    """``POST /v1/requests/{id}/cancel``: stop a running turn, keeping its partial answer."""
    request_id = request.match_info["request_id"]
    app = request.app
    turn = app[ORCHESTRATOR].live.get(request_id)
    if turn is not None:
        turn.cancel()
        result = await turn.result
        return web.json_response({"request_id": request_id, "cancelled": True,
                                  "status": result.status, "last_seq": result.last_seq})
    await app[STORE].flush()
    row = await app[STORE].request_row(request_id)
    if row is None:
        raise ApiError(404, f"no request {request_id!r}", code="request_not_found")
    return web.json_response({
        "request_id": request_id, "cancelled": False, "status": row["status"],
        "message": f"the request already ended ({row['status']}); nothing to cancel",
    })


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the same orchestrator, OpenAI's wire.

    The model ``roundtable`` runs the configured panel (``ROUNDTABLE_PANEL``): choice 0 is
    the moderator, choice *i* the *i*-th panelist, so each panelist's text is rebuilt from
    ``choice.index``.
    """
    body = await read_body(request, ChatCompletionRequest)
    app = request.app
    settings = app[SETTINGS]
    max_tokens = body.max_tokens or body.max_completion_tokens
    choices: dict[str, int] = {}
    if body.model == ROUNDTABLE_MODEL:
        spec = RoundtableRequest(
            messages=body.messages, rounds=settings.roundtable_rounds, max_tokens=max_tokens,
            panelists=[Panelist(name=name) for name in settings.roundtable_panel],
            conversation_id=body.conversation_id,
        )
        turn, _ = start_roundtable(app, spec, kind="chat.completions", paced=False)
        choices = {name: index for index, name in enumerate(panel_names(spec), start=1)}
        model = ROUNDTABLE_MODEL
    else:
        model = check_model(request, body.model)
        turn = app[ORCHESTRATOR].run(TurnInput(
            messages=body.messages, conversation_id=body.conversation_id, model=model,
            max_tokens=max_tokens, kind="chat.completions",
        ))
    completion_id = f"chatcmpl-{turn.request_id.removeprefix('req_')}"
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    to_chunks = to_chat_chunks(
        completion_id=completion_id, model=model, created=created,
        include_usage=include_usage or not body.stream, choices=choices,
    )
    if not body.stream:
        # The whole answer is the fold of the chunks a streaming client would get, so
        # streamed and not streamed always agree.
        result = await turn.result
        if result.status == "error":
            raise ApiError(502, result.error or "the model call failed", type="upstream_error",
                           code="provider_error")
        chunks: list[ChatChunk] = []
        turn.stream.pipe(to_chunks).subscribe(chunks.append)
        return web.json_response(completion_of(chunks), headers=_turn_headers(turn))
    response = await open_sse(request, headers=_turn_headers(turn))
    settings = request.app[SETTINGS]
    app[CLIENTS].open += 1
    try:
        async with contextlib.aclosing(
            turn.view(to_chunks, max_buffer=settings.client_buffer_events)
        ) as stream:
            async for chunk in stream:
                frame = data_frame(json.dumps(chunk, separators=(",", ":")))
                await asyncio.wait_for(response.write(frame), settings.client_write_timeout_s)
        await asyncio.wait_for(response.write(DONE_FRAME), settings.client_write_timeout_s)
    except (BufferOverflowError, TimeoutError) as exc:
        app[CLIENTS].cut_off += 1
        error = ApiError(500, str(exc) or "client too slow", type="server_error",
                         code="client_too_slow")
        await _last_words(response, data_frame(json.dumps(error.body())))
    except ConnectionResetError:
        pass  # the client left; the turn runs on and is recorded
    except Exception:
        log.exception("chat completion stream %s failed", turn.request_id)
        error = ApiError(500, "internal server error", type="server_error", code="internal")
        await _last_words(response, data_frame(json.dumps(error.body())))
    finally:
        app[CLIENTS].open -= 1
    return response


def completion_of(chunks: list[ChatChunk]) -> dict[str, Any]:
    """Fold ``chat.completion.chunk`` objects into one ``chat.completion``."""
    first = chunks[0]
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    usage: Any = None
    for chunk in chunks:
        if "error" in chunk:  # the turn failed part-way (e.g. a panelist, then a cancel)
            error = chunk["error"]
            raise ApiError(502, str(error.get("message", "the turn failed")),
                           type="upstream_error", code="provider_error")
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            index = choice["index"]
            texts.setdefault(index, []).append(choice["delta"].get("content") or "")
            finish[index] = choice["finish_reason"] or finish.get(index)
    return {
        "id": first["id"], "object": "chat.completion", "created": first["created"],
        "model": first["model"],
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": "".join(parts)},
             "finish_reason": finish[index] or "stop", "logprobs": None}
            for index, parts in sorted(texts.items())
        ],
        "usage": usage,
    }


def _accepted(turn: Turn) -> web.Response:
    """``202``: the turn runs on; follow it with its events URL (``background: true``)."""
    return web.json_response(
        {"request_id": turn.request_id, "conversation_id": turn.conversation_id,
         "status": "running", "events_url": f"/v1/requests/{turn.request_id}/events"},
        status=202, headers=_turn_headers(turn),
    )


def _turn_headers(turn: Turn) -> dict[str, str]:
    return {"X-Request-Id": turn.request_id, "X-Conversation-Id": turn.conversation_id}


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models a turn may name (OpenAI's list shape)."""
    owner = "offline" if request.app[SETTINGS].offline else "upstream"
    return web.json_response({
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": owner}
                 for m in request.app[MODELS]],
    })


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness plus the figures an operator looks at first."""
    app = request.app
    settings = app[SETTINGS]
    stats = app[STORE].stats
    return web.json_response({
        "status": "ok",
        "model": {"offline": settings.offline, "base_url": app[PROVIDER].name,
                  "default": settings.default_model},
        "live_turns": len(app[ORCHESTRATOR].live),
        "clients": {"open": app[CLIENTS].open, "cut_off": app[CLIENTS].cut_off},
        "turn_subscribers": sum(turn.subscribers for turn in app[ORCHESTRATOR].live.values()),
        "store": {"path": app[STORE].path, "events_written": stats.events_written,
                  "flushes": stats.flushes, "failed_flushes": stats.failed_flushes,
                  "last_flush_ms": round(stats.last_flush_ms, 3), "last_error": stats.last_error},
        "tools": {"enabled": [tool.name for tool in app[TOOLS].enabled()],
                  "disabled": [tool.name for tool in app[TOOLS].tools if not tool.enabled],
                  "workspace": app[TOOLS].info.get("workspace")},
    })


async def list_tools(request: web.Request) -> web.Response:
    """``GET /v1/tools``: every tool with its parameters' JSON schema and whether it is on."""
    registry = request.app[TOOLS]
    return web.json_response({
        "object": "list", "workspace": registry.info.get("workspace"),
        "max_steps": registry.limits.max_steps,
        "data": [tool.describe() for tool in registry.tools],
    })


async def speech_providers(request: web.Request) -> web.Response:
    """``GET /speech/providers``: where the speech tools send audio, and their defaults."""
    settings = request.app[SETTINGS]
    registry = request.app[TOOLS]
    enabled = any(tool.enabled for tool in registry.tools if tool.family == "speech")
    return web.json_response({"object": "list", "default": "openai", "data": speech_provider_info(
        base_url=request.app[PROVIDER].name, offline=settings.offline, enabled=enabled,
        stt_model=settings.default_stt_model, tts_model=settings.default_tts_model,
        voice=settings.default_tts_voice,
    )})


# -- lifecycle --------------------------------------------------------------------------
async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = EventStore(settings.db_path, flush_interval_ms=settings.flush_interval_ms,
                       flush_max_rows=settings.flush_max_rows)
    await asyncio.to_thread(store.open)
    app[STORE] = store
    app[ANALYTICS] = Analytics(connect=store.cursor, flush=store.flush, settings=settings)
    await recover_interrupted(store)
    yield
    await asyncio.to_thread(store.close)  # writes everything still queued


async def model_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        if settings.offline:
            offline = await stack.enter_async_context(
                OfflineModelServer(token_delay_ms=settings.offline_token_delay_ms)
            )
            app[OFFLINE] = offline
            base_url: str | None = offline.base_url
            api_key: str | None = "offline"
        else:
            base_url, api_key = settings.openai_base_url, settings.openai_api_key
        provider = OpenAIProvider(base_url=base_url, api_key=api_key,
                                  timeout_s=settings.model_timeout_s,
                                  max_retries=settings.model_max_retries,
                                  max_connections=settings.model_max_connections)
        stack.push_async_callback(provider.aclose)
        app[PROVIDER] = provider
        models = [*await _known_models(settings, provider), ROUNDTABLE_MODEL]
        app[MODELS] = models
        log.info("model provider %s; models %s", provider.name, ", ".join(models))
        yield


async def _known_models(settings: Settings, provider: OpenAIProvider) -> list[str]:
    if settings.models:
        models = list(settings.models)
    else:
        try:
            models = await asyncio.wait_for(provider.list_models(), timeout=10)
        except Exception as exc:  # a provider without /models still serves DEFAULT_MODEL
            log.warning("could not list the provider's models (%s); offering %s only",
                        exc, settings.default_model)
            models = []
    if settings.default_model not in models:
        models.insert(0, settings.default_model)
    return models


async def orchestrator_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # The speech tools use the model endpoint's audio API through the same client.
    app[TOOLS] = await asyncio.to_thread(build_registry, settings, audio=app[PROVIDER].client)
    app[ORCHESTRATOR] = StreamingOrchestrator(
        provider=app[PROVIDER], store=app[STORE], default_model=settings.default_model,
        history_limit=settings.history_max_messages, tools=app[TOOLS],
    )
    app[COORDINATOR] = SessionCoordinator(app[ORCHESTRATOR], store=app[STORE],
                                          max_buffer=settings.client_buffer_events)
    yield
    await app[ORCHESTRATOR].drain(grace_s=0)  # normally already drained on shutdown


async def drain_turns(app: web.Application) -> None:
    """On shutdown (after the listener closed): let running turns finish in the grace."""
    orchestrator = app[ORCHESTRATOR]
    if orchestrator.live:
        log.info("waiting up to %.1fs for %d running turns", app[SETTINGS].shutdown_grace_s,
                 len(orchestrator.live))
    cancelled = await orchestrator.drain(grace_s=app[SETTINGS].shutdown_grace_s)
    if cancelled:
        log.warning("cancelled %d turns still running after the grace period", cancelled)


def create_app(settings: Settings | None = None) -> web.Application:
    """Build the application; resources start and stop with it (``cleanup_ctx``)."""
    settings = settings or Settings()
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS] = settings
    app[CLIENTS] = ClientStats()
    app.cleanup_ctx.extend([store_ctx, model_ctx, orchestrator_ctx])
    app.on_shutdown.append(drain_turns)
    add_analytics_routes(app)  # /v1/query, /v1/export; the export schedule after store_ctx
    app.router.add_post("/v1/orchestrate", orchestrate)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/tools", list_tools)
    app.router.add_get("/speech/providers", speech_providers)
    app.router.add_get("/v1/requests/{request_id}/events", request_events)
    app.router.add_get("/v1/requests/{request_id}", request_status)
    app.router.add_post("/v1/requests/{request_id}/cancel", request_cancel)
    app.router.add_get("/v1/ws", websocket)
    app.router.add_post("/v1/roundtable", roundtable)
    app.router.add_get("/", index_page)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain turns, flush, return."""
    app = create_app(settings)
    # handler_cancellation: notice a dropped client at once, not at the next write.
    runner = web.AppRunner(app, handler_cancellation=True, handle_signals=False,
                           shutdown_timeout=settings.shutdown_grace_s + 5, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"serving on http://{host}:{port} (db {settings.db_path}, "
              f"model {'offline' if settings.offline else app[PROVIDER].name})", flush=True)
        await stop.wait()
        print("stopping: no new requests; draining running turns", flush=True)
    finally:
        await runner.cleanup()
    print("stopped cleanly", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", help="address to listen on (HOST)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 for any (PORT)")
    parser.add_argument("--db", help="DuckDB file of the event store (DB_PATH)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.db is not None:
        overrides["db_path"] = args.db
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "aiohttp.access"):  # one line per model call is noise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

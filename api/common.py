"""Shared by every wire: the app keys, JSON errors in OpenAI's shape, model checks,
cursors, and the native SSE writer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from api.wire import ApiError, check_text
from core.config import Settings
from core.errors import BufferOverflowError, StoreError
from core.events import Event
from pipeline.offline_model import OfflineModelServer
from pipeline.orchestrator import StreamingOrchestrator, Turn
from pipeline.provider_registry import ProviderRegistry, UnknownModelError
from pipeline.providers import OpenAIProvider
from pipeline.sessions import SessionCoordinator
from pipeline.tools import ToolRegistry
from sinks.event_log import RedisEventLog
from sinks.sse import FrameWriter, comment_frame, event_frame, open_sse
from sinks.store import StoreApi

log = logging.getLogger(__name__)


ROUNDTABLE_MODEL = "roundtable"
WEB_ROOT = Path(__file__).resolve().parent.parent / "sinks" / "web"

@dataclasses.dataclass
class ClientStats:
    """Open SSE streams, and how many clients were cut off for falling behind."""

    open: int = 0
    cut_off: int = 0

SETTINGS = web.AppKey("settings", Settings)
#: The store: an EventStore (this process opens the file) or, in the worker role, the
#: recorder's over its internal API (sinks.remote_store.RemoteStore).
STORE: web.AppKey[StoreApi] = web.AppKey("store")
PROVIDER = web.AppKey("provider", OpenAIProvider)
MODELS: web.AppKey[list[str]] = web.AppKey("models")
ORCHESTRATOR = web.AppKey("orchestrator", StreamingOrchestrator)
OFFLINE = web.AppKey("offline", OfflineModelServer)
CLIENTS = web.AppKey("clients", ClientStats)
COORDINATOR = web.AppKey("coordinator", SessionCoordinator)
TOOLS = web.AppKey("tools", ToolRegistry)
REGISTRY = web.AppKey("registry", ProviderRegistry)
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
    except StoreError as exc:  # the store (or, for a worker, the recorder) cannot serve now
        log.warning("%s %s: the store cannot serve: %s", request.method, request.path, exc)
        error = ApiError(503, f"the event store cannot serve this now: {exc}",
                         type="server_error", code="store_unavailable")
        return web.json_response(error.body(), status=503)
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

    Past ``MAX_LIVE_TURNS`` running turns or ``MAX_OPEN_STREAMS`` open streams a new turn
    is a ``503`` with ``Retry-After`` at once (the admitted ones keep their pace); past
    ``RATE_LIMIT_RPM`` turns a minute for one key (or client address, without keys) a
    ``429`` with ``Retry-After``, in OpenAI's shape, so the SDKs' own retries wait for it.
    """
    health = request.app[STORE].health()
    if not health.accepting:  # the store cannot write and its backlog is full
        retry = max(1, round(health.retry_in_s or 1))
        raise ApiError(
            503, f"the event store cannot write now and {health.backlog_rows} rows wait "
            f"(STORE_BACKLOG_MAX_ROWS={health.backlog_max_rows}); no new turn starts until it "
            f"writes again (last error: {health.last_error})",
            type="server_error", code="store_unavailable", headers={"Retry-After": str(retry)})
    app = request.app
    settings = app[SETTINGS]
    overloaded: str | None = None
    if len(app[ORCHESTRATOR].live) >= settings.max_live_turns:
        overloaded = f"{settings.max_live_turns} running turns (MAX_LIVE_TURNS)"
    elif app[CLIENTS].open >= settings.max_open_streams:
        overloaded = f"{settings.max_open_streams} open streams (MAX_OPEN_STREAMS)"
    if overloaded is not None:
        raise ApiError(503, f"the server is at its limit of {overloaded}; retry shortly",
                       type="server_error", code="overloaded", headers={"Retry-After": "1"})
    limiter = app.get(RATE_LIMITER)
    if limiter is not None:
        wait = limiter.take(client_id(request))
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                429, f"Rate limit reached: {limiter.per_minute} turns per minute "
                f"(RATE_LIMIT_RPM); retry in {seconds}s", type="requests",
                code="rate_limit_exceeded", headers={"Retry-After": str(seconds)},
            )


def admit_stream(request: web.Request) -> None:
    """Refuse a new follower stream (``GET /v1/requests/{id}/events``) past
    ``MAX_OPEN_STREAMS`` with a 503 and ``Retry-After``."""
    limit = request.app[SETTINGS].max_open_streams
    if request.app[CLIENTS].open >= limit:
        raise ApiError(503, f"the server is at its limit of {limit} open streams "
                       "(MAX_OPEN_STREAMS); retry shortly", type="server_error",
                       code="overloaded", headers={"Retry-After": "1"})


class RateLimiter:
    """A token bucket per client: ``per_minute`` tokens, refilled evenly; a burst of up to
    ``per_minute`` at once."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when)

    def take(self, client: str) -> float:
        """Take one token for ``client``: 0 when granted, else the seconds until one is."""
        now = self._clock()
        tokens, when = self._buckets.get(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - when) * self._rate)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            if len(self._buckets) > 10_000:
                self._forget_full(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / self._rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (they would start full anyway)."""
        for client, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * self._rate >= self.per_minute:
                del self._buckets[client]


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
#: The request's client identity for rate limits: its API key (hashed) or its address.
CLIENT_ID = web.RequestKey("client_id", str)


def client_id(request: web.Request) -> str:
    return request.get(CLIENT_ID) or f"addr:{request.remote}"


def path_id(request: web.Request, name: str) -> str:
    """An id from the URL path (e.g. ``request_id``): at most 200 characters, no control
    characters or lone surrogates; else a 400 in the JSON shape."""
    value = request.match_info[name]
    if len(value) > 200:
        raise ApiError(400, f"{name}: {len(value)} characters; ids have at most 200",
                       code="invalid_id", param=name)
    check_text(value, field=name, identifier=True)
    return value


# -- the door: hosts, origins, CORS, keys, body size ---------------------------------------
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CORS_METHODS = "GET, POST, DELETE, OPTIONS"  # DELETE: /v1/responses/{id}
CORS_EXPOSE = ("X-Request-Id, X-Conversation-Id, X-Response-Id, Retry-After, X-Row-Count, "
               "X-Truncated, WWW-Authenticate")
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def api_keys(settings: Settings) -> list[str]:
    """The API keys (``API_KEY``, ``API_KEYS``); when there are any, they (and
    ``ADMIN_KEY``) open ``/v1/*``. ``ADMIN_KEY`` alone guards only the analysts' routes."""
    return [key for key in (settings.api_key, *settings.api_keys) if key]


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The Host names answered (lower case, without port); None: any."""
    if settings.allowed_hosts is not None:
        hosts = [host.lower().strip("[]") for host in settings.allowed_hosts]
        return None if "*" in hosts else hosts
    if not is_loopback(settings.host):
        return None
    return [*LOOPBACK_HOSTS, settings.host.strip("[]").lower()]  # e.g. 127.0.0.2


def _host_name(host: str) -> str:
    """``Host`` without its port: ``[::1]:8080`` → ``::1``, ``a.b:80`` → ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _origin_allowed(request: web.Request, origin: str, cors: list[str]) -> bool:
    if origin in cors or "*" in cors:
        return True
    return origin.lower() == f"{request.scheme}://{request.host}".lower()  # same origin


def _forbidden(message: str, code: str) -> ApiError:
    return ApiError(403, message, type="invalid_request_error", code=code)


#: What API keys guard: the API, the speech info and the seeds' wires (they start turns).
KEYED_PREFIXES = ("/v1/", "/speech/", "/chat/", "/api/")


def _needs_key(path: str) -> bool:
    return path.startswith(KEYED_PREFIXES) or path == "/v1"


@web.middleware
async def door(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse at the door what must not come in, before any handler runs.

    A ``Host`` the server does not answer for (DNS rebinding) and an ``Origin`` that is
    neither the server's own nor in ``CORS_ORIGINS`` (a hostile page, e.g. a ``text/plain``
    POST that needs no preflight) get a 403; CORS preflights of allowed origins are
    answered here; with keys configured every ``/v1/*`` route needs
    ``Authorization: Bearer <key>`` (401 in OpenAI's shape); an announced body over
    ``MAX_BODY_BYTES`` is a 413 before a byte of it is read.
    """
    settings = request.app[SETTINGS]
    hosts = allowed_hosts(settings)
    host = request.headers.get("Host", "")
    if hosts is not None and _host_name(host) not in hosts:
        raise _forbidden(f"this server does not answer for the host {host[:100]!r} "
                         "(ALLOWED_HOSTS)", "host_not_allowed")
    origin = request.headers.get("Origin")
    if origin is not None:
        if not _origin_allowed(request, origin, settings.cors_origins):
            raise _forbidden(f"requests from the origin {origin[:100]!r} are not allowed "
                             "(CORS_ORIGINS)", "origin_not_allowed")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return _preflight(request)
    if (keys := api_keys(settings)) and _needs_key(request.path):
        admin = [settings.admin_key] if settings.admin_key else []
        request[CLIENT_ID] = _check_key(request, [*keys, *admin])
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        raise ApiError(413, f"request body of {length} bytes is over the limit of "
                       f"{settings.max_body_bytes} bytes (MAX_BODY_BYTES)",
                       code="body_too_large", headers={"Connection": "close"})
    return await handler(request)


def _check_key(request: web.Request, keys: list[str]) -> str:
    """The client id of a valid Bearer key, else a 401 (OpenAI's ``invalid_api_key``)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() == "bearer" and given:
        for key in keys:
            if hmac.compare_digest(given, key.encode()):
                return "key:" + hashlib.sha256(given).hexdigest()[:16]
    message = ("You didn't provide an API key: send Authorization: Bearer <key>"
               if not given else "Incorrect API key provided")
    raise ApiError(401, message, type="invalid_request_error", code="invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


def _preflight(request: web.Request) -> web.Response:
    """The answer to an allowed origin's CORS preflight (its CORS headers come from
    :func:`cors_headers`): the methods, and the headers it asked for (the SDKs send many)."""
    asked = request.headers.get("Access-Control-Request-Headers", "")
    names = [name.strip() for name in asked.split(",") if name.strip()]
    allowed = ["Authorization", "Content-Type", "Last-Event-ID",
               *(name for name in names if set(name) <= _TOKEN)]
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": ", ".join(dict.fromkeys(allowed)),
        "Access-Control-Max-Age": "600",
    })


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: CORS headers on every answer to an origin in
    ``CORS_ORIGINS`` (errors and SSE streams included: they are set before headers go)."""
    origin = request.headers.get("Origin")
    cors = request.app[SETTINGS].cors_origins
    if origin is None or not (origin in cors or "*" in cors):
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def check_model(request: web.Request, model: str | None, *, param: str = "model") -> str:
    """The model to use (``provider/model`` or a bare id of the default provider); one no
    provider serves is a 404 ``model_not_found``."""
    chosen = model or request.app[ORCHESTRATOR].default_model
    try:
        request.app[REGISTRY].resolve(chosen)
    except UnknownModelError as exc:
        raise ApiError(404, str(exc), code="model_not_found", param=param) from exc
    return chosen


def model_of(model: str | None, provider: str | None) -> str | None:
    """Seed 003's ``provider`` body field joined to its ``model``: ``provider/model``."""
    if provider is None:
        return model
    return f"{provider}/{model or 'offline'}"



async def stream_native(
    request: web.Request, events: AsyncGenerator[Event | None] | AsyncGenerator[list[Event]],
    *, headers: dict[str, str],
    on_written: Callable[[int], None] | None = None,
    on_disconnect: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Write native SSE frames: a ``: stream open`` comment at once, then the events (the
    first carries the ``retry:`` advice in its own block), and a comment heartbeat for each
    ``None`` in ``events`` (a live turn's iterator yields
    one per ``HEARTBEAT_S`` of silence: ``turn.events(idle_s=...)``). ``events`` may
    yield batches instead (``turn.batches``: the events ready, ``[]`` for a silence):
    each batch is one socket write.

    A client that falls more than ``CLIENT_BUFFER_EVENTS`` behind, or whose writes block
    for ``CLIENT_WRITE_TIMEOUT_S``, gets a final comment and is disconnected; it resumes
    from its last event id without loss. The producer never waits for a client.
    ``on_disconnect`` runs when the client goes away first (the handler is cancelled, or a
    write finds the connection closed); a client leaving is normal, not an error.
    """
    app = request.app
    settings = app[SETTINGS]
    response = await open_sse(request, headers=headers)
    writer = FrameWriter(request, response, timeout_s=settings.client_write_timeout_s)
    app[CLIENTS].open += 1
    try:
        await response.write(comment_frame("stream open"))
        retry_ms: int | None = settings.sse_retry_ms  # sent once, inside the first event's block
        async with contextlib.aclosing(events) as source:
            async for item in source:  # an event, or a batch of the events ready
                batch = item if isinstance(item, list) else [] if item is None else [item]
                if not batch:  # a silence: None, or an empty batch
                    await writer.write(comment_frame("keep-alive"))
                    continue
                frames = []
                for event in batch:
                    frames.append(event_frame(event, retry_ms=retry_ms))
                    retry_ms = None
                await writer.write(b"".join(frames))  # what is ready goes in one write
                if on_written is not None:
                    for event in batch:
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




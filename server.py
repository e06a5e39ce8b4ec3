"""The HTTP server: native SSE, OpenAI-compatible endpoints, health; graceful stop.

Run ``python server.py --host 127.0.0.1 --port 8080 --db ./data/events.duckdb``; every
setting also comes from the environment (see :class:`core.config.Settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from pydantic import ValidationError
from reactivex import Observer

from api.analytics import ANALYTICS, Analytics, add_analytics_routes
from api.cluster import WORKER_ID, add_worker_identity, worker_cluster
from api.common import (
    CLIENTS,
    COORDINATOR,
    EVENT_LOG,
    MODELS,
    OFFLINE,
    ORCHESTRATOR,
    PROVIDER,
    RATE_LIMITER,
    REGISTRY,
    ROUNDTABLE_MODEL,
    SETTINGS,
    STORE,
    TOOLS,
    ClientStats,
    RateLimiter,
    api_keys,
    cors_headers,
    door,
    is_loopback,
    json_errors,
)
from api.native import (
    orchestrate,
    request_cancel,
    request_events,
    request_status,
    roundtable,
)
from api.openai import chat_completions, get_model, list_models
from api.openapi import openapi_json
from api.ops import (
    METRICS,
    access_log,
    add_metrics,
    healthz,
    index_page,
    list_tools,
    speech_providers,
)
from api.responses import add_responses_routes
from api.seeds import api_chat_stream, chat_stream
from api.supervisor import supervise
from api.wire import BODY_LIMITS, ApiError, BodyLimits
from api.ws import websocket
from core.config import Settings
from core.errors import PipelineError, StoreError
from core.events import Event
from core.logs import configure as configure_logs
from core.turn import TurnContext
from pipeline.cli import main as pipeline_main
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.provider_registry import RegistryConfigError, default_model, open_registry
from pipeline.sessions import SessionCoordinator
from pipeline.tools import build_registry
from pipeline.wiring import agent_options
from sinks.event_log import RedisEventLog
from sinks.recorder_api import create_recorder_app
from sinks.recovery import recover_interrupted
from sinks.remote_store import RecorderUnavailableError, RemoteStore, log_barrier
from sinks.store import EventStore

log = logging.getLogger("server")

# -- lifecycle --------------------------------------------------------------------------
async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = EventStore.from_settings(settings)
    await asyncio.to_thread(store.open)
    app[STORE] = store
    app[ANALYTICS] = Analytics(connect=store.cursor, flush=store.flush, settings=settings)
    await recover_interrupted(store)
    yield
    await asyncio.to_thread(store.close)  # writes everything still queued


async def event_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """The distributed log client (``EVENT_LOG=redis://…``); nothing with ``memory``.
    Closed after the turns drained: what is still queued is appended first."""
    settings = app[SETTINGS]
    if not settings.redis_log:
        yield
        return
    event_log = RedisEventLog.from_settings(settings)
    await event_log.start()
    app[EVENT_LOG] = event_log
    log.info("event log: Redis at %s, prefix %r", event_log.safe_url, settings.redis_prefix)
    yield
    await event_log.aclose()


# -- roles (issue 13): the recorder process, and workers whose store is the recorder's -----
def store_contexts(settings: Settings) -> list[Callable[[web.Application], AsyncIterator[None]]]:
    """The store and log contexts of a role: ``single`` opens the DuckDB file itself;
    ``worker`` never does (its store is the recorder's, :class:`RemoteStore`)."""
    if settings.role == "worker":
        return [event_log_ctx, remote_store_ctx]
    return [store_ctx, event_log_ctx]


async def remote_store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The worker role's store: the recorder's, over its internal API (``RECORDER_URL``).
    The recorder may still be starting: the worker waits for it (``RECORDER_TIMEOUT_S`` at
    most), then starts anyway, ``/healthz`` degraded until it answers."""
    settings = app[SETTINGS]
    event_log = app[EVENT_LOG]
    remote = RemoteStore(settings.recorder_url, timeout_s=settings.recorder_timeout_s,
                         poll_s=settings.recorder_poll_s,
                         settle=lambda: event_log.drained(within=settings.recorder_timeout_s),
                         token=settings.recorder_token)
    await remote.start()
    if not await remote.wait_reachable(within=settings.recorder_timeout_s):
        log.warning("worker: the recorder at %s does not answer yet; serving degraded",
                    settings.recorder_url)
    else:
        try:
            await remote.check_key()
        except RecorderUnavailableError as exc:
            if exc.status == 401:  # every store call would fail: do not pretend to serve
                await remote.aclose()
                raise StartupError(
                    f"the recorder at {settings.recorder_url} refuses this worker's key: "
                    "give the recorder and its workers the same RECORDER_TOKEN") from exc
            log.warning("worker: the recorder at %s: %s", settings.recorder_url, exc)
    app[STORE] = remote
    # /v1/query and POST /v1/export are answered by the recorder, which has the file
    app[ANALYTICS] = Analytics(connect=remote.cursor, flush=remote.flush, settings=settings,
                               remote=remote.answer_query, remote_export=remote.export)
    log.info("worker: the store is the recorder's at %s", settings.recorder_url)
    yield
    await remote.aclose()


def store_options(app: web.Application) -> dict[str, Any]:
    """The orchestrator's store arguments: the local store records each turn; a worker
    records nothing itself (it announces each turn on the log, the recorder records it)
    and its ``done`` waits until the recorder has committed the turn."""
    store = app[STORE]
    if isinstance(store, RemoteStore):
        settings = app[SETTINGS]
        return {"store": None, "archivist": store, "announce": True,
                "durable": log_barrier(app[EVENT_LOG], store,
                                       timeout_s=settings.recorder_timeout_s)}
    assert isinstance(store, EventStore)
    return {"store": store}


async def serve_recorder(settings: Settings) -> None:
    """``--role recorder``: the log recorder and its internal API on loopback
    (``RECORDER_PORT``), no public routes; until SIGTERM/SIGINT, then it stops, the store
    writes what is queued, and the turns it was recording stay pending in the group.

    Raises:
        StartupError: it could not start (store locked, port taken, …).
    """
    app = create_recorder_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", settings.recorder_port, reuse_address=True)
        await site.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise _startup_failure(exc, settings.model_copy(update={
            "host": "127.0.0.1", "port": settings.recorder_port})) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        host, port = runner.addresses[0][:2]
        tune_gc(settings)
        log.info("recorder serving its internal API on http://%s:%s (db %s)", host, port,
                 settings.db_path)
        if not settings.recorder_token:
            log.warning("RECORDER_TOKEN is not set: the recorder's internal API answers every "
                        "process on this machine (--workers N sets one for its children)")
        await stop.wait()
        log.info("stopping the recorder")
    finally:
        await runner.cleanup()
    log.info("stopped cleanly")


async def model_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        # providers and agents (issue 14): every provider of PROVIDERS plus the bundled
        # offline ones; app[PROVIDER] is the default provider's client (speech tools use it).
        registry = await open_registry(settings, stack)
        app[REGISTRY] = registry
        offline = registry.offline_server
        if offline is not None:
            app[OFFLINE] = offline
        app[PROVIDER] = registry.entries[registry.default].provider
        models = [*registry.model_ids(), ROUNDTABLE_MODEL]
        app[MODELS] = models
        log.info("model providers %s (default %s); models %s", ", ".join(registry.entries),
                 registry.default, ", ".join(models))
        yield


Tap = Callable[[TurnContext], Observer[Event]]
TAPS: web.AppKey[list[Tap]] = web.AppKey("taps")


async def telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    """The turn taps: metrics always, OpenTelemetry traces when OTEL_EXPORTER_OTLP_ENDPOINT
    is set (exported on stop, after the turns drained)."""
    settings = app[SETTINGS]
    taps: list[Tap] = [app[METRICS].tap]
    app[TAPS] = taps
    endpoint = settings.otel_exporter_otlp_endpoint
    if not endpoint:
        yield
        return
    try:
        from sinks.telemetry import start_tracing  # the optional `otel` extra
    except ImportError as exc:
        raise StartupError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({exc.name}): "
            "pip install -e '.[otel]' (make install does), or unset it") from exc
    tracing = start_tracing(endpoint=endpoint, service_name=settings.otel_service_name)
    taps.append(tracing.tap)
    log.info("sending traces to %s (OTLP/HTTP)", endpoint)
    try:
        yield
    finally:
        await asyncio.to_thread(tracing.shutdown)


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Workers on Redis (issue 13): registration, turn leases, the reaper, the cancel bus;
    its tap registers every turn's owner. Nothing with ``EVENT_LOG=memory``."""
    async with worker_cluster(app) as cluster:
        if cluster is not None:
            app[TAPS].append(cluster.tap)
        yield


async def orchestrator_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    taps: list[Tap] = app[TAPS]
    # The speech tools use the model endpoint's audio API through the same client.
    app[TOOLS] = await asyncio.to_thread(build_registry, settings, audio=app[PROVIDER].client)
    app[ORCHESTRATOR] = StreamingOrchestrator(
        provider=app[REGISTRY], **store_options(app),
        default_model=default_model(app[REGISTRY], settings),
        history_limit=settings.history_max_messages, tools=app[TOOLS],
        taps=taps,
        durable_done=settings.done_barrier, deadline_s=settings.turn_deadline_s,
        **agent_options(settings, registry=app[REGISTRY], tools=app[TOOLS], store=app[STORE]),
        event_log=app.get(EVENT_LOG),
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
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[
        access_log,  # outermost: it sees the final status of every request
        json_errors,
        door,  # hosts, origins, CORS preflight, API keys, announced body size (issue 10)
    ])
    app[SETTINGS] = settings
    app[BODY_LIMITS] = BodyLimits(max_messages=settings.max_messages,
                                  max_json_depth=settings.max_json_depth,
                                  body_timeout_s=settings.body_timeout_s)
    if settings.rate_limit_rpm:
        app[RATE_LIMITER] = RateLimiter(settings.rate_limit_rpm)
    app.on_response_prepare.append(cors_headers)
    app[CLIENTS] = ClientStats()
    add_metrics(app)  # GET /metrics; the orchestrator taps every turn for it
    add_worker_identity(app)  # X-Worker on every answer (issue 13)
    app.cleanup_ctx.extend([*store_contexts(settings), model_ctx, telemetry_ctx, cluster_ctx,
                            orchestrator_ctx])
    app.on_shutdown.append(drain_turns)
    add_analytics_routes(app)  # /v1/query, /v1/export; the export schedule after store_ctx
    app.router.add_post("/v1/orchestrate", orchestrate)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    add_responses_routes(app)  # /v1/responses (issue 11)
    app.router.add_get("/v1/tools", list_tools)
    app.router.add_get("/speech/providers", speech_providers)
    app.router.add_get("/v1/requests/{request_id}/events", request_events)
    app.router.add_get("/v1/requests/{request_id}", request_status)
    app.router.add_post("/v1/requests/{request_id}/cancel", request_cancel)
    app.router.add_get("/v1/ws", websocket)
    app.router.add_post("/v1/roundtable", roundtable)
    app.router.add_post("/chat/stream", chat_stream)  # seed 003's wire (issue 14)
    app.router.add_post("/api/chat/stream", api_chat_stream)  # seed 001's wire (issue 14)
    app.router.add_get("/", index_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi_json)  # every route has a row in api/openapi.py
    return app


class _DoorHandler(RequestHandler):
    """aiohttp's connection handler with a header deadline (it has none of its own): a
    client that has not sent a whole request head ``HEADER_TIMEOUT_S`` after connecting
    (or after its previous request ended) is disconnected (slowloris). Errors found
    before a handler runs (a request line over 8190 bytes, bad framing) are answered in
    the project's JSON error shape."""

    __slots__ = ("_door_deadline", "_door_timer", "_door_worker")

    def __init__(self, manager: web.Server, *, header_timeout_s: float, worker_id: str = "",
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._door_deadline = header_timeout_s
        self._door_worker = worker_id  # X-Worker on the answers made here too (issue 13)
        self._door_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._door_arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._door_disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = len(self._messages)
        super().data_received(data)
        if len(self._messages) > before:
            self._door_disarm()  # a whole request head arrived
        elif self._door_timer is None and self._idle():
            self._door_arm()  # the next request's head began on a kept-alive connection

    def _idle(self) -> bool:
        return (self._current_request is None and not self._messages
                and self._payload_parser is None and not self._upgraded)

    def _door_arm(self) -> None:
        self._door_disarm()
        self._door_timer = self._loop.call_later(self._door_deadline, self._door_expired)

    def _door_disarm(self) -> None:
        if self._door_timer is not None:
            self._door_timer.cancel()
            self._door_timer = None

    def _door_expired(self) -> None:
        self._door_timer = None
        if self._idle() and self.transport is not None:
            log.info("closed a connection whose request head did not arrive within %.0fs "
                     "(HEADER_TIMEOUT_S)", self._door_deadline)
            self.force_close()  # closes the transport

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.info("refused a malformed request from %s: %s", request.remote, message)
        error = ApiError(status, message or "bad request", code="bad_request")
        json_response = web.json_response(error.body(), status=status)
        if self._door_worker:
            json_response.headers["X-Worker"] = self._door_worker
        json_response.force_close()
        return json_response


class _DoorSite(web.TCPSite):
    """A TCP site whose connections are :class:`_DoorHandler` s."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 header_timeout_s: float, backlog: int, reuse_port: bool = False,
                 worker_id: str = "") -> None:
        super().__init__(runner, host, port, backlog=backlog)
        self._header_timeout_s = header_timeout_s
        self._door_reuse_port = reuse_port  # workers share one port (SO_REUSEPORT, issue 13)
        self._door_worker = worker_id

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def connection() -> _DoorHandler:
            return _DoorHandler(server, loop=loop, header_timeout_s=self._header_timeout_s,
                                worker_id=self._door_worker, access_log=None)

        # The backlog is LISTEN_BACKLOG: asyncio's default of 100 reset connections of a burst
        # of 400 stream starts while the loop was busy starting the first ones.
        self._server = _Listener(loop, connection, self._host, self._port,
                                 backlog=self._backlog, reuse_port=self._door_reuse_port)


class _Listener(asyncio.AbstractServer):
    """The door's listening sockets, with an accept loop of our own: every connection
    waiting is taken at each readiness of a socket (up to the backlog), on any loop.

    Not ``loop.create_server``: under uvloop, a burst of new connections into a busy loop
    was taken a little at a time (the first token of the last of 200 streams ramped over a
    second came after 2.4 s, 0.9 s with this loop; of 400, after 9.9 s rather than 3.0 s;
    asyncio's own loop was unaffected; bench/README.md, issue 12). A connection is handed to
    the loop's transport by ``connect_accepted_socket``. Out of file descriptors, accepting
    pauses for :data:`ACCEPT_RETRY_S` (as asyncio's own server does) rather than spinning.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol],
                 host: str | None, port: int, *, backlog: int, reuse_port: bool) -> None:
        self._loop, self._factory, self._backlog = loop, factory, backlog
        self._sockets = _listening_sockets(host, port, backlog=backlog, reuse_port=reuse_port)
        self._serving = True
        self._handshakes: set[asyncio.Task[Any]] = set()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none waiting (or the client left before we took it)
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:  # (e.g. EPERM from a firewall rule)
                    log.warning("cannot accept a connection: %s", exc)
                    return
                log.error("cannot accept a connection (%s); accepting again in %gs",
                          os.strerror(exc.errno or 0), ACCEPT_RETRY_S)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume, sock)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._handed_over, conn))

    def _handed_over(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("a connection could not be served: %s", task.exception())
            conn.close()

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        return None  # serving from the start

    async def serve_forever(self) -> None:
        raise NotImplementedError("the door's listener is run by aiohttp's runner")

    async def wait_closed(self) -> None:
        return None


#: How long accepting pauses when the process is out of file descriptors (or memory).
ACCEPT_RETRY_S: float = 1.0
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _listening_sockets(host: str | None, port: int, *, backlog: int,
                       reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` resolves to (all
    interfaces when it is empty), as ``loop.create_server`` makes them. Raises ``OSError``
    (a port in use: ``EADDRINUSE``) with none left open."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # (as asyncio: the IPv4 address gets its own)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def refuse_exposure(settings: Settings) -> str | None:
    """Why the server must not start on this address, or None: a non-loopback address
    without API keys serves every conversation and every tool to the network."""
    if is_loopback(settings.host) or api_keys(settings) or settings.allow_no_auth:
        return None
    return (f"refusing to listen on {settings.host} without API keys: anyone who can reach it "
            "could read every conversation and run tools; set API_KEY or API_KEYS, bind "
            "127.0.0.1, or pass --allow-no-auth (ALLOW_NO_AUTH=true)")


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain turns, flush, return.

    Raises:
        StartupError: the server could not start (port taken, store locked, …): the
            message says what to do.
    """
    app = create_app(settings)
    # handler_cancellation: notice a dropped client at once, not at the next write.
    runner = web.AppRunner(app, handler_cancellation=True, handle_signals=False,
                           shutdown_timeout=settings.shutdown_grace_s + 5, access_log=None)
    try:
        await runner.setup()
    except Exception as exc:
        with contextlib.suppress(Exception):  # close what did start (the store's lock)
            app.freeze()
            await app.cleanup()
        if isinstance(exc, RegistryConfigError):  # invalid settings (exit 2), not a failure
            raise
        raise _startup_failure(exc, settings) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = _DoorSite(runner, settings.host, settings.port,
                         header_timeout_s=settings.header_timeout_s,
                         reuse_port=settings.reuse_port, worker_id=app[WORKER_ID],
                         backlog=settings.listen_backlog)
        try:
            await site.start()
        except OSError as exc:
            raise _startup_failure(exc, settings) from exc
        host, port = runner.addresses[0][:2]
        tune_gc(settings)
        store = (f"the recorder's at {settings.recorder_url}" if settings.role == "worker"
                 else f"db {settings.db_path}")
        log.info("serving on http://%s:%s (%s, model %s)", host, port, store,
                 "offline" if settings.offline else app[PROVIDER].name)
        await stop.wait()
        log.info("stopping: no new requests; draining running turns")
    finally:
        await runner.cleanup()
    log.info("stopped cleanly")


class StartupError(PipelineError):
    """The server cannot start; the message says why and what to do (no traceback)."""


def _startup_failure(exc: BaseException, settings: Settings) -> StartupError:
    if isinstance(exc, StartupError):
        return exc
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return StartupError(f"port {settings.port} on {settings.host} is already in use (another "
                            "server?): stop it, or choose another port with PORT=… or --port")
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        return StartupError(f"not allowed to listen on {where} (ports below 1024 need root): "
                            "choose another port with PORT=… or --port")
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME):
        return StartupError(f"cannot listen on {settings.host!r}: not an address of this machine; "
                            "set HOST=… or --host (e.g. 127.0.0.1 or 0.0.0.0)")
    if isinstance(exc, StoreError):
        text = str(exc)
        if "lock" in text.lower():
            pid = re.search(r"PID (\d+)", text)
            holder = f"process {pid.group(1)}" if pid else "another process"
            return StartupError(
                f"the event store {settings.db_path} is held by {holder} (another server on the "
                "same file?): stop it, or use another file with DB_PATH=… or --db")
        return StartupError(f"{text.splitlines()[0]}; check DB_PATH (or --db) and its folder")
    return StartupError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                        "(LOG_LEVEL=DEBUG shows the traceback)")


def _describe_invalid(exc: ValidationError) -> str:
    """One short clause per invalid setting, named as its environment variable."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = field.upper() or "settings"
        secret = field in Settings.model_fields and not Settings.model_fields[field].repr
        got = "<redacted>" if secret else repr(error.get("input"))  # a key is never logged
        parts.append(f"{name}: {error['msg']} (got {got[:60]})")
    return "; ".join(parts)


def add_role_flags(parser: argparse.ArgumentParser) -> None:
    """``--role``, ``--recorder-port``, ``--recorder-url`` (ROLE, RECORDER_PORT, RECORDER_URL)."""
    parser.add_argument("--role", choices=["single", "worker", "recorder"],
                        help="single (default), worker or recorder (ROLE)")
    parser.add_argument("--recorder-port", type=int,
                        help="the recorder's internal API port (RECORDER_PORT)")
    parser.add_argument("--recorder-url", help="where a worker finds the recorder (RECORDER_URL)")


def role_overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {"role": args.role, "recorder_port": args.recorder_port,
             "recorder_url": args.recorder_url}
    return {name: value for name, value in pairs.items() if value is not None}


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """``python server.py [--host H] [--port P] [--db FILE]``; exit 0 after a clean stop,
    1 when the server cannot start, 2 for invalid settings."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", help="address to listen on (HOST)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 for any (PORT)")
    parser.add_argument("--db", help="DuckDB file of the event store (DB_PATH)")
    parser.add_argument("--allow-no-auth", action="store_true", default=None,
                        help="serve a non-loopback address without API keys (ALLOW_NO_AUTH)")
    parser.add_argument("--event-log", help="memory or redis://host:port/db (EVENT_LOG)")
    parser.add_argument("--workers", type=int,
                        help="worker processes on one port under a supervisor (WORKERS)")
    add_role_flags(parser)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.db is not None:
        overrides["db_path"] = args.db
    if args.allow_no_auth:
        overrides["allow_no_auth"] = True
    if args.event_log is not None:
        overrides["event_log"] = args.event_log
    if args.workers is not None:
        overrides["workers"] = args.workers
    overrides.update(role_overrides(args))
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        fallback = os.environ.get("LOG_FORMAT", "text").lower()
        configure_logs(fmt="json" if fallback == "json" else "text")
        log.error("invalid settings: %s. Fix the variable (or flag) and start again.",
                  _describe_invalid(exc))
        return 2
    configure_logs(level=settings.log_level, fmt=settings.log_format)
    if (why := refuse_exposure(settings)) is not None:
        log.error("%s", why)
        return 2
    if supervised(settings):
        return run_supervisor(settings)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
            runner.run(serve_recorder(settings) if settings.role == "recorder" else serve(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        log.debug("the cause", exc_info=exc.__cause__)
        return 1
    except RegistryConfigError as exc:  # providers and agents that cannot work (issue 14)
        log.error("invalid settings: %s", exc)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        log.info("interrupted while starting")
        return 130
    except Exception:  # a bug: still one log line (the traceback in it, JSON with LOG_FORMAT)
        log.exception("the server failed")
        return 1
    return 0


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a server process runs on (``EVENT_LOOP``, issue 12): uvloop where it
    is installed, asyncio's own otherwise (None). uvloop's libuv loop costs less per
    callback, per socket read and per write: about a tenth of the CPU per streamed token
    here, and 1–2 ms of the time to first token (``bench/proxy_bench.py`` measures both
    loops).

    Raises:
        StartupError: ``EVENT_LOOP=uvloop`` and uvloop cannot be imported.
    """
    if settings.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if settings.event_loop == "uvloop":
            raise StartupError("EVENT_LOOP=uvloop, but uvloop is not installed "
                               "(pip install uvloop, or EVENT_LOOP=auto)") from exc
        return None
    return uvloop.new_event_loop


def tune_gc(settings: Settings) -> None:
    """The cyclic garbage collector, set for a server (issue 12), once it serves.

    With Python's thresholds (700, 10, 10) the collector took about 68 µs of the loop per
    streamed token here (a fifth of its CPU): every turn keeps its events for late
    followers, and the older generations' scans walk them and the whole startup heap (the
    SDK's and pydantic's types). ``GC_GEN0_THRESHOLD`` (10,000) makes young collections
    rarer (almost everything a token allocates dies young, so no more survives), and
    ``GC_FREEZE`` moves what start-up built into the permanent generation, never scanned
    again: about 14 µs per token then. The older generations keep Python's thresholds, so
    cyclic garbage is still collected as often relative to the young collections.
    """
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
    if settings.gc_gen0_threshold:
        gc.set_threshold(settings.gc_gen0_threshold, *gc.get_threshold()[1:])
    log.info("garbage collector: thresholds %s, %d startup objects frozen; event loop: %s",
             gc.get_threshold(), gc.get_freeze_count(), loop_name())


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's kind, for the start-up log line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def supervised(settings: Settings) -> bool:
    """Whether this process is the supervisor: ``WORKERS`` above 1, or set at all (``1``
    included) with ``EVENT_LOG=redis://…`` in the default role. ``make run`` (memory log,
    no ``WORKERS``) stays one process; the children run with ``WORKERS=1`` and a role."""
    if settings.role != "single":
        return False
    return settings.workers > 1 or ("workers" in settings.model_fields_set
                                    and settings.redis_log)


def run_supervisor(settings: Settings) -> int:
    """``--workers N``: this process only supervises the recorder and N ``server.py``
    workers on one port (:mod:`api.supervisor`); its exit code."""
    return supervise(settings, server=os.path.abspath(__file__))


#: The commands of ``python -m pipeline`` that ``agentflow`` passes on.
PIPELINE_COMMANDS = ("query", "export", "report", "sql")
CLI_USAGE = """usage: agentflow {serve,query,export,report,sql} ...

  serve    run the server (python server.py): --host, --port, --db, or HOST, PORT, DB_PATH
  query    one read-only SQL statement on the event store (python -m pipeline query)
  export   export closed requests to the Parquet lake (python -m pipeline export)
  report   an HTML or PNG report with charts (python -m pipeline report)
  sql      an interactive SQL prompt on the event store (python -m pipeline sql)

'agentflow COMMAND --help' tells more."""


def cli(argv: list[str] | None = None) -> int:
    """The ``agentflow`` console script (``[project.scripts]``): ``serve`` runs
    :func:`main`; the analysts' commands are ``python -m pipeline``'s (:mod:`pipeline.cli`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(CLI_USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        return main(rest, prog="agentflow serve")
    if command in PIPELINE_COMMANDS:
        return pipeline_main([command, *rest])
    print(f"agentflow: unknown command {command!r}\n\n{CLI_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


"""The HTTP server: native SSE, OpenAI-compatible endpoints, health; graceful stop.

Run ``python server.py --host 127.0.0.1 --port 8080 --db ./data/events.duckdb``; every
setting also comes from the environment (see :class:`core.config.Settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from pydantic import ValidationError

from api.analytics import ANALYTICS, Analytics, add_analytics_routes
from api.common import (
    CLIENTS,
    COORDINATOR,
    MODELS,
    OFFLINE,
    ORCHESTRATOR,
    PROVIDER,
    RATE_LIMITER,
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
from api.ops import healthz, index_page, list_tools, speech_providers
from api.wire import BODY_LIMITS, ApiError, BodyLimits
from api.ws import websocket
from core.config import Settings
from pipeline.offline_model import OfflineModelServer
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import OpenAIProvider
from pipeline.sessions import SessionCoordinator
from pipeline.tools import build_registry
from sinks.recovery import recover_interrupted
from sinks.store import EventStore

log = logging.getLogger("server")

# -- lifecycle --------------------------------------------------------------------------
async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = EventStore(settings.db_path, flush_interval_ms=settings.flush_interval_ms,
                       flush_max_rows=settings.flush_max_rows,
                       storage_version=settings.store_storage_version,
                       backlog_max_rows=settings.store_backlog_max_rows,
                       retry_min_ms=settings.store_retry_min_ms,
                       retry_max_ms=settings.store_retry_max_ms,
                       barrier_timeout_s=settings.store_barrier_timeout_s)
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
        durable_done=settings.done_barrier, deadline_s=settings.turn_deadline_s,
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
    app.cleanup_ctx.extend([store_ctx, model_ctx, orchestrator_ctx])
    app.on_shutdown.append(drain_turns)
    add_analytics_routes(app)  # /v1/query, /v1/export; the export schedule after store_ctx
    app.router.add_post("/v1/orchestrate", orchestrate)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/v1/tools", list_tools)
    app.router.add_get("/speech/providers", speech_providers)
    app.router.add_get("/v1/requests/{request_id}/events", request_events)
    app.router.add_get("/v1/requests/{request_id}", request_status)
    app.router.add_post("/v1/requests/{request_id}/cancel", request_cancel)
    app.router.add_get("/v1/ws", websocket)
    app.router.add_post("/v1/roundtable", roundtable)
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

    __slots__ = ("_door_deadline", "_door_timer")

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._door_deadline = header_timeout_s
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
        json_response.force_close()
        return json_response


class _DoorSite(web.TCPSite):
    """A TCP site whose connections are :class:`_DoorHandler` s."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 header_timeout_s: float) -> None:
        super().__init__(runner, host, port)
        self._header_timeout_s = header_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def connection() -> _DoorHandler:
            return _DoorHandler(server, loop=loop, header_timeout_s=self._header_timeout_s,
                                access_log=None)

        self._server = await loop.create_server(connection, self._host, self._port,
                                                reuse_address=True)


def refuse_exposure(settings: Settings) -> str | None:
    """Why the server must not start on this address, or None: a non-loopback address
    without API keys serves every conversation and every tool to the network."""
    if is_loopback(settings.host) or api_keys(settings) or settings.allow_no_auth:
        return None
    return (f"refusing to listen on {settings.host} without API keys: anyone who can reach it "
            "could read every conversation and run tools; set API_KEY or API_KEYS, bind "
            "127.0.0.1, or pass --allow-no-auth (ALLOW_NO_AUTH=true)")


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
        site = _DoorSite(runner, settings.host, settings.port,
                         header_timeout_s=settings.header_timeout_s)
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
    parser.add_argument("--allow-no-auth", action="store_true", default=None,
                        help="serve a non-loopback address without API keys (ALLOW_NO_AUTH)")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "aiohttp.access"):  # one line per model call is noise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if (why := refuse_exposure(settings)) is not None:
        print(why, file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())


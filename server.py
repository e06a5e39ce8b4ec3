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
from pydantic import ValidationError

from api.analytics import ANALYTICS, Analytics, add_analytics_routes
from api.common import (
    CLIENTS,
    COORDINATOR,
    EVENT_LOG,
    MODELS,
    OFFLINE,
    ORCHESTRATOR,
    PROVIDER,
    ROUNDTABLE_MODEL,
    SETTINGS,
    STORE,
    TOOLS,
    ClientStats,
    json_errors,
)
from api.native import (
    orchestrate,
    request_cancel,
    request_events,
    request_status,
    roundtable,
)
from api.openai import chat_completions, list_models
from api.ops import healthz, index_page, list_tools, speech_providers
from api.ws import websocket
from core.config import Settings
from pipeline.offline_model import OfflineModelServer
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import OpenAIProvider
from pipeline.sessions import SessionCoordinator
from pipeline.tools import build_registry
from sinks.event_log import RedisEventLog
from sinks.recovery import recover_interrupted
from sinks.store import EventStore

log = logging.getLogger("server")

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


async def event_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """The distributed log client (``EVENT_LOG=redis://…``); nothing with ``memory``.
    Closed after the turns drained: what is still queued is appended first."""
    settings = app[SETTINGS]
    if not settings.redis_log:
        yield
        return
    event_log = RedisEventLog(
        settings.event_log, prefix=settings.redis_prefix, ttl_s=settings.event_log_ttl_s,
        live_ttl_s=settings.event_log_live_ttl_s, retry_base_s=settings.event_log_retry_base_s,
        retry_max_s=settings.event_log_retry_max_s, give_up_s=settings.event_log_give_up_s,
        ping_s=settings.event_log_ping_s, batch_max=settings.event_log_batch_max,
        timeout_s=settings.event_log_timeout_s, lost_after_s=settings.event_log_lost_s,
    )
    await event_log.start()
    app[EVENT_LOG] = event_log
    log.info("event log: Redis at %s, prefix %r", event_log.safe_url, settings.redis_prefix)
    yield
    await event_log.aclose()


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
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS] = settings
    app[CLIENTS] = ClientStats()
    app.cleanup_ctx.extend([store_ctx, event_log_ctx, model_ctx, orchestrator_ctx])
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
    parser.add_argument("--event-log", help="memory or redis://host:port/db (EVENT_LOG)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.db is not None:
        overrides["db_path"] = args.db
    if args.event_log is not None:
        overrides["event_log"] = args.event_log
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


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
    MODELS,
    OFFLINE,
    ORCHESTRATOR,
    PROVIDER,
    REGISTRY,
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
from api.seeds import api_chat_stream, chat_stream
from api.ws import websocket
from core.config import Settings
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.provider_registry import RegistryConfigError, default_model, open_registry
from pipeline.sessions import SessionCoordinator
from pipeline.tools import build_registry
from pipeline.wiring import agent_options
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


async def orchestrator_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # The speech tools use the model endpoint's audio API through the same client.
    app[TOOLS] = await asyncio.to_thread(build_registry, settings, audio=app[PROVIDER].client)
    app[ORCHESTRATOR] = StreamingOrchestrator(
        provider=app[REGISTRY], store=app[STORE],
        default_model=default_model(app[REGISTRY], settings),
        history_limit=settings.history_max_messages, tools=app[TOOLS],
        **agent_options(settings, registry=app[REGISTRY], tools=app[TOOLS], store=app[STORE]),
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
    app.router.add_post("/chat/stream", chat_stream)  # seed 003's wire (issue 14)
    app.router.add_post("/api/chat/stream", api_chat_stream)  # seed 001's wire (issue 14)
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
    try:
        asyncio.run(serve(settings))
    except RegistryConfigError as exc:  # providers and agents that cannot work (issue 14)
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""What operators and browsers look at: ``/healthz``, ``/metrics``, ``/v1/tools``,
``/speech/providers``, the viewer page, and the access log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from api.cluster import identity
from api.common import (
    CLIENTS,
    EVENT_LOG,
    ORCHESTRATOR,
    PROVIDER,
    REGISTRY,
    SETTINGS,
    STORE,
    TOOLS,
    WEB_ROOT,
    api_keys,
)
from core.logs import REQUEST_ID, request_scope
from pipeline.tools import speech_provider_info
from sinks.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)
access = logging.getLogger("access")

METRICS = web.AppKey("metrics", Metrics)


async def index_page(request: web.Request) -> web.FileResponse:
    """``GET /``: the roundtable viewer (no build step)."""
    return web.FileResponse(WEB_ROOT / "index.html")



async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness plus the figures an operator looks at first. It is open
    to anyone (no key), so it names no file system paths."""
    app = request.app
    settings = app[SETTINGS]
    stats = app[STORE].stats
    store = app[STORE].health()
    # The distributed log (issue 13): degraded while Redis is unreachable (turns go on).
    event_log = app[EVENT_LOG].health() if EVENT_LOG in app else {"kind": "memory", "state": "ok"}
    # A store that cannot write is not healthy (503), even before new turns are refused.
    status = "ok" if store.writable and event_log["state"] == "ok" else "degraded"
    return web.json_response(status=200 if store.writable else 503, data={
        "status": status,
        **await identity(app),  # worker, pid, workers (issue 13)
        "event_log": event_log,
        "model": {"offline": settings.offline, "base_url": app[PROVIDER].name,
                  "default": app[ORCHESTRATOR].default_model,
                  "default_provider": app[REGISTRY].default},
        "providers": app[REGISTRY].health(),  # issue 14: each provider's state
        "live_turns": len(app[ORCHESTRATOR].live),
        "clients": {"open": app[CLIENTS].open, "cut_off": app[CLIENTS].cut_off},
        "turn_subscribers": sum(turn.subscribers for turn in app[ORCHESTRATOR].live.values()),
        "store": {"writable": store.writable, "accepting": store.accepting,
                  "backlog_rows": store.backlog_rows, "backlog_max_rows": store.backlog_max_rows,
                  "retry_in_s": store.retry_in_s, "dead_letters": store.dead_letters,
                  "events_written": stats.events_written,
                  "flushes": stats.flushes, "failed_flushes": stats.failed_flushes,
                  "last_flush_ms": round(stats.last_flush_ms), "last_error": store.last_error},
        "tools": {"enabled": [tool.name for tool in app[TOOLS].enabled()],
                  "disabled": [tool.name for tool in app[TOOLS].tools if not tool.enabled]},
    })


def add_metrics(app: web.Application) -> Metrics:
    """Give the app its own metrics (``GET /metrics``): turn metrics come from the
    orchestrator's tap (``metrics.tap``); the state ones read the app at scrape time."""
    metrics = app[METRICS] = Metrics()
    metrics.gauge("agentflow_live_turns", "Turns running now.", lambda: len(app[ORCHESTRATOR].live))
    metrics.gauge("agentflow_open_streams", "SSE streams open to clients now.",
                  lambda: app[CLIENTS].open)
    metrics.counter("agentflow_store_flush_failures", "Event store batches that failed to write.",
                    lambda: app[STORE].stats.failed_flushes)
    metrics.counter("agentflow_client_cutoffs", "SSE clients cut off for falling behind or "
                    "blocking writes (they resume with Last-Event-ID).", lambda: app[CLIENTS].cut_off)
    metrics.labelled_counter(
        "agentflow_provider_errors", "Failed model calls (unreachable, HTTP error, timeout, "
        "malformed stream), by provider (PROVIDERS).", "provider",
        lambda: {name: entry.provider.failures for name, entry in app[REGISTRY].entries.items()})
    app.router.add_get("/metrics", metrics_page)
    return metrics


async def metrics_page(request: web.Request) -> web.Response:
    """``GET /metrics``: every metric in the Prometheus text format."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def list_tools(request: web.Request) -> web.Response:
    """``GET /v1/tools``: every tool with its parameters' JSON schema and whether it is on;
    the workspace folder only when API keys are configured (the caller holds one)."""
    registry = request.app[TOOLS]
    answer: dict[str, Any] = {
        "object": "list", "max_steps": registry.limits.max_steps,
        "data": [tool.describe() for tool in registry.tools],
    }
    if api_keys(request.app[SETTINGS]):  # the door let only a caller with a key in
        answer["workspace"] = registry.info.get("workspace")
    return web.json_response(answer)


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


# -- the access log: one line per HTTP request ------------------------------------------
@web.middleware
async def access_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Log one line per request when it ends (a stream: when it closes): method, path,
    status, duration and the request id (``X-Request-Id`` when the handler set one).

    It also scopes the request id: a turn started by the handler binds it
    (:func:`core.logs.bind_request_id`), so the handler's own lines carry it too. A client
    that left before the response ended is logged with status 499 (nginx's "client closed").
    """
    if not request.app[SETTINGS].access_log:
        with request_scope():
            return await handler(request)
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    with request_scope():
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            request_id = (response.headers.get("X-Request-Id") if response is not None else None
                          ) or REQUEST_ID.get()
            duration_ms = round((time.perf_counter() - started) * 1000)
            access.info("%s %s %d %dms", request.method, request.path, status, duration_ms,
                        extra={"method": request.method, "path": request.path, "status": status,
                               "duration_ms": duration_ms, "request_id": request_id,
                               "remote": request.remote})


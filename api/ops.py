"""What operators and browsers look at: ``/healthz``, ``/v1/tools``, ``/speech/providers``
and the viewer page."""

from __future__ import annotations

import logging

from aiohttp import web

from api.common import (
    CLIENTS,
    EVENT_LOG,
    ORCHESTRATOR,
    PROVIDER,
    SETTINGS,
    STORE,
    TOOLS,
    WEB_ROOT,
)
from pipeline.tools import speech_provider_info

log = logging.getLogger(__name__)


async def index_page(request: web.Request) -> web.FileResponse:
    """``GET /``: the roundtable viewer (no build step)."""
    return web.FileResponse(WEB_ROOT / "index.html")



async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness plus the figures an operator looks at first."""
    app = request.app
    settings = app[SETTINGS]
    stats = app[STORE].stats
    # The distributed log (issue 13): degraded while Redis is unreachable (turns go on).
    event_log = app[EVENT_LOG].health() if EVENT_LOG in app else {"kind": "memory", "state": "ok"}
    return web.json_response({
        "status": "degraded" if event_log["state"] != "ok" else "ok",
        "event_log": event_log,
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




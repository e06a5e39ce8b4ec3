"""What operators and browsers look at: ``/healthz``, ``/v1/tools``, ``/speech/providers``
and the viewer page."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from api.common import (
    CLIENTS,
    ORCHESTRATOR,
    PROVIDER,
    SETTINGS,
    STORE,
    TOOLS,
    WEB_ROOT,
    api_keys,
)
from pipeline.tools import speech_provider_info

log = logging.getLogger(__name__)


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
    # A store that cannot write is not healthy (503), even before new turns are refused.
    status = "ok" if store.writable else "degraded"
    return web.json_response(status=200 if store.writable else 503, data={
        "status": status,
        "model": {"offline": settings.offline, "base_url": app[PROVIDER].name,
                  "default": settings.default_model},
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




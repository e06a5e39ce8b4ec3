"""The worker role's RemoteStore without a recorder: failures are reported, never success."""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from api.analytics import ANALYTICS, Analytics, add_analytics_routes
from api.common import SETTINGS, json_errors
from core.config import Settings
from core.errors import StoreError
from sinks.remote_store import (
    RecorderUnavailableError,
    RemoteStore,
    decode,
    encode,
    log_barrier,
)
from tests.procs import free_port


def test_datetimes_come_back_as_datetimes() -> None:
    row = {"started_at": datetime.datetime(2026, 12, 1, 16, 0, 0, 123456), "n": 1,
           "nested": [{"at": datetime.datetime(2026, 1, 1)}], "text": "x"}
    assert decode(json.dumps(encode(row))) == row


async def test_an_unreachable_recorder_raises_a_store_error_and_degrades_health() -> None:
    store = RemoteStore(f"http://127.0.0.1:{free_port()}", timeout_s=1, poll_s=0.05)
    await store.start()
    try:
        health = store.health()
        assert health.writable is False and health.accepting is True
        assert health.last_error is not None and "recorder unreachable" in health.last_error
        with pytest.raises(RecorderUnavailableError) as caught:
            await store.flush(request_id="req_x", seq=3)
        assert isinstance(caught.value, StoreError)
        with pytest.raises(RecorderUnavailableError):
            await store.load_history("conv", limit=10)
        with pytest.raises(RecorderUnavailableError):
            await store.request_row("req_x")
        with pytest.raises(StoreError):
            store.cursor()
    finally:
        await store.aclose()


def _worker_app(remote: RemoteStore, tmp_path: Path) -> web.Application:
    """The analysts' routes as a worker mounts them (server.py): the store is ``remote``."""
    app = web.Application(middlewares=[json_errors])
    app[SETTINGS] = Settings(db_path=tmp_path / "never-opened.duckdb", export_interval_s=0)
    app[ANALYTICS] = Analytics(connect=remote.cursor, flush=remote.flush,
                               settings=app[SETTINGS], remote=remote.answer_query,
                               remote_export=remote.export)
    add_analytics_routes(app)
    return app


REPORT = {"lake": "/srv/lake", "files": [{"path": "events/date=2026-12-01/part-1.parquet",
                                          "rows": 3, "bytes": 100}],
          "rows": {"events": 3}, "requests": 1, "watermark": "2026-12-01T16:00:00",
          "previous_watermark": None, "elapsed_ms": 4}


async def test_post_export_on_a_worker_is_the_recorders_answer_and_its_failures_are_5xx(
        aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    """The worker forwards POST /v1/export to the recorder: its report is the answer; an
    export that failed there is a 500 with a JSON error, and a recorder that cannot be
    reached a 503 with one; never a success."""
    mode = {"export": "ok"}
    asked: list[Any] = []

    async def export(request: web.Request) -> web.Response:
        asked.append(await request.json())
        if mode["export"] == "ok":
            return web.json_response(REPORT)
        return web.json_response({"error": {"message": "OSError: [Errno 20] Not a directory",
                                            "type": "server_error", "code": "internal_error"}},
                                 status=500)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "store": {"writable": True}})

    recorder = web.Application()
    recorder.router.add_post("/internal/export", export)
    recorder.router.add_get("/internal/health", health)
    recorder_server = await aiohttp_server(recorder)
    remote = RemoteStore(str(recorder_server.make_url("")).rstrip("/"), timeout_s=2, poll_s=5)
    await remote.start()
    try:
        client = await aiohttp_client(_worker_app(remote, tmp_path))
        resp = await client.post("/v1/export")
        assert resp.status == 200 and await resp.json() == REPORT
        assert asked and "timeout_s" in asked[0]
        mode["export"] = "fail"
        resp = await client.post("/v1/export")
        error = (await resp.json())["error"]
        assert resp.status == 500 and error["code"] == "export_failed", error
        assert "Not a directory" in error["message"]
    finally:
        await remote.aclose()

    gone = RemoteStore(f"http://127.0.0.1:{free_port()}", timeout_s=1, poll_s=5)
    await gone.start()
    try:
        client = await aiohttp_client(_worker_app(gone, tmp_path))
        resp = await client.post("/v1/export")
        error = (await resp.json())["error"]
        assert resp.status == 503 and error["code"] == "store_unavailable", error
        assert "cannot be reached" in error["message"]
    finally:
        await gone.aclose()


class _Appended:
    """The event log's side of the barrier: the turn's events are in it."""

    async def appended(self, request_id: str, *, seq: int = 1, within: float) -> bool:
        return True


async def _late_recorder(port: int, *, after_s: float, syncs: list[dict[str, Any]]
                         ) -> web.AppRunner:
    """A recorder that starts answering ``/internal/sync`` only ``after_s`` from now
    (killed, restarted by the supervisor)."""
    await asyncio.sleep(after_s)

    async def sync(request: web.Request) -> web.Response:
        syncs.append(await request.json())
        return web.json_response({"ok": True})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/internal/sync", sync)
    app.router.add_get("/internal/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_the_done_barrier_waits_for_a_restarting_recorder_within_its_time() -> None:
    """A recorder that died is restarted by the supervisor while the turn's events wait in
    the log: the barrier waits for it (within its timeout) instead of failing the turn."""
    port = free_port()
    store = RemoteStore(f"http://127.0.0.1:{port}", timeout_s=1, poll_s=0.05)
    await store.start()
    syncs: list[dict[str, Any]] = []
    late = asyncio.ensure_future(_late_recorder(port, after_s=0.6, syncs=syncs))
    try:
        durable = log_barrier(_Appended(), store, timeout_s=5)  # type: ignore[arg-type]
        await durable("req_a", 7)
        assert [(s["request_id"], s["seq"]) for s in syncs] == [("req_a", 7)]
    finally:
        # The client first: its health polls must not open a connection while the server
        # shuts down (one accepted then was left unclosed: a ResourceWarning in the next test).
        await store.aclose()
        await (await late).cleanup()


async def test_the_done_barrier_fails_when_the_recorder_stays_away() -> None:
    store = RemoteStore(f"http://127.0.0.1:{free_port()}", timeout_s=1, poll_s=0.05)
    await store.start()
    try:
        durable = log_barrier(_Appended(), store, timeout_s=0.5)  # type: ignore[arg-type]
        started = asyncio.get_running_loop().time()
        with pytest.raises(RecorderUnavailableError):
            await durable("req_a", 7)
        assert asyncio.get_running_loop().time() - started >= 0.4  # it waited, then failed
    finally:
        await store.aclose()

"""Analysts' endpoints: read-only SQL, the Parquet export and its files; the export schedule.

============================================  ==============================================
``POST /v1/query``                            ``{"sql", "format"?, "max_rows"?}`` → JSON
                                              ``{"columns", "types", "rows", "truncated", …}``,
                                              CSV or Parquet (``format`` or ``Accept``)
``POST /v1/export``                           export now; the files written and the watermark
``GET /v1/export``                            every file of the lake (path, rows, bytes)
``GET /v1/export/files/{path}``               one file of the lake
============================================  ==============================================

All of them want ``Authorization: Bearer <ADMIN_KEY>`` when ``ADMIN_KEY`` is set.
Wiring: put an :class:`Analytics` under :data:`ANALYTICS` once the store is open, and call
:func:`add_analytics_routes` after the store's ``cleanup_ctx`` is registered (the scheduled
export, :func:`export_ctx`, must start after the store and stop before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from api.wire import ApiError, read_body
from core.config import Settings
from sinks.lake import ExportReport, export_lake, list_lake, read_state
from sinks.query import (
    QueryAnswer,
    QueryError,
    QueryRefusedError,
    QueryResult,
    parquet_bytes,
    run_query,
    run_query_arrow,
)
from sinks.remote_store import RecorderUnavailableError

log = logging.getLogger(__name__)

PARQUET_TYPE = "application/vnd.apache.parquet"
_ACCEPT = {"text/csv": "csv", PARQUET_TYPE: "parquet", "application/x-parquet": "parquet",
           "application/json": "json"}
MAX_CONCURRENT_QUERIES = 4  # each DuckDB query already uses every core


@dataclasses.dataclass(slots=True)
class Analytics:
    """What the analysts' endpoints need from the server.

    Attributes:
        connect: Returns a connection on the store's database (e.g. ``store.cursor``);
            each query and export takes its own cursor from it.
        flush: The store's write barrier, so a query sees every event recorded before it.
        settings: Row limit, timeout, lake folder, schedule, admin key.
        remote: Answers ``/v1/query`` in another process (see below).
    """

    connect: Callable[[], duckdb.DuckDBPyConnection]
    flush: Callable[[], Awaitable[None]]
    settings: Settings
    #: Answers a query elsewhere (the worker role: in the recorder process, which holds the
    #: file): ``(sql, format, limits) → QueryAnswer``; None runs it on ``connect()``.
    remote: Callable[[str, str, dict[str, Any]], Awaitable[QueryAnswer]] | None = None
    #: Runs ``POST /v1/export`` elsewhere (the worker role: the recorder, which has the
    #: file) and returns its report's JSON; None exports here (:meth:`export`).
    remote_export: Callable[[], Awaitable[dict[str, Any]]] | None = None
    export_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    queries: asyncio.Semaphore = dataclasses.field(
        default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_QUERIES))
    last_export: ExportReport | None = None

    async def export(self) -> ExportReport:
        """Flush the store, then export what closed since the last run (one run at a time)."""
        async with self.export_lock:
            await self.flush()
            con = self.connect()
            report = await asyncio.to_thread(_closing(con, export_lake), con, self.settings.lake_dir)
            self.last_export = report
            return report


_R = TypeVar("_R")


def _closing(con: duckdb.DuckDBPyConnection, work: Callable[..., _R]) -> Callable[..., _R]:
    """``work`` that closes ``con`` when done, in its worker thread: closing a connection
    closes its cursors, so a cancelled handler must not close it under a running query."""

    def run(*args: Any, **kwargs: Any) -> _R:
        try:
            return work(*args, **kwargs)
        finally:
            con.close()

    return run


ANALYTICS = web.AppKey("analytics", Analytics)


class QueryRequest(BaseModel):
    """Body of ``POST /v1/query``."""

    model_config = ConfigDict(extra="forbid")

    sql: str = Field(min_length=1, max_length=100_000)
    format: Literal["json", "csv", "parquet"] | None = None
    max_rows: StrictInt | None = Field(default=None, ge=1)


def _denied(request: web.Request) -> web.Response | None:
    """A 401 when ``ADMIN_KEY`` is set and the request does not carry it, else None."""
    key = _analytics(request).settings.admin_key
    if not key:
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return None
    error = ApiError(401, "this endpoint needs the header Authorization: Bearer <ADMIN_KEY>",
                     type="authentication_error", code="unauthorized")
    return web.json_response(error.body(), status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="analytics"'})


def _wanted_format(request: web.Request, body: QueryRequest) -> str:
    if body.format is not None:
        return body.format
    for part in request.headers.get("Accept", "").split(","):
        kind = part.split(";")[0].strip().lower()
        if kind in _ACCEPT:
            return _ACCEPT[kind]
    return "json"


def _analytics(request: web.Request) -> Analytics:
    try:
        return request.app[ANALYTICS]
    except KeyError:
        raise ApiError(503, "the event store is not open", type="server_error",
                       code="store_unavailable") from None


async def query(request: web.Request) -> web.StreamResponse:
    """``POST /v1/query``: one read-only SQL statement over the store."""
    if (denied := _denied(request)) is not None:
        return denied
    analytics = _analytics(request)
    settings = analytics.settings
    body = await read_body(request, QueryRequest)
    fmt = _wanted_format(request, body)
    max_rows = min(body.max_rows or settings.query_max_rows, settings.query_max_rows)
    await analytics.flush()  # every event recorded before the query is in it
    limits = {"max_rows": max_rows, "timeout_s": settings.query_timeout_s,
              "max_bytes": settings.query_max_bytes}
    if analytics.remote is not None:
        try:
            answer = await analytics.remote(body.sql, fmt, limits)
        except QueryError as exc:
            raise _api_error(exc) from exc
        headers = _result_headers(answer.rows, answer.truncated)
        if answer.content_type.startswith("text/"):
            return web.Response(text=answer.body.decode(), content_type=answer.content_type,
                                charset="utf-8", headers=headers)
        return web.Response(body=answer.body, content_type=answer.content_type,
                            headers=headers)
    async with analytics.queries:
        con = analytics.connect()
        try:
            if fmt == "parquet":
                table, truncated = await asyncio.to_thread(
                    _closing(con, run_query_arrow), con, body.sql, **limits)
                payload = await asyncio.to_thread(parquet_bytes, table)
                return web.Response(body=payload, content_type=PARQUET_TYPE,
                                    headers=_result_headers(table.num_rows, truncated))
            # Fetching and serialising share the worker thread and the timeout; the rows
            # are serialised as they are fetched, up to QUERY_MAX_BYTES.
            result, text = await asyncio.to_thread(
                _closing(con, _serialised), con, body.sql, fmt, **limits)
        except QueryError as exc:
            raise _api_error(exc) from exc
    headers = _result_headers(len(result.rows), result.truncated)
    if fmt == "csv":
        return web.Response(text=text, content_type="text/csv", charset="utf-8", headers=headers)
    return web.Response(text=text, content_type="application/json", headers=headers)


def _serialised(con: duckdb.DuckDBPyConnection, sql: str, fmt: str, **limits: Any
                ) -> tuple[QueryResult, str]:
    result = run_query(con, sql, **limits)
    return result, result.to_csv() if fmt == "csv" else result.to_json_text()


def _result_headers(rows: int, truncated: bool) -> dict[str, str]:
    return {"X-Row-Count": str(rows), "X-Truncated": "true" if truncated else "false"}


def _api_error(exc: QueryError) -> ApiError:
    # 403: understood and refused; a timeout is the query's doing like a syntax error (400).
    status = 403 if isinstance(exc, QueryRefusedError) or exc.code == QueryRefusedError.code else 400
    return ApiError(status, str(exc), code=exc.code, param="sql")


async def export_now(request: web.Request) -> web.Response:
    """``POST /v1/export``: export what closed since the last run, now."""
    if (denied := _denied(request)) is not None:
        return denied
    analytics = _analytics(request)
    if analytics.remote_export is not None:  # a worker: the recorder exports
        try:
            return web.json_response(await analytics.remote_export())
        except RecorderUnavailableError as exc:
            if exc.status != 500:
                raise  # unreachable, or not caught up: 503 store_unavailable
            raise ApiError(500, f"the export failed in the recorder: {exc}",
                           type="server_error", code="export_failed") from exc
    report = await analytics.export()
    return web.json_response(report.to_json())


async def export_manifest(request: web.Request) -> web.Response:
    """``GET /v1/export``: every file of the lake, and the watermark."""
    if (denied := _denied(request)) is not None:
        return denied
    analytics = _analytics(request)
    lake = analytics.settings.lake_dir
    files = await asyncio.to_thread(list_lake, lake)
    state = await asyncio.to_thread(read_state, lake)
    return web.json_response({
        "lake": str(lake.resolve()), "watermark": state.get("watermark"),
        "runs": state.get("runs", 0), "files": [f.to_json() for f in files],
    })


async def export_file(request: web.Request) -> web.StreamResponse:
    """``GET /v1/export/files/{path}``: one Parquet file of the lake (immutable once listed)."""
    if (denied := _denied(request)) is not None:
        return denied
    analytics = _analytics(request)
    lake = analytics.settings.lake_dir.resolve()
    wanted = request.match_info["path"]
    if "\x00" in wanted or not wanted.isprintable():  # NUL, control characters, surrogates
        raise ApiError(404, f"no file {wanted[:200]!r} in the lake; GET /v1/export lists them",
                       code="not_found", param="path")
    target = (lake / wanted).resolve()
    parts = Path(wanted).parts
    if (not target.is_relative_to(lake) or target.suffix != ".parquet"
            or any(p.startswith(".") for p in parts) or not target.is_file()):
        raise ApiError(404, f"no file {wanted!r} in the lake; GET /v1/export lists them",
                       code="not_found", param="path")
    return web.FileResponse(target, headers={"Content-Type": PARQUET_TYPE})


async def export_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the export every ``EXPORT_INTERVAL_S`` (0: never) while the app runs; not on a
    worker, whose store is the recorder's (the recorder runs it)."""
    analytics = app.get(ANALYTICS)
    interval = analytics.settings.export_interval_s if analytics is not None else 0
    task: asyncio.Task[None] | None = None
    if analytics is not None and analytics.remote is not None:
        interval = 0  # a worker: the recorder, which has the file, runs the schedule
    if analytics is not None and interval > 0:
        task = asyncio.create_task(_export_every(analytics, interval), name="lake-export")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _export_every(analytics: Analytics, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            report = await analytics.export()
        except Exception:  # keep the schedule alive; the next run retries the same window
            log.exception("scheduled Parquet export failed")
            continue
        if report.files:
            log.info("exported %d requests to %s (%s)", report.requests, report.lake,
                     ", ".join(f"{t} {n}" for t, n in report.rows.items()))


def add_analytics_routes(app: web.Application) -> None:
    """Mount ``/v1/query`` and ``/v1/export*`` and the export schedule on ``app``.

    Call it after the store's context is in ``app.cleanup_ctx``; ``app[ANALYTICS]`` must be
    set by the time requests arrive (e.g. in the store's context, right after it opens).
    """
    app.router.add_post("/v1/query", query)
    app.router.add_post("/v1/export", export_now)
    app.router.add_get("/v1/export", export_manifest)
    app.router.add_get("/v1/export/files/{path:.+}", export_file)
    app.cleanup_ctx.append(export_ctx)

"""The recorder process (``ROLE=recorder``, issue 13): the log recorder and its internal API.

The only process that opens the DuckDB file when the workers are fed from Redis: it runs
the :class:`~sinks.log_recorder.LogRecorder` and answers the workers' store calls
(:class:`~sinks.remote_store.RemoteStore`) on loopback, never the public routes:

==============================================  ===============================================
``GET /internal/health`` (also ``/healthz``)    the store's health and counters, the recorder's
``POST /internal/sync``                         ``{request_id?, seq?, events_only?, timeout_s?}``:
                                                returns once what the log holds is committed
``POST /internal/history``                      ``{conversation_id, limit, exclude_request_id?}``
                                                → the conversation's messages (memory)
``GET /internal/requests/{id}``                 the ``requests`` row, or ``null``
``GET /internal/requests/{id}/messages``        the request's messages
``GET /internal/requests/{id}/events``          ``?since=N&page=P``: stored events' JSON
``POST /internal/query``                        ``{sql, params}``: one read-only statement
``POST /internal/v1/query``                     a worker's ``/v1/query``: ``{sql, format,
                                                max_rows, timeout_s, max_bytes}`` → its body
``POST /internal/export``                       a worker's ``POST /v1/export``: ``{timeout_s?}``
                                                → the export report, as ``/v1/export`` answers
``GET|PUT|DELETE /internal/responses/{id}``     a row of ``responses`` (the Responses wire)
==============================================  ===============================================

With ``RECORDER_TOKEN`` set (``--workers N`` makes one per start and gives it to its
children), every route but the health needs ``Authorization: Bearer <RECORDER_TOKEN>``
(else ``401``): the port is loopback only, but any process on the machine can reach it.

Errors are JSON ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status. There is
no start-up recovery here: a turn ``running`` in the store may be alive on a worker (an owner
that died is closed through the log, by the worker that takes the turn over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from core.config import Settings
from core.errors import StoreError
from sinks.event_log import RedisEventLog
from sinks.lake import export_lake
from sinks.log_recorder import LogRecorder
from sinks.query import QueryError, QueryRefusedError, answer_query, check_query
from sinks.remote_store import HEALTH_PATH, QUERY_PATH, encode
from sinks.responses_table import ResponseRecord
from sinks.store import EventStore

log = logging.getLogger(__name__)

RECORDER_SETTINGS = web.AppKey("recorder_settings", Settings)
RECORDER_STORE = web.AppKey("recorder_store", EventStore)
RECORDER_LOG = web.AppKey("recorder_log", RedisEventLog)
LOG_RECORDER = web.AppKey("log_recorder", LogRecorder)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, code: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": code}},
                             status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason, "http_error")
    except StoreError as exc:
        return _error(503, str(exc), "store_unavailable")
    except QueryError as exc:  # /v1/query's statuses: 403 refused, 400 otherwise
        return _error(403 if isinstance(exc, QueryRefusedError) else 400, str(exc), exc.code)
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, f"bad request: {exc!r}", "bad_request")
    except Exception as exc:  # a bug: still a JSON answer, and the traceback in the log
        log.exception("recorder API: %s %s failed", request.method, request.path)
        return _error(500, f"{type(exc).__name__}: {exc}", "internal_error")


#: What anyone on the machine may read without the key: the health (counters, no data).
_OPEN_PATHS: frozenset[str] = frozenset({HEALTH_PATH, "/healthz"})


def _auth(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Every route but the health needs ``Authorization: Bearer <RECORDER_TOKEN>``: the
    internal API reads the whole store and writes ``responses``, and its loopback port is
    open to every process on the machine."""
    expected = token.encode()

    @web.middleware
    async def authorized(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # (bytes a client sent that are not UTF-8 are compared as they came, not a 500)
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.encode("utf-8", "surrogateescape"), expected):
                return _error(401, "the recorder's internal API needs its key "
                              "(Authorization: Bearer RECORDER_TOKEN)", "invalid_api_key")
        return await handler(request)

    return authorized


def _json(value: Any) -> web.Response:
    return web.Response(text=json.dumps(encode(value), default=str),
                        content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    app = request.app
    store = app[RECORDER_STORE]
    h = store.health()
    stats = store.stats
    recorder = app[LOG_RECORDER].health()
    event_log = app[RECORDER_LOG].health()
    ok = h.writable and recorder["state"] == "ok" and event_log["state"] == "ok"
    return web.json_response(status=200 if h.writable else 503, data={
        "status": "ok" if ok else "degraded", "role": "recorder",
        "store": {"writable": h.writable, "accepting": h.accepting,
                  "backlog_rows": h.backlog_rows, "backlog_max_rows": h.backlog_max_rows,
                  "retry_in_s": h.retry_in_s, "dead_letters": h.dead_letters,
                  "last_error": h.last_error, "events_written": stats.events_written,
                  "flushes": stats.flushes, "failed_flushes": stats.failed_flushes,
                  "last_flush_ms": stats.last_flush_ms, "retries": stats.retries},
        "recorder": recorder, "event_log": event_log,
    })


def _timeout(body: dict[str, Any], app: web.Application) -> float:
    limit = app[RECORDER_SETTINGS].recorder_timeout_s
    return min(float(body.get("timeout_s") or limit), limit)


async def sync(request: web.Request) -> web.Response:
    body = await _body(request)
    seq = body.get("seq")
    await request.app[LOG_RECORDER].sync(
        request_id=body.get("request_id"), seq=None if seq is None else int(seq),
        events_only=bool(body.get("events_only")), timeout_s=_timeout(body, request.app))
    return _json({"ok": True})


async def history(request: web.Request) -> web.Response:
    body = await _body(request)
    conversation_id = str(body["conversation_id"])
    await request.app[LOG_RECORDER].sync(conversation_id=conversation_id,
                                         timeout_s=_timeout(body, request.app))
    messages = await request.app[RECORDER_STORE].load_history(
        conversation_id, limit=int(body["limit"]),
        exclude_request_id=body.get("exclude_request_id"))
    return _json(messages)


async def request_row(request: web.Request) -> web.Response:
    return _json(await request.app[RECORDER_STORE].request_row(request.match_info["request_id"]))


async def messages_of(request: web.Request) -> web.Response:
    return _json(await request.app[RECORDER_STORE].messages_of(request.match_info["request_id"]))


async def events(request: web.Request) -> web.Response:
    since = int(request.query.get("since", "0"))
    page = min(int(request.query.get("page", "1000")), 10_000)
    if since < 0 or page < 1:
        raise ValueError("since must be ≥ 0 and page ≥ 1")
    rows = await request.app[RECORDER_STORE].aquery(
        "SELECT data FROM events WHERE request_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        [request.match_info["request_id"], since, page])
    return _json([data for (data,) in rows])


async def query(request: web.Request) -> web.Response:
    body = await _body(request)
    sql = str(body["sql"])
    store = request.app[RECORDER_STORE]

    def checked() -> None:
        cursor = store.cursor()
        try:
            check_query(cursor, sql, max_rows=1)  # one read-only statement, as /v1/query
        finally:
            cursor.close()

    await asyncio.to_thread(checked)
    rows = await store.aquery(sql, list(body.get("params") or []))
    return _json([list(row) for row in rows])


async def response_get(request: web.Request) -> web.Response:
    found = await request.app[RECORDER_STORE].responses().load(request.match_info["response_id"])
    return _json(None if found is None else dataclasses.asdict(found))


async def response_put(request: web.Request) -> web.Response:
    body = await _body(request)
    record = ResponseRecord(**{**body, "response_id": request.match_info["response_id"]})
    await request.app[RECORDER_STORE].responses().save(record)
    return _json({"ok": True})


async def response_delete(request: web.Request) -> web.Response:
    await request.app[RECORDER_STORE].responses().delete(request.match_info["response_id"])
    return _json({"ok": True})


async def analysts_query(request: web.Request) -> web.Response:
    """``/v1/query`` answered for a worker: ``{sql, format, max_rows, timeout_s, max_bytes}``
    → the body as ``/v1/query`` sends it, ``X-Row-Count`` and ``X-Truncated``."""
    body = await _body(request)
    fmt = str(body.get("format") or "json")
    if fmt not in ("json", "csv", "parquet"):
        raise ValueError(f"unknown format {fmt!r}")
    store = request.app[RECORDER_STORE]
    max_bytes = body.get("max_bytes")
    await request.app[LOG_RECORDER].sync(timeout_s=_timeout(body, request.app))
    con = store.cursor()

    def run() -> Any:
        try:
            return answer_query(con, str(body["sql"]), fmt, max_rows=int(body["max_rows"]),
                                timeout_s=float(body["timeout_s"]),
                                max_bytes=None if max_bytes is None else int(max_bytes))
        finally:
            con.close()

    answer = await asyncio.to_thread(run)
    return web.Response(body=answer.body, content_type=answer.content_type, headers={
        "X-Row-Count": str(answer.rows), "X-Truncated": "true" if answer.truncated else "false"})


async def export_now(request: web.Request) -> web.Response:
    """A worker's ``POST /v1/export``: catch up with the log (so the turns that closed in it
    are in), flush, export what closed since the last run; the report's JSON, the single
    process's answer. One run at a time per lake (with the schedule too:
    :func:`sinks.lake.export_lake` holds the lake's lock). A failed export is a 500 with
    its error, never a success."""
    body = await _body(request) if request.can_read_body else {}
    app = request.app
    await app[LOG_RECORDER].sync(timeout_s=_timeout(body, app))
    store = app[RECORDER_STORE]
    await store.flush()
    con = store.cursor()

    def run() -> Any:
        try:
            return export_lake(con, app[RECORDER_SETTINGS].lake_dir)
        finally:
            con.close()

    report = await asyncio.to_thread(run)
    log.info("recorder: exported %d requests to %s (asked by a worker)", report.requests,
             report.lake)
    return web.json_response(report.to_json())


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """The store (the only writer of the file), the log, the recorder; stopped in reverse:
    the recorder first (its turns' entries stay pending), then the store writes what is
    queued, then the log disconnects."""
    settings = app[RECORDER_SETTINGS]
    store = EventStore.from_settings(settings)
    await asyncio.to_thread(store.open)
    await store.responses().create()
    event_log = RedisEventLog.from_settings(
        settings, max_connections=settings.recorder_redis_connections)
    await event_log.start()
    recorder = LogRecorder(event_log, store, consumer=settings.recorder_consumer,
                           claim_idle_s=settings.recorder_claim_idle_s,
                           lost_s=settings.recorder_lost_s,
                           retry_max_s=settings.event_log_retry_max_s,
                           sync_timeout_s=settings.recorder_timeout_s,
                           read_gap_s=settings.recorder_read_gap_s,
                           live_count=settings.recorder_read_count,
                           live_streams=settings.recorder_read_streams)
    app[RECORDER_STORE], app[RECORDER_LOG], app[LOG_RECORDER] = store, event_log, recorder
    await recorder.start()
    log.info("recorder: the only writer of %s, fed from %s (prefix %r, group %r, consumer %r)",
             settings.db_path, event_log.safe_url, settings.redis_prefix, recorder.group,
             recorder.consumer)
    exporting = None
    if settings.export_interval_s > 0:  # the lake is exported where the file is: here
        exporting = asyncio.create_task(
            _export_every(store, settings.lake_dir, settings.export_interval_s),
            name="lake-export")
    try:
        yield
    finally:
        if exporting is not None:
            exporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exporting
        await recorder.aclose()
        await asyncio.to_thread(store.close)
        await event_log.aclose()


async def _export_every(store: EventStore, lake: Path, interval_s: float) -> None:
    """``EXPORT_INTERVAL_S``: the Parquet export of the requests closed since the last run,
    as a ``single`` server runs it (workers have no file; they leave it to the recorder)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await store.flush()
            con = store.cursor()
            try:
                report = await asyncio.to_thread(export_lake, con, lake)
            finally:
                con.close()
        except Exception:  # keep the schedule alive; the next run retries the same window
            log.exception("recorder: scheduled Parquet export failed")
            continue
        if report.files:
            log.info("recorder: exported %d requests to %s", report.requests, report.lake)


def create_recorder_app(settings: Settings) -> web.Application:
    """The recorder's application: its resources and the internal routes only."""
    middlewares = [_json_errors]
    if settings.recorder_token:
        middlewares.insert(0, _auth(settings.recorder_token))
    app = web.Application(middlewares=middlewares, client_max_size=16 * 1024 * 1024)
    app[RECORDER_SETTINGS] = settings
    app.cleanup_ctx.append(_resources)
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_get("/healthz", health)
    app.router.add_post("/internal/sync", sync)
    app.router.add_post("/internal/history", history)
    app.router.add_get("/internal/requests/{request_id}", request_row)
    app.router.add_get("/internal/requests/{request_id}/messages", messages_of)
    app.router.add_get("/internal/requests/{request_id}/events", events)
    app.router.add_post("/internal/query", query)
    app.router.add_post(QUERY_PATH, analysts_query)
    app.router.add_post("/internal/export", export_now)
    app.router.add_get("/internal/responses/{response_id}", response_get)
    app.router.add_put("/internal/responses/{response_id}", response_put)
    app.router.add_delete("/internal/responses/{response_id}", response_delete)
    return app

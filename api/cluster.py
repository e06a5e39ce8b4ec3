"""Workers in the HTTP layer (issue 13): ``X-Worker`` on every answer, the worker list of
``/healthz``, and the turns of other workers (their owner, status and cancel).

Every process has a worker id (:func:`sinks.cluster.new_worker_id`), also alone
(``make run``): it is on every answer as ``X-Worker``. With ``EVENT_LOG=redis://…`` the
worker also joins the cluster (:class:`sinks.cluster.Cluster`): registration, leases,
the reaper and the cancel bus.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from aiohttp import web

from api.common import EVENT_LOG, ORCHESTRATOR, SETTINGS, STORE
from api.wire import ApiError
from core.errors import PipelineError
from core.events import Event
from pipeline.orchestrator import Turn
from pipeline.sessions import Round
from sinks.cluster import Cluster, RemoteCancelError, new_worker_id
from sinks.event_log import StreamHead
from sinks.store import EventStore

log = logging.getLogger(__name__)

WORKER_ID: web.AppKey[str] = web.AppKey("worker_id", str)
CLUSTER = web.AppKey("cluster", Cluster)


def add_worker_identity(app: web.Application) -> str:
    """Give the app its worker id and put it on every answer (``X-Worker``)."""
    worker_id = app[WORKER_ID] = new_worker_id()
    app.on_response_prepare.append(_worker_header)
    return worker_id


async def _worker_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Worker"] = request.app[WORKER_ID]


@contextlib.asynccontextmanager
async def worker_cluster(app: web.Application) -> AsyncIterator[Cluster | None]:
    """The cluster membership while the app runs (None with ``EVENT_LOG=memory``). It
    closes after the turns drained, before the event log closes."""
    settings = app[SETTINGS]
    event_log = app.get(EVENT_LOG)
    if event_log is None:
        yield None
        return

    async def cancel_local(request_id: str) -> dict[str, Any]:
        turn = app[ORCHESTRATOR].live.get(request_id)
        if turn is None:  # it just ended: say how
            await app[STORE].flush()
            row = await app[STORE].request_row(request_id)
            status = row["status"] if row is not None else None
            return {"cancelled": False, "status": status,
                    "message": f"the request already ended ({status}); nothing to cancel"}
        turn.cancel()
        result = await turn.result
        return {"cancelled": True, "status": result.status, "last_seq": result.last_seq}

    def lease_lost(request_id: str) -> None:
        turn = app[ORCHESTRATOR].live.get(request_id)
        if turn is not None:
            turn.cancel()

    def is_local(request_id: str) -> bool:
        return ORCHESTRATOR in app and request_id in app[ORCHESTRATOR].live

    cluster = Cluster(
        settings.event_log, prefix=settings.redis_prefix, event_log=event_log,
        # A worker's store is the recorder's: the closing events reach it through the log.
        store=own_store if isinstance(own_store := app[STORE], EventStore) else None,
        worker_id=app[WORKER_ID], lease_s=settings.turn_lease_s,
        meta_ttl_s=settings.event_log_ttl_s, live_ttl_s=settings.event_log_live_ttl_s,
        cancel_timeout_s=settings.remote_cancel_timeout_s, cancel_local=cancel_local,
        on_lease_lost=lease_lost, timeout_s=settings.event_log_timeout_s, is_local=is_local,
    )
    await cluster.start()
    app[CLUSTER] = cluster
    log.info("worker %s (pid %d) joined; turn leases of %.1fs", cluster.worker_id, cluster.pid,
             settings.turn_lease_s)
    try:
        yield cluster
    finally:
        await cluster.aclose()


async def identity(app: web.Application) -> dict[str, Any]:
    """The worker part of ``/healthz``: ``worker``, ``pid``, ``workers`` (every live one)."""
    me = {"id": app[WORKER_ID], "pid": os.getpid()}
    answer: dict[str, Any] = {"worker": me["id"], "pid": me["pid"], "workers": [me]}
    cluster = app.get(CLUSTER)
    if cluster is None:
        return answer
    try:
        workers = await cluster.workers()
    except PipelineError as exc:
        answer["workers_error"] = str(exc)
        return answer
    if not any(worker["id"] == me["id"] for worker in workers):
        workers.append(me)  # registration pending (Redis just came back)
    answer["workers"] = workers
    answer["cluster"] = cluster.health()
    return answer


async def wait_registered(app: web.Application, request_id: str) -> None:
    """A background turn's ``202`` waits (bounded) until its owner is in Redis."""
    cluster = app.get(CLUSTER)
    if cluster is not None:
        await cluster.registered(request_id, within=app[SETTINGS].event_log_timeout_s)


async def visible_everywhere(app: web.Application, turn: Turn) -> None:
    """With the distributed log, answer a background turn (its ``202``, a background
    response's first answer) once its first event is in Redis and its owner registered, so
    a follow-up on any other process finds it (bounded: Redis may be away)."""
    event_log = app.get(EVENT_LOG)
    if event_log is not None:
        await event_log.appended(turn.request_id, seq=1, within=app[SETTINGS].event_log_timeout_s)
        await wait_registered(app, turn.request_id)  # its owner too (issue 13)


async def logged_head(app: web.Application, request_id: str) -> StreamHead | None:
    """The head of the turn's stream in the distributed log (a turn another worker may
    run); None without the log, when the stream is not there, or when Redis cannot be
    asked (the caller falls back to the store)."""
    event_log = app.get(EVENT_LOG)
    if event_log is None:
        return None
    try:
        head = await event_log.head(request_id)
    except PipelineError as exc:  # Redis is away: the store may still have the turn
        log.warning("%s; falling back to the store", exc)
        return None
    return head if head.exists else None


def follow_logged(app: web.Application, request_id: str, *, since: int,
                  idle_s: float | None = None) -> AsyncGenerator[Event | None]:
    """Every event of the turn's stream in the distributed log after ``since``, then its
    live tail until ``done`` (use under ``contextlib.aclosing``; only for a stream that
    :func:`logged_head` found)."""
    return app[EVENT_LOG].follow(request_id, since=since, idle_s=idle_s)


async def logged_events(app: web.Application, request_id: str) -> list[Event] | None:
    """Every event of the turn's stream in the distributed log so far, when it is there
    and whole (seqs 1…n: no hole its owner is re-filling); else None (read the store)."""
    if await logged_head(app, request_id) is None:
        return None
    try:
        events = await app[EVENT_LOG].read_all(request_id)
    except PipelineError as exc:
        log.warning("%s; falling back to the store", exc)
        return None
    if not events or any(event.seq != seq for seq, event in enumerate(events, start=1)):
        return None
    return events


async def owner_of(app: web.Application, request_id: str) -> str | None:
    """The worker that runs (or ran) the turn: this one when it is live here, else what
    Redis says; None when nobody knows."""
    if request_id in app[ORCHESTRATOR].live:
        return app[WORKER_ID]
    cluster = app.get(CLUSTER)
    if cluster is None:
        return None
    try:
        meta = await cluster.meta(request_id)
    except Exception as exc:  # Redis away: the answer says less, it does not fail
        log.warning("reading the owner of %s from Redis failed: %s", request_id, exc)
        return None
    return meta.get("worker") if meta else None


async def remote_round(app: web.Application, request_id: str) -> dict[str, Any] | None:
    """The status of a turn this worker's store does not know, from Redis (its meta and
    its log's head), in the shape of ``GET /v1/requests/{id}``; None when Redis does not
    know it either."""
    cluster = app.get(CLUSTER)
    event_log = app.get(EVENT_LOG)
    if cluster is None or event_log is None:
        return None
    try:
        meta = await cluster.meta(request_id)
        if meta is None:
            return None
        head = await event_log.head(request_id)
    except Exception as exc:
        log.warning("reading %s from Redis failed: %s", request_id, exc)
        return None
    status = meta.get("status", "running")
    round_ = Round(
        response_id=request_id, session_id=meta.get("conversation_id", ""),
        request_id=request_id, conversation_id=meta.get("conversation_id", ""),
        status=status, live=status == "running", last_seq=head.last_seq if head.exists else None,
        model=meta.get("model"),
        usage={"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
        timings={"started_at": _float(meta.get("started_at")),
                 "finished_at": _float(meta.get("finished_at")),
                 "duration_ms": None, "first_token_ms": None},
        error=None, request=[], response=None, worker=meta.get("worker"),
    )
    return round_.model_dump(mode="json")


async def cancel_elsewhere(app: web.Application, request_id: str) -> dict[str, Any] | None:
    """Cancel a turn another worker runs, through its channel; None when no other worker
    runs it.

    Raises:
        RemoteCancelError: the owner could not be reached or did not answer.
    """
    cluster = app.get(CLUSTER)
    if cluster is None:
        return None
    try:
        owner = await cluster.owner(request_id)
    except Exception as exc:
        raise RemoteCancelError(f"Redis could not tell the owner of {request_id}: {exc}",
                                owner="") from exc
    if owner is None or owner == app[WORKER_ID]:
        return None
    answer = await cluster.cancel_remote(request_id, owner)
    return {"request_id": request_id, **answer, "worker": owner, "via": "owner"}


async def cancel_on_owner(app: web.Application, request_id: str) -> dict[str, Any] | None:
    """:func:`cancel_elsewhere` for a handler: an owner that cannot be reached is a 503
    ``owner_unreachable`` (retry: a dead owner's turn is closed within 3 × TURN_LEASE_S)."""
    try:
        return await cancel_elsewhere(app, request_id)
    except RemoteCancelError as exc:
        raise ApiError(503, str(exc), type="server_error", code="owner_unreachable",
                       headers={"Retry-After": "1"}) from exc


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None

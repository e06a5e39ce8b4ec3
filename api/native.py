"""The native wire: ``POST /v1/orchestrate``, ``POST /v1/roundtable`` and the durable
request endpoints (``/v1/requests/{id}/events``, status, cancel)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from aiohttp import web
from reactivex import compose

from api.cluster import (
    WORKER_ID,
    cancel_on_owner,
    follow_logged,
    logged_head,
    owner_of,
    remote_round,
    visible_everywhere,
)
from api.common import (
    COORDINATOR,
    MODELS,
    ORCHESTRATOR,
    REGISTRY,
    ROUNDTABLE_MODEL,
    SETTINGS,
    STORE,
    _accepted,
    _turn_headers,
    admit,
    admit_stream,
    check_model,
    parse_cursor,
    parse_flag,
    path_id,
    stream_native,
)
from api.wire import ApiError, OrchestrateRequest, read_body
from core.events import Event, is_trace
from core.turn import TurnInput
from operators import agent_filter, agent_view, resume_after, visible
from pipeline.harnesses import MemoryHarness
from pipeline.orchestrator import Turn
from pipeline.roundtable import Pacer, RoundtableHarness, RoundtableRequest
from sinks.store import StoreApi

log = logging.getLogger(__name__)


# -- handlers -------------------------------------------------------------------------
async def orchestrate(request: web.Request) -> web.StreamResponse:
    """``POST /v1/orchestrate``: run a turn and stream its native SSE frames.

    With ``background: true`` the answer is ``202`` at once and the turn runs on; follow it
    with ``GET /v1/requests/{id}/events``.
    """
    body = await read_body(request, OrchestrateRequest)
    admit(request)  # no await between the door and the turn's start: the limits are exact
    model = check_model(request, body.model)
    limit = request.app[SETTINGS].max_tool_calls_per_step
    if len(body.tool_calls) > limit:
        raise ApiError(400, f"tool_calls: {len(body.tool_calls)} calls; the limit is {limit} "
                       "(MAX_TOOL_CALLS_PER_STEP)", code="invalid_body", param="tool_calls")
    turn = request.app[ORCHESTRATOR].run(TurnInput(
        messages=body.messages, conversation_id=body.conversation_id, trace=body.trace,
        model=model, max_tokens=body.max_tokens, kind="orchestrate", tool_calls=body.tool_calls,
    ))
    if body.background:
        await visible_everywhere(request.app, turn)
        return _accepted(turn)
    settings = request.app[SETTINGS]
    events = turn.batches(compose(visible(trace=body.trace),
                                  agent_view(max_depth=body.max_depth, agents=body.agents)),
                          max_buffer=settings.client_buffer_events, idle_s=settings.heartbeat_s)
    return await stream_native(
        request, events, headers=_turn_headers(turn),
        on_disconnect=turn.cancel if body.on_disconnect == "cancel" else None,
    )



def start_roundtable(app: web.Application, spec: RoundtableRequest, *, kind: str,
                     paced: bool) -> tuple[Turn, Pacer]:
    """Validate a roundtable against the limits and models, then start it."""
    settings = app[SETTINGS]
    if spec.rounds > settings.roundtable_max_rounds:
        raise ApiError(400, f"rounds must be at most {settings.roundtable_max_rounds} "
                            "(ROUNDTABLE_MAX_ROUNDS)", code="invalid_body", param="rounds")
    if len(spec.panelists) > settings.roundtable_max_panelists:
        raise ApiError(400, f"at most {settings.roundtable_max_panelists} panelists "
                            "(ROUNDTABLE_MAX_PANELISTS)", code="invalid_body", param="panelists")
    for panelist in spec.panelists:
        model = panelist.model or settings.default_model
        if model not in app[MODELS] or model == ROUNDTABLE_MODEL:
            raise ApiError(404, f"panelist {panelist.name!r}: the model {model!r} does not "
                                "exist; GET /v1/models lists them.",
                           code="model_not_found", param="panelists")
    pacer = Pacer(window=settings.roundtable_window, paced=paced)
    harness = RoundtableHarness(
        provider=app[REGISTRY], spec=spec, pacer=pacer,
        memory=MemoryHarness(app[STORE], limit=settings.history_max_messages),
        max_buffer_per_panelist=settings.roundtable_max_queue,
    )
    turn = app[ORCHESTRATOR].run(
        TurnInput(messages=spec.opening_messages(), conversation_id=spec.conversation_id,
                  trace=spec.trace, max_tokens=spec.max_tokens, kind=kind),
        body=harness.body,
    )
    return turn, pacer


async def roundtable(request: web.Request) -> web.StreamResponse:
    """``POST /v1/roundtable``: several panelists in one native stream (see
    :mod:`pipeline.roundtable`). The posting client paces the panel: when it reads slower
    than the panel speaks, panelists' events are released round-robin."""
    body = await read_body(request, RoundtableRequest)
    admit(request)  # no await between the door and the turn's start: the limits are exact
    turn, pacer = start_roundtable(request.app, body, kind="roundtable",
                                   paced=not body.background)
    if body.background:
        await visible_everywhere(request.app, turn)
        return _accepted(turn)
    # The client paces the panel by what it has consumed, hidden trace events included:
    # credit spent on an llm_call it never sees must come back, or the panel would stall.
    settings = request.app[SETTINGS]
    everything = turn.events(trace=True, max_buffer=settings.client_buffer_events,
                             idle_s=settings.heartbeat_s)
    events = _acking_hidden(everything, trace=body.trace, ack=pacer.ack)
    try:
        return await stream_native(
            request, events, headers=_turn_headers(turn), on_written=pacer.ack,
            on_disconnect=turn.cancel if body.on_disconnect == "cancel" else None,
        )
    finally:
        pacer.unlimited()  # the pacing client is gone: the panel must never wait for it


async def _acking_hidden(
    events: AsyncGenerator[Event | None], *, trace: bool, ack: Callable[[int], None]
) -> AsyncGenerator[Event | None]:
    """The client's view of ``events``; trace events it does not see are acknowledged
    as consumed when they pass (idle marks pass through)."""
    async with contextlib.aclosing(events) as source:
        async for event in source:
            if event is None or trace or not is_trace(event):
                yield event
            else:
                ack(event.seq)



async def request_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/requests/{id}/events``: every event after the cursor, then the live tail.

    A cursor at or past the end of a finished request gets ``204 No Content``.

    A live turn is followed through its hot stream, which replays what the client missed
    before the live events, so nothing is lost or repeated while the store writes in
    batches. With ``EVENT_LOG=redis://…`` a turn not live in this process is followed from
    its Redis stream while that exists (it may run in another process). A finished request
    (also after a restart) is read from the store.
    """
    request_id = path_id(request, "request_id")
    since = parse_cursor(request)
    trace = parse_flag(request, "trace")
    admit_stream(request)
    max_depth, agents = parse_agent_view(request)
    app = request.app
    turn = app[ORCHESTRATOR].live.get(request_id)
    events: AsyncGenerator[Event | None]
    if turn is not None:
        events = turn.view(
            compose(resume_after(since), visible(trace=trace),
                    agent_view(max_depth=max_depth, agents=agents)),
            max_buffer=app[SETTINGS].client_buffer_events, idle_s=app[SETTINGS].heartbeat_s,
        )
    elif (redis_events := await _from_event_log(app, request_id, since, trace=trace)) is not None:
        if isinstance(redis_events, web.StreamResponse):
            return redis_events
        events = redis_events
    else:
        store = app[STORE]
        await store.flush()  # a turn that just finished may still be queued
        row = await store.request_row(request_id)
        if row is None:
            raise ApiError(404, f"no request {request_id!r}", code="request_not_found")
        if since and row["last_seq"] is not None and since >= row["last_seq"]:
            # Finished and fully seen: 204 tells EventSource to stop reconnecting.
            return web.Response(status=204, headers={"X-Request-Id": request_id})
        events = _stored(store, request_id, since, trace=trace,
                         keep=agent_filter(max_depth=max_depth, agents=agents))
    return await stream_native(request, events, headers={"X-Request-Id": request_id})


async def _from_event_log(
    app: web.Application, request_id: str, since: int, *, trace: bool
) -> AsyncGenerator[Event | None] | web.StreamResponse | None:
    """The turn's events from the distributed log if its stream is there (issue 13):
    a 204 when it is finished and fully seen; None to fall back to the store."""
    head = await logged_head(app, request_id)
    if head is None:
        return None
    if since and head.done and since >= head.last_seq:
        return web.Response(status=204, headers={"X-Request-Id": request_id})
    follow = follow_logged(app, request_id, since=since, idle_s=app[SETTINGS].heartbeat_s)
    return _visible_only(follow, trace=trace)


async def _visible_only(
    events: AsyncGenerator[Event | None], *, trace: bool
) -> AsyncGenerator[Event | None]:
    async with contextlib.aclosing(events) as source:
        async for event in source:
            if event is None or trace or not is_trace(event):
                yield event


async def _stored(
    store: StoreApi, request_id: str, since: int, *, trace: bool,
    keep: Callable[[Event], bool] = lambda _: True,
) -> AsyncGenerator[Event | None]:
    async for event in store.events_since(request_id, since):
        if (trace or not is_trace(event)) and keep(event):
            yield event


def parse_agent_view(request: web.Request) -> tuple[int | None, list[str] | None]:
    """``max_depth`` (a non-negative integer) and ``agents`` (comma-separated names) of the
    query: which streams this subscriber sees (issue 14)."""
    raw = request.query.get("max_depth")
    max_depth: int | None = None
    if raw is not None and raw != "":
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
            raise ApiError(400, f"max_depth must be a non-negative integer, got {raw[:40]!r}",
                           code="invalid_query", param="max_depth")
        max_depth = int(raw)
    names = request.query.get("agents")
    agents = [n.strip() for n in names.split(",") if n.strip()] if names else None
    return max_depth, agents


async def request_status(request: web.Request) -> web.Response:
    """``GET /v1/requests/{id}``: status and the round (request, messages, usage, timings)."""
    request_id = path_id(request, "request_id")
    app = request.app
    round_ = await app[COORDINATOR].get_round(request_id)
    if round_ is None:
        # Not in this worker's store: a turn of another worker, from Redis (issue 13).
        remote = await remote_round(app, request_id)
        if remote is None:
            raise ApiError(404, f"no request {request_id!r}", code="request_not_found")
        return web.json_response(remote)
    answer = round_.model_dump(mode="json")
    answer["worker"] = await owner_of(app, request_id)
    return web.json_response(answer)



async def request_cancel(request: web.Request) -> web.Response:
    """``POST /v1/requests/{id}/cancel``: stop a running turn, keeping its partial answer."""
    request_id = path_id(request, "request_id")
    app = request.app
    turn = app[ORCHESTRATOR].live.get(request_id)
    if turn is not None:
        turn.cancel()
        result = await turn.result
        return web.json_response({"request_id": request_id, "cancelled": True,
                                  "status": result.status, "last_seq": result.last_seq,
                                  "worker": app[WORKER_ID]})
    # another worker's turn: the cancel goes to its owner (issue 13)
    forwarded = await cancel_on_owner(app, request_id)
    if forwarded is not None:
        return web.json_response(forwarded)
    await app[STORE].flush()
    row = await app[STORE].request_row(request_id)
    status = row["status"] if row is not None else None
    if row is None and (remote := await remote_round(app, request_id)) is not None:
        status = remote["status"]
    if status is None:
        raise ApiError(404, f"no request {request_id!r}", code="request_not_found")
    return web.json_response({
        "request_id": request_id, "cancelled": False, "status": status,
        "message": f"the request already ended ({status}); nothing to cancel",
    })




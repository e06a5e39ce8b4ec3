"""The Responses wire: ``POST /v1/responses``, ``GET /v1/responses/{id}`` (also streamed,
resumable with ``starting_after``), ``POST /v1/responses/{id}/cancel``, ``DELETE``.

A response is a turn: its id is the request id with ``resp_`` for ``req_``, its events are
the turn's (durable, numbered, replayable) and its stream is
:func:`operators.to_response_events` over them, whose ``sequence_number`` is a pure
function of the turn's events, so a resumed stream, live or from DuckDB after a restart,
continues exactly where the client left off.

With several workers (``--workers N``) a response belongs to the worker that runs its
turn, but any worker answers for it: its fixed fields are in the store before the first
answer (a background one's also waits until its turn is in the Redis log and its owner
registered), its events are read (snapshot) and followed (stream) from the turn's Redis
stream, through the same fold as the owner's, and a cancel goes to the owner over the
cluster's cancel bus (:mod:`api.cluster`).

What a response adds to its turn (instructions, metadata, tools, the parameters it was
created with) is kept in one small table, ``responses``, of the same DuckDB file, written
when the response is created (``store: true``, the default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Collection, Iterable, Mapping
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from reactivex import Observable
from reactivex import operators as ops

from api.cluster import (
    cancel_on_owner,
    follow_logged,
    logged_events,
    logged_head,
    visible_everywhere,
)
from api.common import (
    CLIENTS,
    ORCHESTRATOR,
    SETTINGS,
    STORE,
    _last_words,
    _turn_headers,
    admit,
    admit_stream,
    check_model,
    parse_flag,
    path_id,
)
from api.wire import ApiError, read_body
from core.errors import BufferOverflowError, PipelineError
from core.events import Event
from core.turn import ChatMessage, TurnInput
from operators import (
    TERMINAL_TYPES,
    ResponseEvent,
    ResponseFold,
    fold_response,
    to_response_events,
)
from pipeline.orchestrator import Turn
from sinks.responses_table import ResponseRecord
from sinks.sse import FrameWriter, json_bytes, open_sse
from sinks.store import StoreApi

log = logging.getLogger(__name__)

# -- the body ---------------------------------------------------------------------------
class FunctionTool(BaseModel):
    """A client function tool (``{"type": "function", "name", "parameters", …}``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesRequest(BaseModel):
    """Body of ``POST /v1/responses``. Unknown fields are a 400 naming them (nothing is
    dropped silently); so are values this server cannot honour (``text.format`` other than
    ``text``, ``include``, ``truncation: auto``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=200)
    max_output_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    store: StrictBool = True
    background: StrictBool = False
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    tools: list[FunctionTool] = Field(default_factory=list, max_length=128)
    # The order of api/wire.py's: Literals with the same values compare (and hash) equal
    # whatever their order, so a schema cached for one serves the other and two orders made
    # docs/api.md depend on which module was imported first.
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextOptions | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] = Field(default_factory=list, max_length=0)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None


def _check_tools(body: ResponsesRequest) -> None:
    """Tools and ``tool_choice`` that cannot go together are a 400 naming them."""
    names = [tool.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two function tools have the same name", code="invalid_body",
                       param="tools")
    choice = body.tool_choice
    if isinstance(choice, dict) and (choice.get("type") != "function" or choice.get("name") not in names):
        raise ApiError(400, "tool_choice must be auto, none, required or "
                       '{"type": "function", "name": <one of tools>}', code="invalid_body",
                       param="tool_choice")
    if choice in ("required",) and not names:
        raise ApiError(400, "tool_choice required needs tools", code="invalid_body",
                       param="tool_choice")
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise ApiError(400, "metadata: keys are at most 64 characters, values 512",
                           code="invalid_body", param="metadata")


def input_messages(
    body: ResponsesRequest, *, earlier_calls: list[dict[str, Any]] | None = None
) -> list[ChatMessage]:
    """``instructions`` and ``input`` as chat messages; unsupported items are a 400.

    Message items become messages of their role; ``function_call`` items become an
    assistant message's ``tool_calls`` (consecutive ones, one message), and
    ``function_call_output`` items ``role: "tool"`` messages. An output answering a call of
    the previous response (``earlier_calls``, its ``function_call`` output items) that the
    input does not repeat brings that call back first, so the model sees call then result.
    """
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    known = {str(item.get("call_id")) for item in items if item.get("type") == "function_call"}
    earlier = {str(call["call_id"]): call for call in earlier_calls or ()}
    for index, item in enumerate(items):
        where = f"input.{index}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"{where}.role must be user, system, developer or "
                               f"assistant, got {role!r}", code="invalid_body",
                               param=f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            _call_into(messages, _function_call(item, where))
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            if call_id not in known and call_id in earlier:
                known.add(call_id)
                _call_into(messages, _function_call(earlier[call_id], where))
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text_of(output, f"{where}.output")})
        else:
            raise ApiError(400, f"{where}: items of type {kind!r} are not supported; send "
                           "message, function_call or function_call_output items",
                           code="unsupported_input", param=where)
    return [ChatMessage.model_validate(message) for message in messages]


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where}.{name} must be a non-empty string", code="invalid_body",
                       param=f"{where}.{name}")
    return value


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call`` item as a chat ``tool_calls`` entry."""
    return {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where),
                         "arguments": str(item.get("arguments") or "")}}


def _call_into(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """Add a tool call to the assistant message just before, or to a new one."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant":
        last = {"role": "assistant", "content": ""}
        messages.append(last)
    last.setdefault("tool_calls", []).append(call)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts",
                       code="invalid_body", param=f"{where}.content")
    texts: list[str] = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(text, str):
            raise ApiError(400, f"{where}.content.{number}: only input_text and output_text "
                           f"parts are supported, got {kind!r}", code="unsupported_input",
                           param=f"{where}.content.{number}")
        texts.append(text)
    return "".join(texts)


# -- ids and the response's fixed fields -------------------------------------------------
def response_id_of(request_id: str) -> str:
    return "resp_" + request_id.removeprefix("req_")


def request_id_of(response_id: str) -> str:
    return "req_" + response_id.removeprefix("resp_")


class ResponseMeta(BaseModel):
    """What a response adds to its turn: its fixed fields and its function tools."""

    request_id: str
    base: dict[str, Any]
    function_tools: list[str] = Field(default_factory=list)
    stored: bool = True


#: Response id → its :class:`ResponseMeta`, while its turn runs (``store: false`` ones too).
LIVE: web.AppKey[dict[str, ResponseMeta]] = web.AppKey("responses_live")


async def _save_meta(store: StoreApi, meta: ResponseMeta) -> None:
    await store.responses().save(ResponseRecord(
        response_id=meta.base["id"], request_id=meta.request_id,
        created_at=float(meta.base["created_at"]), base=json.dumps(meta.base),
        function_tools=json.dumps(meta.function_tools)))


async def _load_meta(store: StoreApi, response_id: str) -> ResponseMeta | None:
    found = await store.responses().load(response_id)
    if found is None:
        return None
    return ResponseMeta(request_id=found.request_id, base=json.loads(found.base),
                        function_tools=json.loads(found.function_tools))


async def _delete_meta(store: StoreApi, response_id: str) -> None:
    await store.responses().delete(response_id)


async def _meta(request: web.Request, response_id: str) -> ResponseMeta:
    """The response's fixed fields: live, else from the store; else a 404."""
    meta = request.app[LIVE].get(response_id)
    if meta is None and response_id.startswith("resp_"):
        meta = await _load_meta(request.app[STORE], response_id)
    if meta is None:
        raise ApiError(404, f"no response {response_id!r}", code="response_not_found")
    return meta


def _base(body: ResponsesRequest, *, response_id: str, model: str) -> dict[str, Any]:
    return {
        "id": response_id, "created_at": int(time.time()), "model": model,
        "instructions": body.instructions, "metadata": dict(body.metadata or {}),
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "temperature": body.temperature, "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "previous_response_id": body.previous_response_id,
        "background": body.background, "store": body.store,
        "text": {"format": {"type": "text"}}, "truncation": "disabled",
        "user": body.user,
    }


# -- the events of a response --------------------------------------------------------------
def _snapshot_of_live(turn: Turn, meta: ResponseMeta) -> dict[str, Any]:
    """The response object of a turn (running or just ended), from its events so far."""
    events: list[Event] = []
    turn.stream.subscribe(events.append).dispose()  # the replay log hands over its history
    response, _ = fold_response(meta.base, events, function_tools=meta.function_tools)
    return response


async def _stored_events(store: StoreApi, request_id: str) -> list[Event]:
    await store.flush()  # a turn that just finished may still be queued
    return [event async for event in store.events_since(request_id, 0)]


async def _snapshot(request: web.Request, meta: ResponseMeta) -> dict[str, Any]:
    """The response object now: from the live turn here, else from the turn's Redis stream
    (a turn another worker runs, or one that just ended), else from the store."""
    app = request.app
    turn = app[ORCHESTRATOR].live.get(meta.request_id)
    if turn is not None:
        return _snapshot_of_live(turn, meta)
    logged = await logged_events(app, meta.request_id)
    if logged is not None:
        response, _ = fold_response(meta.base, logged, function_tools=meta.function_tools)
        return response
    events = await _stored_events(app[STORE], meta.request_id)
    response, _ = fold_response(meta.base, events, function_tools=meta.function_tools)
    if not events:  # stored meta, but its turn's events were lost (a kill before a flush)
        response.update(status="failed", error={
            "code": "server_error", "message": "the response's events were lost"})
    return response


def _frame(event: ResponseEvent) -> bytes:
    """``event: <type>`` / ``data: <json>``: no ``id:`` lines or comments (the ``openai``
    SDK's decoder breaks on mixes of them; the cursor is ``sequence_number``)."""
    kind = str(event["type"])
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(event) + b"\n\n"


async def _stream(
    request: web.Request, events: AsyncGenerator[ResponseEvent], *, headers: dict[str, str],
    on_disconnect: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Write Responses events as SSE. A client too slow for ``CLIENT_BUFFER_EVENTS`` or
    ``CLIENT_WRITE_TIMEOUT_S`` gets an ``error`` event (not numbered) and is cut off; it
    resumes with ``starting_after``."""
    app = request.app
    settings = app[SETTINGS]
    response = await open_sse(request, headers=headers)
    writer = FrameWriter(request, response, timeout_s=settings.client_write_timeout_s)
    app[CLIENTS].open += 1
    last = -1
    try:
        async with contextlib.aclosing(events) as source:
            async for event in source:
                await writer.write(_frame(event))
                last = event["sequence_number"]
    except (BufferOverflowError, TimeoutError) as exc:
        app[CLIENTS].cut_off += 1
        await _last_words(response, _frame({
            "type": "error", "code": "client_too_slow", "param": None, "sequence_number": last,
            "message": f"{exc or 'client too slow'}; resume with starting_after={last}"}))
    except ConnectionResetError:
        if on_disconnect is not None:
            on_disconnect()
    except asyncio.CancelledError:
        if on_disconnect is not None:
            on_disconnect()
        raise
    except Exception:
        log.exception("responses stream %s failed", request.path)
        await _last_words(response, _frame({
            "type": "error", "code": "server_error", "param": None, "sequence_number": last,
            "message": f"internal server error; resume with starting_after={last}"}))
    finally:
        app[CLIENTS].open -= 1
    return response


def _live_events(request: web.Request, turn: Turn, meta: ResponseMeta, after: int
                 ) -> AsyncGenerator[ResponseEvent]:
    to_events = to_response_events(response=meta.base, function_tools=meta.function_tools)

    def unseen(event: ResponseEvent) -> bool:
        return int(event["sequence_number"]) > after

    def transform(source: Observable[Event]) -> Observable[ResponseEvent]:
        return source.pipe(to_events, ops.filter(unseen))

    return turn.view(transform, max_buffer=request.app[SETTINGS].client_buffer_events)


async def response_events_after(
    events: AsyncIterable[Event | None], *, response: Mapping[str, Any],
    function_tools: Collection[str] = (), after: int = -1,
) -> AsyncGenerator[ResponseEvent]:
    """The Responses events of a turn's events (all of them, from its first: the numbering
    is a fold over the whole turn) numbered above ``after``; ``None`` (idle marks) are
    skipped. The same fold as :func:`operators.to_response_events`, over an async source:
    a turn followed from the Redis log through a worker that does not run it."""
    fold = ResponseFold(response, function_tools=function_tools)
    async for event in events:
        if event is None:
            continue
        for produced in fold.apply(event):
            if produced["sequence_number"] > after:
                yield produced


async def _logged_response_events(request: web.Request, meta: ResponseMeta, after: int
                                  ) -> AsyncGenerator[ResponseEvent]:
    """The response's events above ``after`` from its turn's Redis stream, live to its end."""
    follow = follow_logged(request.app, meta.request_id, since=0)
    async with contextlib.aclosing(follow) as source:
        async with contextlib.aclosing(response_events_after(
                source, response=meta.base, function_tools=meta.function_tools,
                after=after)) as events:
            async for event in events:
                yield event


async def _until_logged_done(request: web.Request, request_id: str) -> None:
    """Wait (bounded by ``EVENT_LOG_TIMEOUT_S``) until the turn's ``done`` is in its Redis
    stream: after a cancel its owner answered, the snapshot read next has the end."""
    head = await logged_head(request.app, request_id)
    if head is None or head.done:
        return
    with contextlib.suppress(TimeoutError, PipelineError):
        async with asyncio.timeout(request.app[SETTINGS].event_log_timeout_s):
            async with contextlib.aclosing(follow_logged(
                    request.app, request_id, since=head.last_seq)) as source:
                async for _ in source:
                    pass  # it returns after ``done``


async def _replayed(events: Iterable[ResponseEvent]) -> AsyncGenerator[ResponseEvent]:
    for event in events:
        yield event


# -- handlers -----------------------------------------------------------------------------
async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: run a turn and answer in the Responses API's shape."""
    body = await read_body(request, ResponsesRequest)
    _check_tools(body)
    limit = request.app[SETTINGS].responses_max_input_items
    if isinstance(body.input, list) and len(body.input) > limit:
        raise ApiError(400, f"input: {len(body.input)} items; the limit is {limit} "
                       "(RESPONSES_MAX_INPUT_ITEMS)", code="invalid_body", param="input")
    _checked_messages(body)  # a bad input is a 400 before anything starts
    if body.background and not body.store:
        raise ApiError(400, "background responses must be stored (store: true)",
                       code="invalid_body", param="background")
    admit(request)
    app = request.app
    model = check_model(request, body.model)
    conversation_id: str | None = None
    earlier_calls: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        conversation_id, earlier_calls = await _continued(request, body.previous_response_id)
    turn = app[ORCHESTRATOR].run(TurnInput(
        messages=_checked_messages(body, earlier_calls=earlier_calls),
        conversation_id=conversation_id, model=model, max_tokens=body.max_output_tokens,
        kind="responses", model_params=_model_params(body),
        # The server's own tools never run for a Responses caller unless the deployer says.
        server_tools=app[SETTINGS].openai_wire_server_tools,
    ))
    response_id = response_id_of(turn.request_id)
    meta = ResponseMeta(request_id=turn.request_id,
                        base=_base(body, response_id=response_id, model=model),
                        function_tools=[tool.name for tool in body.tools], stored=body.store)
    live = app[LIVE]
    live[response_id] = meta
    turn.result.add_done_callback(lambda _: live.pop(response_id, None))
    if body.store:
        try:
            await _save_meta(app[STORE], meta)
        except BaseException:
            # The client hears that the response failed (a 503 when the store cannot
            # write): so it must not run on where nobody could retrieve or cancel it.
            turn.cancel()
            raise
    headers = {**_turn_headers(turn), "X-Response-Id": response_id}
    if body.background:  # so that the next request, on any worker, finds it
        await visible_everywhere(app, turn)
    if body.stream:
        return await _stream(
            request, _live_events(request, turn, meta, -1), headers=headers,
            # A foreground response dies with its client, as OpenAI's (unless
            # RESPONSES_ON_DISCONNECT=continue); background ones always run on.
            on_disconnect=None if body.background
            or app[SETTINGS].responses_on_disconnect == "continue" else turn.cancel,
        )
    if body.background:
        snapshot = _snapshot_of_live(turn, meta)
        return web.json_response(snapshot, headers=headers)
    await turn.result
    snapshot = _snapshot_of_live(turn, meta)
    if snapshot["status"] == "failed":
        error = snapshot.get("error") or {}
        raise ApiError(502, f"{response_id} failed: {error.get('message') or 'the model call failed'}",
                       type="upstream_error", code="provider_error", headers=headers)
    return web.json_response(snapshot, headers=headers)


def _checked_messages(
    body: ResponsesRequest, *, earlier_calls: list[dict[str, Any]] | None = None
) -> list[ChatMessage]:
    try:
        messages = input_messages(body, earlier_calls=earlier_calls)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ApiError(400, f"input: {problem['msg']}", code="invalid_body",
                       param="input") from exc
    if not messages:
        raise ApiError(400, "input must hold at least one item", code="invalid_body",
                       param="input")
    return messages


def _model_params(body: ResponsesRequest) -> dict[str, Any]:
    """The turn's ``model_params``, forwarded to the model as given: sampling, identifiers,
    the client's function tools in chat-completions form, ``tool_choice``."""
    params: dict[str, Any] = {}
    for name in ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier",
                 "prompt_cache_key"):
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    if body.tools:
        params["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, dict):
        params["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None and body.tools:
        params["tool_choice"] = choice
    return params


async def _continued(request: web.Request, previous_id: str) -> tuple[str, list[dict[str, Any]]]:
    """The conversation a ``previous_response_id`` continues, and that response's function
    calls (which a ``function_call_output`` of the new input may answer)."""
    conversation_id = await _conversation_of(request, previous_id)
    meta = await _meta(request, previous_id)
    snapshot = await _snapshot(request, meta)
    calls = [item for item in snapshot["output"] if item.get("type") == "function_call"]
    return conversation_id, calls


async def _conversation_of(request: web.Request, previous_id: str) -> str:
    """The conversation a ``previous_response_id`` continues (it must be finished and the
    latest of its conversation: a conversation is one line of turns, not a tree)."""
    param = "previous_response_id"
    app = request.app
    meta = await _meta_or_none(request, previous_id)
    if meta is None or not meta.stored:
        raise ApiError(404, f"no stored response {previous_id!r}", code="previous_response_not_found",
                       param=param)
    head = await logged_head(app, meta.request_id)  # running on another worker?
    if meta.request_id in app[ORCHESTRATOR].live or (head is not None and not head.done):
        raise ApiError(400, f"{previous_id} is still in progress; continue once it has ended",
                       code="previous_response_in_progress", param=param)
    store = app[STORE]
    await store.flush()
    row = await store.request_row(meta.request_id)
    if row is None:
        raise ApiError(404, f"no stored response {previous_id!r}",
                       code="previous_response_not_found", param=param)
    conversation_id = str(row["conversation_id"])
    latest = await store.aquery(
        "SELECT request_id FROM requests WHERE conversation_id = ? "
        "ORDER BY started_at DESC LIMIT 1", [conversation_id])
    if latest and latest[0][0] != meta.request_id:
        raise ApiError(400, f"{previous_id} is not the latest response of its conversation "
                       f"({response_id_of(latest[0][0])} is); branching is not supported",
                       code="previous_response_not_latest", param=param)
    return conversation_id


async def _meta_or_none(request: web.Request, response_id: str) -> ResponseMeta | None:
    try:
        return await _meta(request, response_id)
    except ApiError:
        return None


def _cursor(request: web.Request) -> int:
    raw = request.query.get("starting_after")
    if raw is None or raw == "":
        return -1
    if not (raw.isascii() and raw.lstrip("-").isdigit()) or len(raw) > 18 or int(raw) < -1:
        raise ApiError(400, f"starting_after must be an integer ≥ -1, got {raw[:40]!r}",
                       code="invalid_cursor", param="starting_after")
    return int(raw)


async def get_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}``: the response object; with ``stream=true`` its events
    after ``starting_after`` (live, here or followed from the Redis log when another
    worker runs it, or from the store, after a restart too)."""
    response_id = path_id(request, "response_id")
    stream = parse_flag(request, "stream")
    after = _cursor(request)
    meta = await _meta(request, response_id)
    headers = {"X-Request-Id": meta.request_id, "X-Response-Id": response_id}
    if not stream:
        return web.json_response(await _snapshot(request, meta), headers=headers)
    admit_stream(request)
    turn = request.app[ORCHESTRATOR].live.get(meta.request_id)
    if turn is not None:
        return await _stream(request, _live_events(request, turn, meta, after), headers=headers)
    if await logged_head(request.app, meta.request_id) is not None:
        return await _stream(request, _logged_response_events(request, meta, after),
                             headers=headers)
    events = await _stored_events(request.app[STORE], meta.request_id)
    _, produced = fold_response(meta.base, events, function_tools=meta.function_tools)
    if not any(event["type"] in TERMINAL_TYPES for event in produced):
        raise ApiError(409, f"{response_id} has no complete record to replay",
                       code="response_incomplete_record")
    rest = [event for event in produced if event["sequence_number"] > after]
    return await _stream(request, _replayed(rest), headers=headers)


async def cancel_response(request: web.Request) -> web.Response:
    """``POST /v1/responses/{id}/cancel``: stop a background response (status
    ``cancelled``, the partial output kept). A finished one is answered as it is. The
    turn of another worker is cancelled by its owner (a 503 when it cannot be reached)."""
    response_id = path_id(request, "response_id")
    meta = await _meta(request, response_id)
    if not meta.base.get("background"):
        raise ApiError(400, "only background responses can be cancelled",
                       code="not_background", param="response_id")
    turn = request.app[ORCHESTRATOR].live.get(meta.request_id)
    if turn is not None:
        turn.cancel()
        await turn.result
    elif await cancel_on_owner(request.app, meta.request_id) is not None:  # on its owner
        await _until_logged_done(request, meta.request_id)
    return web.json_response(await _snapshot(request, meta),
                             headers={"X-Request-Id": meta.request_id})


async def delete_response(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{id}``: forget the response (its turn's events stay in the
    store for analysts). A running response is cancelled first (by its owner when
    another worker runs it)."""
    response_id = path_id(request, "response_id")
    meta = await _meta(request, response_id)
    turn = request.app[ORCHESTRATOR].live.get(meta.request_id)
    if turn is not None:
        turn.cancel()
        await turn.result
    else:
        await cancel_on_owner(request.app, meta.request_id)
    request.app[LIVE].pop(response_id, None)
    await _delete_meta(request.app[STORE], response_id)
    return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def _create_table(app: web.Application) -> None:
    """The ``responses`` table, once per start (after the store opened: ``on_startup``
    hooks run after the ``cleanup_ctx`` ones; in the worker role the recorder makes it)."""
    await app[STORE].responses().create()


def add_responses_routes(app: web.Application) -> None:
    """Register the Responses wire on ``app``."""
    app[LIVE] = {}
    app.on_startup.append(_create_table)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)

"""The OpenAI-compatible wire: ``POST /v1/chat/completions``, ``GET /v1/models`` and
``GET /v1/models/{model}``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from aiohttp import web

from api.common import (
    CLIENTS,
    MODELS,
    ORCHESTRATOR,
    REGISTRY,
    ROUNDTABLE_MODEL,
    SETTINGS,
    _last_words,
    _turn_headers,
    admit,
    check_model,
)
from api.native import start_roundtable
from api.wire import REFUSED_PARAMS, ApiError, ChatCompletionRequest, read_body
from core.config import Settings
from core.errors import BufferOverflowError
from core.turn import TurnInput
from operators import ChatChunk, to_chat_chunks
from pipeline.roundtable import RoundtableRequest, panel_names, panel_of
from sinks.sse import DONE_FRAME, FrameWriter, json_frame, open_sse

log = logging.getLogger(__name__)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the same orchestrator, OpenAI's wire.

    The model ``roundtable`` runs the configured panel (``ROUNDTABLE_PANEL``): choice 0 is
    the moderator, choice *i* the *i*-th panelist, so each panelist's text is rebuilt from
    ``choice.index``.
    """
    body = await read_body(request, ChatCompletionRequest)
    app = request.app
    settings = app[SETTINGS]
    params = model_params(body, settings)
    admit(request)  # no await between the door and the turn's start: the limits are exact
    max_tokens = body.max_tokens or body.max_completion_tokens
    choices: dict[str, int] = {}
    if body.model == ROUNDTABLE_MODEL:
        if params:
            name = next(iter(params))
            raise ApiError(400, f"{name} is not supported by the {ROUNDTABLE_MODEL!r} model "
                           "(its panelists' calls are the server's)", code="unsupported_parameter",
                           param=name)
        spec = RoundtableRequest(
            messages=body.messages, rounds=settings.roundtable_rounds, max_tokens=max_tokens,
            panelists=panel_of(settings.roundtable_panel),
            conversation_id=body.conversation_id,
        )
        turn, _ = start_roundtable(app, spec, kind="chat.completions", paced=False)
        choices = {name: index for index, name in enumerate(panel_names(spec), start=1)}
        model = ROUNDTABLE_MODEL
    else:
        model = check_model(request, body.model)
        turn = app[ORCHESTRATOR].run(TurnInput(
            messages=body.messages, conversation_id=body.conversation_id, model=model,
            max_tokens=max_tokens, kind="chat.completions", model_params=params,
            server_tools=settings.openai_wire_server_tools,
        ))
    completion_id = f"chatcmpl-{turn.request_id.removeprefix('req_')}"
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    to_chunks = to_chat_chunks(
        completion_id=completion_id, model=model, created=created,
        include_usage=include_usage or not body.stream, choices=choices,
    )
    cancel_on_disconnect = (body.on_disconnect or settings.openai_wire_on_disconnect) == "cancel"
    if not body.stream:
        # The whole answer is the fold of the chunks a streaming client would get, so
        # streamed and not streamed always agree.
        try:
            result = await asyncio.shield(turn.result)
        except asyncio.CancelledError:  # the client left before the answer was ready
            if cancel_on_disconnect:
                turn.cancel()
            raise
        if result.status == "error":
            raise _refused_upstream(result.error) or ApiError(
                502, result.error or "the model call failed", type="upstream_error",
                code="provider_error")
        chunks: list[ChatChunk] = []
        turn.stream.pipe(to_chunks).subscribe(chunks.append)
        return web.json_response(completion_of(chunks), headers=_turn_headers(turn))
    response = await open_sse(request, headers=_turn_headers(turn))
    settings = request.app[SETTINGS]
    writer = FrameWriter(request, response, timeout_s=settings.client_write_timeout_s)
    app[CLIENTS].open += 1
    try:
        async with contextlib.aclosing(
            turn.batches(to_chunks, max_buffer=settings.client_buffer_events)
        ) as stream:
            async for chunks in stream:  # what is ready goes in one write
                await writer.write(b"".join([json_frame(chunk) for chunk in chunks]))
        await writer.write(DONE_FRAME)
    except (BufferOverflowError, TimeoutError) as exc:
        app[CLIENTS].cut_off += 1
        error = ApiError(500, str(exc) or "client too slow", type="server_error",
                         code="client_too_slow")
        await _last_words(response, json_frame(error.body()))
    except ConnectionResetError:  # the client left (a write found it gone)
        if cancel_on_disconnect:
            turn.cancel()
    except asyncio.CancelledError:  # handler_cancellation: the client dropped the connection
        if cancel_on_disconnect:
            turn.cancel()  # the partial answer is kept; the turn ends ``cancelled``
        raise
    except Exception:
        log.exception("chat completion stream %s failed", turn.request_id)
        error = ApiError(500, "internal server error", type="server_error", code="internal")
        await _last_words(response, json_frame(error.body()))
    finally:
        app[CLIENTS].open -= 1
    return response


_UPSTREAM_REFUSAL = re.compile(r"failed: HTTP (400|404|422): (.*)$", re.S)


def _refused_upstream(error: str | None) -> ApiError | None:
    """The provider refused the request itself (e.g. a forwarded parameter it does not take):
    the client's 400 (or 404), with the provider's words, rather than a 502."""
    match = _UPSTREAM_REFUSAL.search(error or "")
    if match is None:
        return None
    status = 404 if match.group(1) == "404" else 400
    return ApiError(status, f"the model provider refused the request: {match.group(2)}",
                    code="upstream_refused")


def model_params(body: ChatCompletionRequest, settings: Settings) -> dict[str, Any]:
    """The request parameters to send to the model, or a 400 naming the one refused."""
    for name, why in REFUSED_PARAMS.items():
        if (body.model_extra or {}).get(name) is not None:
            raise ApiError(400, f"{name}: {why}", code="unsupported_parameter", param=name)
    if body.modalities and "audio" in body.modalities:
        raise ApiError(400, f"modalities: {REFUSED_PARAMS['audio']}", code="unsupported_parameter",
                       param="modalities")
    params = body.forwarded()
    unknown = body.unknown()
    if unknown and settings.openai_wire_extra_fields == "reject":
        name = next(iter(unknown))
        raise ApiError(400, f"Unrecognized request argument supplied: {name} "
                       "(OPENAI_WIRE_EXTRA_FIELDS=reject)", code="unknown_parameter", param=name)
    params.update({k: v for k, v in unknown.items() if v is not None})
    n = params.get("n", 1)
    if n > settings.openai_wire_max_n:
        raise ApiError(400, f"n must be at most {settings.openai_wire_max_n} (OPENAI_WIRE_MAX_N), "
                       f"got {n}", code="invalid_value", param="n")
    if "top_logprobs" in params and params.get("logprobs") is not True:
        raise ApiError(400, "top_logprobs needs logprobs: true", code="invalid_value",
                       param="top_logprobs")
    tools = {tool["function"]["name"] for tool in params.get("tools", ())}
    for name in ("tool_choice", "parallel_tool_calls"):
        if name in params and not tools and params[name] != "none":
            raise ApiError(400, f"{name} is only allowed when tools are specified",
                           code="invalid_value", param=name)
    choice = params.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           "{\"type\": \"function\", \"function\": {\"name\": …}}",
                           code="invalid_value", param="tool_choice")
        if named not in tools:
            raise ApiError(400, f"tool_choice names {named!r}, which is not in tools",
                           code="invalid_value", param="tool_choice")
    return params


def completion_of(chunks: list[ChatChunk]) -> dict[str, Any]:
    """Fold ``chat.completion.chunk`` objects into one ``chat.completion``: per choice its
    text, its refusal (null unless the model refused: OpenAI's schema asks for the field),
    its tool calls (by their index: id, name and the arguments joined), its log
    probabilities and its finish reason."""
    first = chunks[0]
    texts: dict[int, list[str]] = {}
    refusals: dict[int, list[str]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    logprobs: dict[int, list[Any]] = {}
    finish: dict[int, str | None] = {}
    usage: Any = None
    for chunk in chunks:
        if "error" in chunk:  # the turn failed part-way (e.g. a panelist, then a cancel)
            error = chunk["error"]
            raise ApiError(502, str(error.get("message", "the turn failed")),
                           type="upstream_error", code="provider_error")
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            index = choice["index"]
            delta = choice["delta"]
            texts.setdefault(index, []).append(delta.get("content") or "")
            if delta.get("refusal"):
                refusals.setdefault(index, []).append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                slot = calls.setdefault(index, {}).setdefault(call["index"], {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("logprobs"):
                logprobs.setdefault(index, []).extend(choice["logprobs"].get("content") or ())
            finish[index] = choice["finish_reason"] or finish.get(index)

    def message(index: int) -> dict[str, Any]:
        text = "".join(texts[index])
        refusal = "".join(refusals[index]) if index in refusals else None
        out: dict[str, Any] = {"role": "assistant", "content": text, "refusal": refusal}
        if refusal is not None and not text:
            out["content"] = None  # the model refused instead of answering
        if index in calls:
            out["tool_calls"] = [call for _, call in sorted(calls[index].items())]
            out["content"] = text or None
        return out

    return {
        "id": first["id"], "object": "chat.completion", "created": first["created"],
        "model": first["model"],
        "choices": [
            {"index": index, "message": message(index),
             "finish_reason": finish[index] or "stop",
             "logprobs": {"content": logprobs[index], "refusal": None}
             if index in logprobs else None}
            for index in sorted(texts)
        ],
        "usage": usage,
    }


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one model (OpenAI's model object), or a 404."""
    model = request.match_info["model"]
    if model not in request.app[MODELS]:
        raise ApiError(404, f"The model {model!r} does not exist; GET /v1/models lists them.",
                       code="model_not_found", param="model")
    return web.json_response(_model_object(request, model))


def _model_object(request: web.Request, model: str) -> dict[str, Any]:
    """OpenAI's model object; ``owned_by`` is the model's provider (or ``roundtable``)."""
    if model == ROUNDTABLE_MODEL:
        owner = "roundtable"
    else:
        owner = request.app[REGISTRY].split(model)[0].name
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models a turn may name (OpenAI's list shape): every model as
    ``provider/model``, the default provider's also bare, and ``roundtable``."""
    return web.json_response({
        "object": "list", "data": [_model_object(request, m) for m in request.app[MODELS]],
    })

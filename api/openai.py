"""The OpenAI-compatible wire: ``POST /v1/chat/completions`` and ``GET /v1/models``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from api.common import (
    CLIENTS,
    MODELS,
    ORCHESTRATOR,
    ROUNDTABLE_MODEL,
    SETTINGS,
    _last_words,
    _turn_headers,
    admit,
    check_model,
)
from api.native import start_roundtable
from api.wire import ApiError, ChatCompletionRequest, read_body
from core.errors import BufferOverflowError
from core.turn import TurnInput
from operators import ChatChunk, to_chat_chunks
from pipeline.roundtable import Panelist, RoundtableRequest, panel_names
from sinks.sse import DONE_FRAME, data_frame, open_sse

log = logging.getLogger(__name__)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the same orchestrator, OpenAI's wire.

    The model ``roundtable`` runs the configured panel (``ROUNDTABLE_PANEL``): choice 0 is
    the moderator, choice *i* the *i*-th panelist, so each panelist's text is rebuilt from
    ``choice.index``.
    """
    body = await read_body(request, ChatCompletionRequest)
    admit(request)  # no await between the door and the turn's start: the limits are exact
    app = request.app
    settings = app[SETTINGS]
    max_tokens = body.max_tokens or body.max_completion_tokens
    choices: dict[str, int] = {}
    if body.model == ROUNDTABLE_MODEL:
        spec = RoundtableRequest(
            messages=body.messages, rounds=settings.roundtable_rounds, max_tokens=max_tokens,
            panelists=[Panelist(name=name) for name in settings.roundtable_panel],
            conversation_id=body.conversation_id,
        )
        turn, _ = start_roundtable(app, spec, kind="chat.completions", paced=False)
        choices = {name: index for index, name in enumerate(panel_names(spec), start=1)}
        model = ROUNDTABLE_MODEL
    else:
        model = check_model(request, body.model)
        turn = app[ORCHESTRATOR].run(TurnInput(
            messages=body.messages, conversation_id=body.conversation_id, model=model,
            max_tokens=max_tokens, kind="chat.completions",
        ))
    completion_id = f"chatcmpl-{turn.request_id.removeprefix('req_')}"
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    to_chunks = to_chat_chunks(
        completion_id=completion_id, model=model, created=created,
        include_usage=include_usage or not body.stream, choices=choices,
    )
    if not body.stream:
        # The whole answer is the fold of the chunks a streaming client would get, so
        # streamed and not streamed always agree.
        result = await turn.result
        if result.status == "error":
            raise ApiError(502, result.error or "the model call failed", type="upstream_error",
                           code="provider_error")
        chunks: list[ChatChunk] = []
        turn.stream.pipe(to_chunks).subscribe(chunks.append)
        return web.json_response(completion_of(chunks), headers=_turn_headers(turn))
    response = await open_sse(request, headers=_turn_headers(turn))
    settings = request.app[SETTINGS]
    app[CLIENTS].open += 1
    try:
        async with contextlib.aclosing(
            turn.view(to_chunks, max_buffer=settings.client_buffer_events)
        ) as stream:
            async for chunk in stream:
                frame = data_frame(json.dumps(chunk, separators=(",", ":")))
                await asyncio.wait_for(response.write(frame), settings.client_write_timeout_s)
        await asyncio.wait_for(response.write(DONE_FRAME), settings.client_write_timeout_s)
    except (BufferOverflowError, TimeoutError) as exc:
        app[CLIENTS].cut_off += 1
        error = ApiError(500, str(exc) or "client too slow", type="server_error",
                         code="client_too_slow")
        await _last_words(response, data_frame(json.dumps(error.body())))
    except ConnectionResetError:
        pass  # the client left; the turn runs on and is recorded
    except Exception:
        log.exception("chat completion stream %s failed", turn.request_id)
        error = ApiError(500, "internal server error", type="server_error", code="internal")
        await _last_words(response, data_frame(json.dumps(error.body())))
    finally:
        app[CLIENTS].open -= 1
    return response


def completion_of(chunks: list[ChatChunk]) -> dict[str, Any]:
    """Fold ``chat.completion.chunk`` objects into one ``chat.completion``."""
    first = chunks[0]
    texts: dict[int, list[str]] = {}
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
            texts.setdefault(index, []).append(choice["delta"].get("content") or "")
            finish[index] = choice["finish_reason"] or finish.get(index)
    return {
        "id": first["id"], "object": "chat.completion", "created": first["created"],
        "model": first["model"],
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": "".join(parts)},
             "finish_reason": finish[index] or "stop", "logprobs": None}
            for index, parts in sorted(texts.items())
        ],
        "usage": usage,
    }



async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models a turn may name (OpenAI's list shape)."""
    owner = "offline" if request.app[SETTINGS].offline else "upstream"
    return web.json_response({
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": owner}
                 for m in request.app[MODELS]],
    })




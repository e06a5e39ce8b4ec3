"""A misbehaving OpenAI-compatible upstream on loopback, for the trust tests (issue 10)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.procs import free_port

MODELS = ["good", "no-finish", "html", "endless", "poison"]


class StandIn:
    """An OpenAI-compatible server whose models misbehave, by name:

    - ``good``: three pieces, ``finish_reason: "stop"``, usage, ``[DONE]``;
    - ``no-finish``: three pieces, then the body ends (no finish, no ``[DONE]``);
    - ``html``: ``200`` with a proxy's HTML page;
    - ``endless``: a piece every ``delay_s`` for ever, whatever ``max_tokens`` says;
    - ``poison``: like ``good``, but the second piece holds a lone surrogate (``"a\\ud800b"``,
      valid JSON: an escape), which no UTF-8 writer can encode.

    ``closed`` counts the streams whose client went away before they ended.
    """

    def __init__(self, *, delay_s: float = 0.005) -> None:
        self.delay_s = delay_s
        self.closed = 0
        self.requests: list[dict[str, Any]] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> StandIn:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in MODELS]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model = body["model"]
        if model == "html":
            return web.Response(text="<html><body>502 Bad Gateway (proxy)</body></html>",
                                content_type="text/html")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        ended = False
        try:
            count = 0
            while model == "endless" or count < 3:
                piece = "a\ud800b" if model == "poison" and count == 1 else f"w{count} "
                await response.write(chunk(model, content=piece))
                count += 1
                await asyncio.sleep(self.delay_s)
            if model in ("good", "poison"):
                await response.write(chunk(model, finish="stop"))
                await response.write(chunk(model, usage=(5, 3)))
                await response.write(b"data: [DONE]\n\n")
            ended = True
            await response.write_eof()  # no-finish: a clean end, without finish or [DONE]
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if not ended:
                self.closed += 1
        return response


def chunk(model: str, *, content: str | None = None, finish: str | None = None,
          usage: tuple[int, int] | None = None) -> bytes:
    payload: dict[str, Any] = {
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [] if usage else [{"index": 0, "delta": {"content": content} if content else {},
                                      "finish_reason": finish}],
    }
    if usage:
        payload["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                            "total_tokens": sum(usage)}
    return f"data: {json.dumps(payload)}\n\n".encode()  # ASCII: a surrogate is an escape

"""Server-Sent Events framing and the response that carries them.

Frames are built as bytes in one place. The native frame is ``id: <seq>`` /
``event: <type>`` / ``data: <one-line JSON>``; JSON never holds a raw CR or LF, the type
is one of our literals and the id an int, so event data can never break the framing.
Comments are stripped of line breaks for the same reason. Reconnection advice
(``retry:``) is a line of the first event's frame (:func:`event_frame`), never a block alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from core.events import EventBase

DONE_FRAME = b"data: [DONE]\n\n"

SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


def event_frame(event: EventBase, *, retry_ms: int | None = None) -> bytes:
    """The native frame of a numbered event; with ``retry_ms``, a ``retry:`` line in it.

    ``retry:`` rides inside a real event's block, never alone: httpx-sse dispatches a lone
    ``retry:`` block as an event with empty data (its ``sse.json()`` then fails).
    """
    kind = getattr(event, "type")  # noqa: B009 - every concrete event has a literal type
    retry = "" if retry_ms is None else f"retry: {int(retry_ms)}\n"
    return f"{retry}id: {event.seq}\nevent: {kind}\ndata: {event.model_dump_json()}\n\n".encode()


def data_frame(payload: str) -> bytes:
    """A ``data:``-only frame (the OpenAI-compatible stream uses nothing else)."""
    return f"data: {payload}\n\n".encode()


def comment_frame(text: str) -> bytes:
    """A comment line: ignored by clients, keeps proxies from closing idle streams."""
    clean = text.replace("\r", " ").replace("\n", " ")
    return f": {clean}\n\n".encode()


async def open_sse(request: web.Request, *, headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Start an SSE response with the right headers (plus ``headers``)."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    return response

"""Server-Sent Events framing and the response that carries them.

Frames are built as bytes in one place. The native frame is ``id: <seq>`` /
``event: <type>`` / ``data: <one-line JSON>``; JSON never holds a raw CR or LF, the type
is one of our literals and the id an int, so event data can never break the framing.
Comments are stripped of line breaks for the same reason. Reconnection advice
(``retry:``) is a line of the first event's frame (:func:`event_frame`), never a block alone.
U+2028, U+2029 and U+0085, which JSON may carry raw but line-based readers (``str.splitlines``,
some ``iter_lines``) split on, are escaped (``\\u2028``) in every frame's JSON
(:func:`escape_separators`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pydantic_core
from aiohttp import web

from core.events import EventBase

DONE_FRAME = b"data: [DONE]\n\n"

SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


_COMMENT_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\u2028": " ", "\u2029": " ",
                                 "\x85": " "})


def escape_separators(text: str) -> str:
    """JSON text with U+2028, U+2029 and U+0085 escaped: still the same JSON value, but no
    line-based reader can split a frame there (JSON already escapes CR and LF)."""
    if text.isascii():
        return text
    # Three scans of C speed beat one str.translate (about 20× on a typical frame).
    return (text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
            .replace("\x85", "\\u0085"))


def frame_json(value: Any) -> str:
    """:func:`json_bytes` as text (for APIs that send ``str``, e.g. a WebSocket's)."""
    return json_bytes(value).decode()


def json_bytes(value: Any) -> bytes:
    """A JSON value as compact UTF-8 for a frame, with U+2028, U+2029 and U+0085 escaped.

    pydantic's serializer writes it (about 2 µs for a chat chunk here, ``json.dumps`` 10); a
    value it refuses (a lone surrogate, which UTF-8 cannot hold) goes through ``json.dumps``
    as ASCII, escapes and all.
    """
    try:
        payload = pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return json.dumps(value, separators=(",", ":")).encode()
    if payload.isascii():
        return payload
    return (payload.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
            .replace(b"\xc2\x85", b"\\u0085"))


def json_frame(value: Any) -> bytes:
    """The ``data:``-only frame of a JSON value (see :func:`json_bytes`)."""
    return b"data: " + json_bytes(value) + b"\n\n"


def event_frame(event: EventBase, *, retry_ms: int | None = None) -> bytes:
    """The native frame of a numbered event; with ``retry_ms``, a ``retry:`` line in it.

    ``retry:`` rides inside a real event's block, never alone: httpx-sse dispatches a lone
    ``retry:`` block as an event with empty data (its ``sse.json()`` then fails).
    """
    kind = getattr(event, "type")  # noqa: B009 - every concrete event has a literal type
    retry = "" if retry_ms is None else f"retry: {int(retry_ms)}\n"
    data = escape_separators(event.model_dump_json())
    return f"{retry}id: {event.seq}\nevent: {kind}\ndata: {data}\n\n".encode()


def data_frame(payload: str) -> bytes:
    """A ``data:``-only frame (the OpenAI-compatible stream uses nothing else); ``payload``
    is JSON (its separators are escaped here) or ``[DONE]``."""
    return f"data: {escape_separators(payload)}\n\n".encode()


def comment_frame(text: str) -> bytes:
    """A comment line: ignored by clients, keeps proxies from closing idle streams."""
    clean = text.translate(_COMMENT_BREAKS)
    return f": {clean}\n\n".encode()


async def open_sse(request: web.Request, *, headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Start an SSE response with the right headers (plus ``headers``)."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    return response


class FrameWriter:
    """Writes frames to a prepared streaming response, each bounded by ``timeout_s``.

    A write only blocks when the client's socket buffer is full (the transport is above
    its high-water mark and aiohttp waits for it to drain). While there is room, the write
    cannot block, so it is awaited as it is: no task and no timer per frame, which
    ``asyncio.wait_for`` around every write costs (a task per call on Python 3.11, about
    a tenth of the server's work per token). When the frame would not fit, the write is
    bounded by ``timeout_s`` and a client that does not read gets :class:`TimeoutError`.
    A client gone raises :class:`ConnectionResetError`, as ``response.write`` does.
    """

    __slots__ = ("_request", "_response", "timeout_s")

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse, *,
                 timeout_s: float) -> None:
        self._request = request
        self._response = response
        self.timeout_s = timeout_s

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit under the transport's high-water mark."""
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return False  # the write will raise at once; the slow path reports it
        return transport.get_write_buffer_size() + size <= transport.get_write_buffer_limits()[1]

    async def write(self, data: bytes) -> None:
        """Write ``data``; raises :class:`TimeoutError` when it blocks past the bound."""
        if self.fits(len(data)):
            await self._response.write(data)
        else:
            await asyncio.wait_for(self._response.write(data), self.timeout_s)

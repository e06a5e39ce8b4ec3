"""``sinks.sse.FrameWriter``: the SSE write path without a task per frame (issue 12), still
bounded for a client that stops reading, still reporting a client that left."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

import pytest
from aiohttp import web

import sinks.sse as sse
from sinks.sse import FrameWriter, json_bytes, json_frame, open_sse

WAIT_S = 20.0


class Outcome:
    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.frames = 0
        self.ended = asyncio.Event()


def writing_app(outcome: Outcome, *, frames: int, size: int, timeout_s: float) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await open_sse(request)
        writer = FrameWriter(request, response, timeout_s=timeout_s)
        try:
            for i in range(frames):
                body = str(i).encode().ljust(size, b".")
                await writer.write(b"data: " + body + b"\n\n")
                outcome.frames += 1
        except (TimeoutError, ConnectionResetError) as exc:
            outcome.error = exc
        finally:
            outcome.ended.set()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    return app


async def test_a_reading_client_gets_every_frame_and_no_write_costs_a_timer(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounded: list[float] = []
    real_wait_for = asyncio.wait_for

    async def counting_wait_for(aw: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
        bounded.append(timeout or 0.0)
        return await real_wait_for(aw, timeout)

    monkeypatch.setattr(sse.asyncio, "wait_for", counting_wait_for)
    outcome = Outcome()
    client = await aiohttp_client(writing_app(outcome, frames=200, size=40, timeout_s=5.0))
    response = await client.get("/")
    body = await response.read()
    frames = [f for f in body.split(b"\n\n") if f]
    assert [int(f[6:].rstrip(b".")) for f in frames] == list(range(200))
    assert outcome.error is None
    assert bounded == []  # the socket always had room: no frame paid for a timeout


async def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout(
    aiohttp_server: Any,
) -> None:
    outcome = Outcome()
    server = await aiohttp_server(writing_app(outcome, frames=100_000, size=65_536,
                                              timeout_s=0.3))
    sock = socket.create_connection((server.host, server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read the answer
        await asyncio.wait_for(outcome.ended.wait(), WAIT_S)
    finally:
        sock.close()
    assert isinstance(outcome.error, TimeoutError)
    assert 0 < outcome.frames < 100_000  # it wrote while there was room, then gave up


async def test_a_client_gone_is_a_connection_reset() -> None:
    # handler_cancellation off (aiohttp's default; the test server forces it on), so the
    # write itself must notice the client left.
    outcome = Outcome()
    runner = web.AppRunner(writing_app(outcome, frames=100_000, size=1024, timeout_s=5.0),
                           handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)  # the server runs on this loop: never block it
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await loop.sock_recv(sock, 1024)  # the stream started
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # an abortive close: the server's next writes find the connection reset
        await asyncio.wait_for(outcome.ended.wait(), WAIT_S)
    finally:
        await runner.cleanup()
    assert isinstance(outcome.error, ConnectionResetError)
    assert outcome.frames < 100_000


# -- json_bytes: the frames' JSON --------------------------------------------------------------
@pytest.mark.parametrize("value", [
    {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "tok "}}]},
    {"text": "line\u2028sep\u2029para\x85next é ✓ \n\r\t\"\\", "n": [1, 2.5, None, True]},
    {"poison": "a\ud800b"},  # a lone surrogate: UTF-8 cannot hold it, json.dumps escapes it
])
def test_json_bytes_is_the_same_value_and_no_line_reader_can_split_it(value: Any) -> None:
    payload = json_bytes(value)
    assert json.loads(payload) == value
    text = payload.decode()
    for separator in ("\n", "\r", "\u2028", "\u2029", "\x85"):
        assert separator not in text
    assert text.splitlines() == [text]
    assert json_frame(value) == b"data: " + payload + b"\n\n"

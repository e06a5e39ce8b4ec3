"""The door's listener (``server._Listener``): its own accept loop, on either event loop.

Under uvloop, ``loop.create_server`` took a burst of new connections into a busy loop a
little at a time (bench/README.md, issue 12): the listener takes every connection waiting
at each readiness, pauses when the process is out of file descriptors, and closes a
connection it could not hand over. The timings are the bench's; these tests prove the
behaviour, in process and against a real server process on each loop.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

import server
from tests.ops_server import launch, wait_healthy


class _Counted(asyncio.Protocol):
    """Counts the connections made (``made`` is set at ``expected``) and answers ``ok`` to
    the first bytes of each."""

    transports: ClassVar[list[asyncio.Transport]] = []
    expected: ClassVar[int] = 1
    made: ClassVar[asyncio.Event]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _Counted.transports.append(transport)
        if len(_Counted.transports) >= _Counted.expected:
            _Counted.made.set()

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"ok")


@pytest.fixture
def counted() -> list[asyncio.Transport]:
    _Counted.transports, _Counted.expected, _Counted.made = [], 1, asyncio.Event()
    return _Counted.transports


async def test_every_connection_waiting_is_taken_at_one_readiness(
        counted: list[asyncio.Transport]) -> None:
    loop = asyncio.get_running_loop()
    listener = server._Listener(loop, _Counted, "127.0.0.1", 0, backlog=128, reuse_port=False)
    (sock,) = listener.sockets
    loop.remove_reader(sock.fileno())  # nothing accepted until we say so
    clients = [socket.create_connection(sock.getsockname()[:2]) for _ in range(60)]
    try:
        listener._accept(sock)  # one readiness: all 60 are taken, not one
        assert len(listener._handshakes) == 60
        _Counted.expected = 60
        await asyncio.wait_for(_Counted.made.wait(), 5)
        assert len(counted) == 60
        assert not listener._handshakes
    finally:
        listener.close()
        for client in clients:
            client.close()
    assert not listener.is_serving() and sock.fileno() == -1


async def test_out_of_file_descriptors_pauses_accepting_then_resumes(
        counted: list[asyncio.Transport], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(server, "ACCEPT_RETRY_S", 0.2)
    loop = asyncio.get_running_loop()
    listener = server._Listener(loop, _Counted, "127.0.0.1", 0, backlog=128, reuse_port=False)
    (sock,) = listener.sockets

    class Exhausted:  # the listening socket, once as the kernel answers with no fd left
        refused = 0

        def fileno(self) -> int:
            return sock.fileno()

        def accept(self) -> Any:
            if not self.refused:
                self.refused += 1
                raise OSError(errno.EMFILE, "Too many open files")
            return sock.accept()

    try:
        listener._accept(Exhausted())  # type: ignore[arg-type]
        assert "accepting again in 0.2s" in caplog.text
        assert not loop.remove_reader(sock.fileno())  # paused: no reader left to remove
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        writer.write(b"x")
        assert await asyncio.wait_for(reader.read(2), 5) == b"ok"  # accepted after the pause
        writer.close()
        assert len(counted) == 1
    finally:
        listener.close()


async def test_a_connection_that_cannot_be_handed_over_is_closed_not_leaked(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> asyncio.Protocol:
        raise RuntimeError("no protocol today")

    loop = asyncio.get_running_loop()
    listener = server._Listener(loop, broken, "127.0.0.1", 0,
                                backlog=16, reuse_port=False)
    (sock,) = listener.sockets
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        assert "a connection could not be served: no protocol today" in caplog.text
        assert not listener._handshakes
    finally:
        listener.close()


def test_a_port_in_use_is_refused_with_nothing_left_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as refused:
            server._listening_sockets("127.0.0.1", port, backlog=8, reuse_port=False)
    assert refused.value.errno == errno.EADDRINUSE


def test_every_address_of_the_host_is_listened_on() -> None:
    everywhere = server._listening_sockets("", 0, backlog=8, reuse_port=False)
    try:
        families = {sock.family for sock in everywhere}
        assert socket.AF_INET in families
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for sock in everywhere)
        assert all(not sock.getblocking() for sock in everywhere)
    finally:
        for sock in everywhere:
            sock.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_burst_of_new_connections_is_served_on_either_loop(tmp_path: Path, loop: str) -> None:
    """A real server process: 300 new connections at once, each a request of its own,
    every one answered (none reset, none left waiting), and no descriptor left open."""
    running = wait_healthy(launch(tmp_path, EVENT_LOOP=loop))
    host, port = running.base.removeprefix("http://").split(":")

    async def burst() -> list[int]:
        async def one() -> int:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            status = await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            return int(status.split()[1])

        return await asyncio.gather(*(one() for _ in range(300)))

    fds = Path(f"/proc/{running.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    try:
        assert asyncio.run(burst()) == [200] * 300
        # every accepted socket is closed with its connection (none left behind the loop)
        deadline = time.monotonic() + 10
        while len(list(fds.iterdir())) > before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(fds.iterdir())) <= before + 5, (before, len(list(fds.iterdir())))
    finally:
        assert running.stop() == 0
    assert f"event loop: {loop}" in running.output()

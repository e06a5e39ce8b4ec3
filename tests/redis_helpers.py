"""Helpers for the distributed-log tests: the machine's Redis, private redis-servers, turns."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.events import (
    Done,
    Event,
    LlmCall,
    Memory,
    RequestReceived,
    Route,
    StreamEnd,
    StreamStart,
    Text,
)
from sinks.event_log import RedisEventLog
from tests.procs import free_port

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 15
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
WAIT_S = 15.0


def redis_reachable(port: int = REDIS_PORT) -> bool:
    """A PING answered within a second."""
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> None:
    if not redis_reachable():
        pytest.skip(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} (.ci/run starts it)")


def new_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def delete_prefix(url: str, prefix: str) -> None:
    """Remove every key of a test's prefix."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def event_log(url: str, prefix: str, *, cleanup: bool = True, **options: Any
                    ) -> AsyncIterator[RedisEventLog]:
    """A started log, closed at the end; the prefix's keys are deleted (with ``cleanup``)."""
    options = {"retry_base_s": 0.02, "retry_max_s": 0.2, "ping_s": 0.1, **options}
    log = RedisEventLog(url, prefix=prefix, **options)
    await log.start()
    try:
        yield log
    finally:
        await log.aclose(timeout_s=1.0)
        with contextlib.suppress(Exception):
            if cleanup:
                await delete_prefix(url, prefix)


def turn_events(request_id: str, *, texts: int = 20) -> list[Event]:
    """A whole numbered turn, trace events included: request_received … done."""
    body: list[Event] = [
        RequestReceived(agent="assistant", conversation_id="conv_t"),
        Route(route="respond"),
        Memory(messages_loaded=0),
        StreamStart(stream_id=1, agent="assistant"),
        LlmCall(stream_id=1, model="offline", messages=[{"role": "user", "content": "hi"}]),
        *(Text(stream_id=1, delta=f"w{i} ") for i in range(texts)),
        StreamEnd(stream_id=1),
        Done(ok=True, duration_ms=1.0, reason="completed"),
    ]
    return [event.model_copy(update={"request_id": request_id, "seq": seq})
            for seq, event in enumerate(body, start=1)]


class Turn:
    """Feeds a turn's events to a log's writer, keeping the history like a ReplayLog."""

    def __init__(self, log: RedisEventLog, events: list[Event]) -> None:
        self.events = events
        self.items: list[Event] = []
        self.writer = log.writer(events[0].request_id, history=lambda: self.items)

    def emit(self, count: int) -> None:
        """The next ``count`` events, synchronously (one loop tick)."""
        for event in self.events[len(self.items): len(self.items) + count]:
            self.items.append(event)
            self.writer.on_next(event)

    @property
    def left(self) -> int:
        return len(self.events) - len(self.items)


async def wait_for(check: Callable[[], Any], what: str, *, within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.01)


async def collect(log: RedisEventLog, request_id: str, *, since: int = 0,
                  idle_s: float | None = None) -> list[Event]:
    """Everything a follower delivers until ``done`` (heartbeats dropped)."""
    out: list[Event] = []
    async with contextlib.aclosing(log.follow(request_id, since=since, idle_s=idle_s)) as events:
        async for event in events:
            if event is not None:
                out.append(event)
    return out


def dumps(events: list[Event]) -> list[str]:
    return [event.model_dump_json() for event in events]


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, keeping nothing on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (.ci/run installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"redis-{self.port}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", REDIS_HOST, "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + WAIT_S
        while not redis_reachable(self.port):
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: everything in it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)
        self.proc = None

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

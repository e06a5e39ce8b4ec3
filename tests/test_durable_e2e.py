"""Durable streams against real ``python server.py`` processes (issue 4): restarts after a
``kill -9`` and a SIGTERM, and clients that disconnect leaving nothing behind.

aiohttp's test server forces ``handler_cancellation`` on, so only a real process shows what
production does when a client goes away. Comparisons are of whole frame lists; waits are
bounded polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.config import Settings
from pipeline.offline_model import compose_answer
from tests.procs import free_port
from tests.sse_client import (
    Frame,
    after,
    assert_wire_rules,
    event_frames,
    events_of,
    frame_keys,
    iter_frames,
    read_frames,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "offline"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
WAIT_S = 10.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    db: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def kill(self) -> None:
        """``kill -9``: nothing is flushed, nothing is closed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM and the exit code (killed and failed when it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server did not stop within {STOP_TIMEOUT_S}s:\n{self.output()}")


def spawn(folder: Path, name: str, env: dict[str, str | float]) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    variables = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    variables.update({k: str(v) for k, v in env.items()}, PYTHONUNBUFFERED="1")
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(folder / "events.duckdb")],
            cwd=ROOT, env=variables, stdout=out, stderr=subprocess.STDOUT,
        )
    return Server(proc=proc, base=f"http://127.0.0.1:{port}", db=folder / "events.duckdb",
                  log=log)


async def start_server(folder: Path, name: str, **env: str | float) -> Server:
    """Start ``server.py`` on ``folder/events.duckdb`` with these settings (by env name)."""
    running = spawn(folder, name, env)
    proc = running.proc
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server {name} exited with {proc.returncode}:\n{running.output()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(running.url("/healthz"),
                                       timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return running
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"server {name} not healthy in {START_TIMEOUT_S}s:\n{running.output()}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_server(folder: Path, name: str, **env: str | float) -> AsyncIterator[Server]:
    """A server stopped with SIGTERM at the end, which must exit 0 (unless already dead)."""
    srv = await start_server(folder, name, **env)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            code = await asyncio.to_thread(srv.stop)
            assert code == 0, f"server {name} exit code {code}:\n{srv.output()}"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def text_of(frames: list[Frame]) -> str:
    return "".join(e["delta"] for e in events_of(frames) if e["type"] == "text")


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def background(session: aiohttp.ClientSession, srv: Server, body: dict[str, Any]) -> str:
    async with session.post(srv.url("/v1/orchestrate"), json={**body, "background": True}) as r:
        assert r.status == 202, await r.text()
        return str((await r.json())["request_id"])


async def replay(
    session: aiohttp.ClientSession, srv: Server, request_id: str, *,
    params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
) -> list[Frame]:
    async with session.get(srv.url(f"/v1/requests/{request_id}/events"), params=params,
                           headers=headers) as resp:
        if resp.status == 204:  # cursor at or past the end of a finished request
            return []
        assert resp.status == 200, await resp.text()
        return await read_frames(resp)


async def read_until(
    resp: aiohttp.ClientResponse, stop: Callable[[list[Frame]], bool]
) -> list[Frame]:
    """Event frames of ``resp`` until ``stop(frames so far)``; the response stays open."""
    frames: list[Frame] = []
    async with contextlib.aclosing(iter_frames(resp)) as stream:
        async for frame in stream:
            if frame.data is not None:
                frames.append(frame)
                if stop(frames):
                    return frames
    pytest.fail(f"stream ended early: {[f.event for f in frames][-5:]}")


async def poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"not within {WAIT_S}s: {what}"
        await asyncio.sleep(0.02)


def texts(frames: list[Frame]) -> int:
    return sum(frame.event == "text" for frame in frames)


# -- restarts ------------------------------------------------------------------------------------
async def test_kill_9_mid_turn_then_restart_closes_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "kill9"
    messages = [user("Crash during this answer.")]
    env = {"OFFLINE_TOKEN_DELAY_MS": 5, "FLUSH_INTERVAL_MS": 50}
    a = await start_server(folder, "a", **env)
    try:
        async with aiohttp.ClientSession() as session:
            request_id = await background(session, a, {"messages": messages, "max_tokens": 200})
            follower = await session.get(a.url(f"/v1/requests/{request_id}/events"))
            seen = await read_until(follower, lambda fs: texts(fs) >= 20)
            follower.close()
            cursor = int(seen[-1].id or 0)

            async def stored_up_to_cursor() -> bool:
                # Only this request writes: every event with seq <= cursor is on disk.
                body = await get_json(session, a.url("/healthz"))
                return int(body["store"]["events_written"]) >= cursor

            await poll(stored_up_to_cursor, "the store holds what the client saw")
            assert (await get_json(session, a.url("/healthz")))["live_turns"] == 1
    finally:
        a.kill()
    assert a.proc.returncode == -signal.SIGKILL

    async with running_server(folder, "b", **env) as b, aiohttp.ClientSession() as session:
        full = await replay(session, b, request_id, params={"since_seq": "0"})
        events = assert_wire_rules(full, trace=False)
        done = events[-1]
        assert done["ok"] is False and done["reason"] == "interrupted"
        assert [e["type"] for e in events[-3:]] == ["stream_end", "turn_error", "done"]
        assert events[-3]["status"] == "error" and events[-2]["retryable"] is True
        # What the client saw is the start of the recovered stream …
        assert frame_keys(full)[: len(seen)] == frame_keys(seen)
        # … and resuming from its last id gives exactly the rest.
        rest = await replay(session, b, request_id, headers={"Last-Event-ID": str(cursor)})
        assert frame_keys(rest) == frame_keys(after(full, cursor))
        assert frame_keys(seen + rest) == frame_keys(full)
        assert_wire_rules(seen + rest, trace=False)
        # The stored text is the start of the answer the turn would have given.
        partial = text_of(full)
        assert "".join(compose_answer(MODEL, messages, max_tokens=200)).startswith(partial)
        assert len(partial) >= len(text_of(seen))

        status = await get_json(session, b.url(f"/v1/requests/{request_id}"))
        assert status["status"] == "interrupted" and status["live"] is False
        assert status["last_seq"] == done["seq"]
        response = status["response"]
        assert (response["status"], response["content"]) == ("interrupted", partial)
        body = await get_json(session, b.url("/healthz"))
        assert body["live_turns"] == 0


async def test_finished_requests_replay_identically_after_a_clean_restart(tmp_path: Path) -> None:
    folder = tmp_path / "clean"
    originals: dict[str, tuple[bool, list[Frame]]] = {}
    async with running_server(folder, "a", OFFLINE_TOKEN_DELAY_MS=1) as a, \
            aiohttp.ClientSession() as session:
        for trace in (False, True):
            async with session.post(a.url("/v1/orchestrate"), json={
                "messages": [user(f"Remember this stream (trace {trace}).")], "trace": trace,
            }) as resp:
                assert resp.status == 200
                frames = await read_frames(resp)
            assert_wire_rules(frames, trace=trace)
            originals[resp.headers["X-Request-Id"]] = (trace, frames)
        # A background turn followed to its end, then SIGTERM right after.
        request_id = await background(session, a, {"messages": [user("And this one.")],
                                                   "max_tokens": 80})
        originals[request_id] = (False, await replay(session, a, request_id))
    assert a.proc.returncode == 0

    async with running_server(folder, "b", OFFLINE_TOKEN_DELAY_MS=1) as b, \
            aiohttp.ClientSession() as session:
        for request_id, (trace, frames) in originals.items():
            flag = {"trace": "true" if trace else "false"}
            again = await replay(session, b, request_id, params=flag)
            assert frame_keys(again) == frame_keys(frames), request_id
            middle = int(event_frames(frames)[len(event_frames(frames)) // 2].id or 0)
            rest = await replay(session, b, request_id, params=flag,
                                headers={"Last-Event-ID": str(middle)})
            assert frame_keys(rest) == frame_keys(after(frames, middle)), request_id
            status = await get_json(session, b.url(f"/v1/requests/{request_id}"))
            assert status["status"] == "completed" and status["live"] is False
            assert status["response"]["content"] == text_of(frames)


# -- disconnects leave nothing behind --------------------------------------------------------
async def test_disconnected_clients_leave_no_subscription_behind(tmp_path: Path) -> None:
    async with running_server(tmp_path / "leak", "a", OFFLINE_TOKEN_DELAY_MS=10) as srv, \
            aiohttp.ClientSession() as session:

        async def health() -> dict[str, Any]:
            body: dict[str, Any] = await get_json(session, srv.url("/healthz"))
            return body

        async def counts(open_: int, subscribers: int, live: int) -> bool:
            body = await health()
            return (body["clients"]["open"], body["turn_subscribers"], body["live_turns"]) == (
                open_, subscribers, live)

        messages = [user("Talk to the empty room.")]
        resp = await session.post(srv.url("/v1/orchestrate"),
                                  json={"messages": messages, "max_tokens": 200})
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
        await read_until(resp, lambda fs: texts(fs) >= 3)
        body = await health()
        assert (body["clients"]["open"], body["turn_subscribers"], body["live_turns"]) == (1, 2, 1)
        resp.close()  # on_disconnect "continue": the turn runs on with only its recorder
        await poll(lambda: counts(0, 1, 1), "client gone, recorder only, turn running")

        # Three followers join the running turn and leave it.
        followers = [await session.get(srv.url(f"/v1/requests/{request_id}/events"))
                     for _ in range(3)]
        for follower in followers:
            assert follower.status == 200
            await read_until(follower, lambda fs: texts(fs) >= 1)
        await poll(lambda: counts(3, 4, 1), "three followers subscribed")
        for follower in followers:
            follower.close()
        await poll(lambda: counts(0, 1, 1), "followers gone, recorder only")

        await poll(lambda: counts(0, 0, 0), "the turn finished on its own")
        body = await health()
        assert body["clients"] == {"open": 0, "cut_off": 0}
        frames = await replay(session, srv, request_id)
        events = assert_wire_rules(frames, trace=False)
        assert events[-1]["reason"] == "completed"
        assert text_of(frames) == "".join(compose_answer(MODEL, messages, max_tokens=200))
        status = await get_json(session, srv.url(f"/v1/requests/{request_id}"))
        assert status["status"] == "completed"
        assert status["response"]["status"] == "complete"

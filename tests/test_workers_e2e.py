"""Workers (issue 13) against real processes: ``python server.py --workers 2 --event-log
redis://127.0.0.1:6379/12 --port P`` on the machine's Redis.

The kernel spreads connections over the workers (``SO_REUSEPORT``), so a test that needs a
given worker opens new connections until ``X-Worker`` names it (or names another one).

The supervisor also runs the recorder, the only process that opens ``--db`` (a temporary
folder here); the workers' store is the recorder's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest

from core.config import Settings
from tests.procs import free_port
from tests.redis_helpers import REDIS_HOST, REDIS_PORT, delete_prefix, require_redis
from tests.sse_client import Frame, assert_wire_rules, event_frames, iter_frames

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/12"  # db 12: this work's own
LEASE_S = 1.0
START_TIMEOUT_S = 40.0
STOP_TIMEOUT_S = 30.0
WAIT_S = 20.0


def new_prefix(head: str = "wrk") -> str:
    return f"{head}-{uuid.uuid4().hex[:12]}"


@dataclasses.dataclass
class Workers:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    prefix: str
    redis_url: str = REDIS_URL

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def output(self) -> str:
        """The log's tail, for a failure's message."""
        return self.text()[-6000:]

    def text(self) -> str:
        """The whole log, for what a test looks for in it (access-log lines push a line
        out of the tail)."""
        return self.log.read_text(errors="replace")


def spawn(folder: Path, *, workers: int = 2, redis_url: str = REDIS_URL,
          prefix_head: str = "wrk", **env: str | float) -> Workers:
    """The supervisor of ``workers`` workers on ``redis_url`` (its own key prefix, starting
    with ``prefix_head``), its output in ``workers.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    prefix = new_prefix(prefix_head)
    variables = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    variables.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "REDIS_PREFIX": prefix,
                      "TURN_LEASE_S": str(LEASE_S), "OFFLINE_TOKEN_DELAY_MS": "5",
                      "SHUTDOWN_GRACE_S": "3"})
    variables.update({k: str(v) for k, v in env.items()})
    log = folder / "workers.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--workers", str(workers), "--event-log", redis_url,
             "--port", str(port), "--db", str(folder / "events.duckdb")],
            cwd=ROOT, env=variables, stdout=out, stderr=subprocess.STDOUT)
    return Workers(proc=proc, base=f"http://127.0.0.1:{port}", log=log, prefix=prefix,
                   redis_url=redis_url)


def fresh() -> aiohttp.ClientSession:
    """A session whose every request opens a new connection (the kernel picks a worker)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def health(srv: Workers) -> dict[str, Any]:
    async with fresh() as session, session.get(srv.url("/healthz"),
                                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
        assert resp.headers.get("X-Worker"), "an answer without X-Worker"
        body: dict[str, Any] = await resp.json()
        return body


async def until(check: Any, what: str, *, within: float = WAIT_S) -> Any:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            value = await check()
            if value:
                return value
        assert time.monotonic() < deadline, f"not within {within:.1f}s: {what}"
        await asyncio.sleep(0.05)


async def ids_of(srv: Workers) -> dict[str, int]:
    return {w["id"]: w["pid"] for w in (await health(srv))["workers"]}


@contextlib.asynccontextmanager
async def running(folder: Path, *, workers: int = 2, redis_url: str = REDIS_URL,
                  prefix_head: str = "wrk", **env: str | float) -> AsyncIterator[Workers]:
    require_redis()
    srv = spawn(folder, workers=workers, redis_url=redis_url, prefix_head=prefix_head, **env)
    try:
        async def all_up() -> bool:
            if srv.proc.poll() is not None:
                pytest.fail(f"the supervisor exited {srv.proc.returncode}:\n{srv.output()}")
            return len(await ids_of(srv)) == workers

        await until(all_up, f"{workers} workers listed", within=START_TIMEOUT_S)
        yield srv
    finally:
        try:
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(srv.proc.wait, STOP_TIMEOUT_S)
                assert code == 0, f"supervisor exit code {code}:\n{srv.output()}"
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
            await delete_prefix(srv.redis_url, srv.prefix)


async def pinned(srv: Workers, *, want: str | None = None, avoid: str | None = None,
                 tries: int = 200) -> aiohttp.ClientSession:
    """A session whose one kept-alive connection is on the worker ``want`` (or on any
    worker but ``avoid``): new connections are opened until a ``GET /healthz`` on one
    names it, so that the request that matters is sent once, to that worker."""
    for _ in range(tries):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with session.get(srv.url("/healthz")) as resp:
            await resp.read()
            worker = resp.headers.get("X-Worker")
        if (want is None or worker == want) and (avoid is None or worker != avoid):
            return session
        await session.close()
    pytest.fail(f"no connection reached the worker wanted ({want=}, {avoid=}) in {tries} tries")


async def on_worker(srv: Workers, method: str, path: str, *, want: str | None = None,
                    avoid: str | None = None, **kwargs: Any
                    ) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """The answer of the worker ``want`` (or of any worker but ``avoid``) to one request,
    sent once; the caller closes the session."""
    session = await pinned(srv, want=want, avoid=avoid)
    resp = await session.request(method, srv.url(path), **kwargs)
    got = resp.headers.get("X-Worker")
    assert (want is None or got == want) and (avoid is None or got != avoid), got
    return session, resp


async def start_turn(srv: Workers, *, max_tokens: int = 400) -> tuple[str, str]:
    """A background turn: its request id and its owner (the X-Worker of its 202)."""
    async with fresh() as session, session.post(srv.url("/v1/orchestrate"), json={
            "messages": [{"role": "user", "content": "Talk for a while, please."}],
            "max_tokens": max_tokens, "background": True}) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["request_id"]), resp.headers["X-Worker"]


def seqs_of(frames: list[Frame]) -> list[int]:
    return [int(frame.id or 0) for frame in event_frames(frames)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- 1. the supervisor and identity -------------------------------------------------------------
async def test_every_answer_names_its_worker_and_a_killed_worker_comes_back_with_a_new_id(
        tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        listed = await ids_of(srv)
        assert len(listed) == 2 and all(isinstance(i, str) for i in listed)
        seen: set[str] = set()
        for _ in range(200):  # a 404 (JSON error) carries X-Worker too
            async with fresh() as session, session.get(srv.url("/v1/requests/req_nope")) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "request_not_found"
                seen.add(r.headers["X-Worker"])
            if seen == set(listed):
                break
        assert seen == set(listed)
        # An answer made before any handler runs (a request line over aiohttp's limit).
        port = int(srv.base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = sock.recv(65536).decode(errors="replace")
        assert head.split(" ")[1] == "400", head[:200]
        assert "X-Worker: " in head, head[:400]
        body = await health(srv)
        assert body["worker"] in listed and body["pid"] == listed[body["worker"]]

        victim, victim_pid = sorted(listed.items())[0]
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        async def dead_left() -> dict[str, int] | None:
            now = await ids_of(srv)
            return now if victim not in now else None

        await until(dead_left, "the dead worker left /healthz", within=3 * LEASE_S + 1)
        print(f"the dead worker left the list after {time.monotonic() - killed_at:.2f}s")

        async def replaced() -> dict[str, int] | None:
            now = await ids_of(srv)
            return now if len(now) == 2 and victim not in now else None

        after = await until(replaced, "a new worker replaced the dead one")
        new = set(after) - set(listed)
        assert len(new) == 1 and victim not in after
        assert after[new.pop()] != victim_pid
        assert "worker-" in srv.text() and "restarting" in srv.text(), srv.output()


async def test_sigterm_to_the_parent_stops_every_child_and_exits_0(tmp_path: Path) -> None:
    require_redis()
    srv = spawn(tmp_path)
    try:
        pids = await until(lambda: _two(srv), "2 workers", within=START_TIMEOUT_S)
        turn, _ = await start_turn(srv, max_tokens=30)  # a turn that ends within the grace
        srv.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(srv.proc.wait, STOP_TIMEOUT_S)
        assert code == 0, srv.output()
        assert not [pid for pid in pids.values() if pid_alive(pid)], "children left behind"
        assert "every child has exited" in srv.text(), srv.output()
        assert turn
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        await delete_prefix(REDIS_URL, srv.prefix)


async def _two(srv: Workers) -> dict[str, int] | None:
    ids = await ids_of(srv)
    return ids if len(ids) == 2 else None


def test_more_than_one_worker_without_redis_is_refused_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "server.py", "--workers", "2", "--port",
                           str(free_port()), "--db", str(tmp_path / "e.duckdb")],
                          cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines() + done.stdout.decode().strip().splitlines()
    assert len(lines) == 1 and "EVENT_LOG=redis://" in lines[0], lines


# -- 3. leases: a killed owner's turn ends interrupted for a follower on another worker ------------
async def test_kill_9_of_an_owner_mid_turn_ends_the_turn_interrupted_on_the_other_worker(
        tmp_path: Path) -> None:
    async with running(tmp_path, OFFLINE_TOKEN_DELAY_MS=30) as srv:
        pids = await ids_of(srv)
        request_id, owner = await start_turn(srv, max_tokens=2000)
        # Every worker names the owner at once (the 202 waited for it).
        for want in pids:
            session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}", want=want)
            async with session:
                body = await resp.json()
                assert resp.status == 200, body
                assert body["worker"] == owner and body["status"] == "running"
        session, follower = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                            avoid=owner, params={"trace": "true"})
        async with session:
            assert follower.status == 200
            other = follower.headers["X-Worker"]
            frames: list[Frame] = []
            killed = False
            async with contextlib.aclosing(iter_frames(follower)) as stream:
                async for frame in stream:
                    if frame.data is None:
                        continue
                    frames.append(frame)
                    if not killed and sum(f.event == "text" for f in frames) >= 5:
                        killed = True
                        os.kill(pids[owner], signal.SIGKILL)
                        killed_at = time.monotonic()
            print(f"closed {time.monotonic() - killed_at:.2f}s after the kill")
        assert killed
        seqs = seqs_of(frames)
        assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
        last = frames[-1].json
        assert frames[-1].event == "done" and last["reason"] == "interrupted" and not last["ok"]
        assert [f.event for f in frames[-3:]] == ["stream_end", "turn_error", "done"]
        assert frames[-3].json["status"] == "error"
        assert_wire_rules(frames, trace=True)
        # The survivor says interrupted, and names the dead owner.
        session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}", want=other)
        async with session:
            body = await resp.json()
            assert body["status"] == "interrupted" and body["worker"] == owner, body
        # A replay through the survivor is the same stream.
        session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                        want=other, params={"trace": "true"})
        async with session:
            replayed = [f async for f in iter_frames(resp) if f.data is not None]
        assert [f.data for f in replayed] == [f.data for f in frames]

        async def owner_left() -> bool:
            return owner not in await ids_of(srv)

        await until(owner_left, "the dead owner left /healthz", within=3 * LEASE_S + 1)
    # Stopped: the recorder, the only process that opened the file, recorded the turn from
    # the log, its closing events included: exactly what the follower saw, each once.
    con = duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True)
    try:
        stored = con.execute("SELECT seq, type FROM events WHERE request_id = ? ORDER BY seq",
                             [request_id]).fetchall()
        [(status,)] = con.execute("SELECT status FROM requests WHERE request_id = ?",
                                  [request_id]).fetchall()
    finally:
        con.close()
    assert stored == [(f.json["seq"], f.event) for f in frames]
    assert status == "interrupted"
    assert not (tmp_path / "events.worker1.duckdb").exists()  # no worker opened a file


# -- 4. cancel through a worker that does not own the turn ----------------------------------------
async def test_cancel_through_a_worker_that_does_not_own_the_turn_reaches_its_owner(
        tmp_path: Path) -> None:
    async with running(tmp_path, OFFLINE_TOKEN_DELAY_MS=30) as srv:
        request_id, owner = await start_turn(srv, max_tokens=2000)
        session, follower = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                            avoid=owner)
        async with session:
            frames: list[Frame] = []
            cancelled: dict[str, Any] | None = None
            async with contextlib.aclosing(iter_frames(follower)) as stream:
                async for frame in stream:
                    if frame.data is None:
                        continue
                    frames.append(frame)
                    if cancelled is None and sum(f.event == "text" for f in frames) >= 3:
                        s2, resp = await on_worker(srv, "POST",
                                                   f"/v1/requests/{request_id}/cancel",
                                                   avoid=owner)
                        async with s2:
                            assert resp.status == 200, await resp.text()
                            cancelled = await resp.json()
        assert cancelled is not None
        assert cancelled["cancelled"] is True and cancelled["status"] == "cancelled", cancelled
        assert cancelled["worker"] == owner and cancelled["via"] == "owner"
        assert frames[-1].event == "done" and frames[-1].json["reason"] == "cancelled"
        seqs = seqs_of(frames)
        assert len(set(seqs)) == len(seqs) and seqs == sorted(seqs)
        # A second cancel, through any worker, says it already ended.
        s3, resp = await on_worker(srv, "POST", f"/v1/requests/{request_id}/cancel",
                                   avoid=owner)
        async with s3:
            again = await resp.json()
            assert resp.status == 200 and again["cancelled"] is False, again
            assert again["status"] == "cancelled"


async def test_with_three_workers_exactly_one_survivor_closes_a_dead_owners_turn(
        tmp_path: Path) -> None:
    async with running(tmp_path, workers=3, OFFLINE_TOKEN_DELAY_MS=30) as srv:
        pids = await ids_of(srv)
        request_id, owner = await start_turn(srv, max_tokens=2000)
        session, follower = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                            avoid=owner, params={"trace": "true"})
        async with session:
            frames: list[Frame] = []
            async with contextlib.aclosing(iter_frames(follower)) as stream:
                async for frame in stream:
                    if frame.data is None:
                        continue
                    frames.append(frame)
                    if len(frames) == 8:
                        os.kill(pids[owner], signal.SIGKILL)
        seqs = seqs_of(frames)
        assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
        assert frames[-1].json["reason"] == "interrupted"
        assert sum(f.event == "done" for f in frames) == 1
        # The two survivors (and the dead one's replacement) raced: one closed it.
        survivors = [worker for worker in await ids_of(srv) if worker != owner]
        reaped = 0
        for worker in survivors:
            session = await pinned(srv, want=worker)
            async with session, session.get(srv.url("/healthz")) as resp:
                reaped += (await resp.json())["cluster"]["reaped"]
        assert reaped == 1


async def test_a_websocket_cancel_on_another_worker_stops_the_turn_on_its_owner(
        tmp_path: Path) -> None:
    # Slow tokens: the chat (no max_tokens on this wire) must outlast the cancel.
    async with running(tmp_path, OFFLINE_TOKEN_DELAY_MS=500) as srv:
        ids = list(await ids_of(srv))
        owner_session = await pinned(srv, want=ids[0])
        other_session = await pinned(srv, want=ids[1])
        async with owner_session, other_session, \
                owner_session.ws_connect(srv.url("/v1/ws")) as chat, \
                other_session.ws_connect(srv.url("/v1/ws")) as remote:
            await chat.send_json({"type": "chat", "content": "Talk for a long while."})
            first = await chat.receive_json(timeout=10)
            assert first["type"] == "response_id", first
            update = await chat.receive_json(timeout=10)
            assert update["type"] == "update", update
            await remote.send_json({"type": "cancel", "response_id": first["response_id"]})
            while True:
                message = await chat.receive_json(timeout=20)
                if message["type"] == "complete":
                    break
            with contextlib.suppress(TimeoutError):  # success sends nothing; an error, a frame
                said = await remote.receive_json(timeout=0.5)
                pytest.fail(f"the cancel was refused: {said}")
            assert message["status"] == "cancelled", message
            # A cancel of a turn running nowhere is an error frame on that socket.
            await remote.send_json({"type": "cancel", "response_id": "req_nowhere"})
            error = await remote.receive_json(timeout=10)
            assert error["type"] == "error" and error["error"]["code"] == "response_not_found"

"""Issue 13, a Redis restart under the supervisor: ``python server.py --workers 2`` on a
private redis-server (:class:`tests.redis_helpers.PrivateRedis`, keeping nothing on disk)
that the test kills (SIGKILL) mid-turn and starts again, empty, on the same port.

What must hold (the issue: "the owners of live turns re-append what the log lost from their
own memory and followers resume; nothing is lost for a turn whose owner is alive"):

* a follower through the worker that does NOT own the turn (so it reads the turn from
  Redis) ends with seqs 1..N, no gap, no duplicate, and ``done`` ok — reconnecting with
  ``Last-Event-ID`` when its connection ends, which is allowed;
* the owner's lease, lost with Redis, is restored by the owner, not reaped as dead: no
  worker closed the turn as interrupted;
* the recorder, whose consumer group and discovery entry were lost with Redis, still
  records the turn: once the supervisor stopped (exit 0), the DuckDB file holds every event
  of the turn exactly once and the request is ``completed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest

from tests.redis_helpers import PrivateRedis
from tests.sse_client import Frame, assert_wire_rules, iter_frames
from tests.test_workers_e2e import (
    Workers,
    ids_of,
    on_worker,
    pinned,
    running,
    seqs_of,
    start_turn,
    until,
)
from tests.test_workers_e2e_more import recorder_health, recorder_of

MAX_TOKENS = 300
RECONNECTS_MAX = 40  # bounds the follower's loop (each attempt is bounded too)
READ_TIMEOUT_S = 20.0  # a silent connection this long counts as ended (then: reconnect)


async def health_of(srv: Workers, worker: str) -> dict[str, Any]:
    """``/healthz`` as answered by ``worker``."""
    session = await pinned(srv, want=worker)
    async with session, session.get(srv.url("/healthz"),
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert resp.headers.get("X-Worker") == worker
        body: dict[str, Any] = await resp.json()
        return body


# Down briefly, and down longer than the lease (TURN_LEASE_S=1 s here): either way the
# owner is alive, so its turn completes.
@pytest.mark.parametrize("outage_s", [0.3, 2.5])
async def test_a_redis_restart_mid_turn_under_the_supervisor_loses_nothing(
        tmp_path: Path, outage_s: float) -> None:
    redis_server = PrivateRedis(tmp_path / "redis")
    redis_server.start()
    try:
        async with running(tmp_path / "srv", redis_url=redis_server.url, prefix_head="rr13",
                           OFFLINE_TOKEN_DELAY_MS=20, EVENT_LOG_PING_S=0.2,
                           EVENT_LOG_RETRY_MAX_S=0.2, HEARTBEAT_S=0.5) as srv:
            try:
                frames, owner, request_id, notes = await _follow_through_a_restart(
                    srv, redis_server, outage_s)
                print(f"follower: {notes}")
                seqs = seqs_of(frames)
                assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
                done = frames[-1].json
                assert frames[-1].event == "done" and done["ok"] is True, done
                assert done["reason"] == "completed", done
                assert sum(f.event == "text" for f in frames) >= 50
                assert_wire_rules(frames, trace=True)
                # The owner saw the outage, and re-filled the log from its memory.
                said = (await health_of(srv, owner))["event_log"]
                assert said["repairs"] >= 1 and said["failed_batches"] >= 1, said
                # Nobody took the live owner's turn for a dead one's.
                reaped = 0
                for worker in await ids_of(srv):
                    reaped += (await health_of(srv, worker))["cluster"]["reaped"]
                assert reaped == 0
                # Its status through the non-owner (Redis's meta of it was lost, and
                # restored by the owner's lease renewal and release).
                session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}",
                                                avoid=owner)
                async with session:
                    body = await resp.json()
                assert resp.status == 200, body
                assert body["status"] == "completed" and body["worker"] == owner, body

                # The recorder records it (bounded), then the supervisor is stopped.
                async def recorded() -> bool:
                    found = recorder_of(srv)
                    if found is None:
                        return False
                    body = (await recorder_health(found[1]))["recorder"]
                    return bool(body["turns_recorded"] >= 1 and not body["live_turns"])

                await until(recorded, "the recorder recorded the turn after the restart")
            finally:
                if redis_server.proc is None:  # a failure while it was down: back for cleanup
                    redis_server.start()
        # Stopped (exit 0, checked by running): every event of the turn once, in order.
        db = tmp_path / "srv" / "events.duckdb"
        con = duckdb.connect(str(db), read_only=True)
        try:
            rows = con.execute("SELECT seq, type, data FROM events WHERE request_id = ? "
                               "ORDER BY seq", [request_id]).fetchall()
            requests = con.execute("SELECT status, last_seq FROM requests WHERE "
                                   "request_id = ?", [request_id]).fetchall()
        finally:
            con.close()
        last = int(frames[-1].id or 0)
        assert [seq for seq, _, _ in rows] == list(range(1, last + 1))
        assert [json.loads(data) for _, _, data in rows] == [f.json for f in frames]
        assert requests == [("completed", last)]
    finally:
        redis_server.kill()


async def _follow_through_a_restart(srv: Workers, redis_server: PrivateRedis, outage_s: float
                                    ) -> tuple[list[Frame], str, str, dict[str, Any]]:
    """Start a turn, follow it through the other worker, restart Redis after 10 texts (down
    for ``outage_s`` once the owner noticed); reconnect (``Last-Event-ID``, again through a
    non-owner) until ``done``. Returns the event frames, the owner, the request id and what
    happened on the way."""
    request_id, owner = await start_turn(srv, max_tokens=MAX_TOKENS)
    frames: list[Frame] = []
    restarted = False
    notes: dict[str, Any] = {"connections": 0, "ended_early": 0, "refused": []}
    path = f"/v1/requests/{request_id}/events"
    for _ in range(RECONNECTS_MAX):
        if frames and frames[-1].event == "done":
            break
        headers = {"Last-Event-ID": str(frames[-1].id)} if frames else {}
        try:
            session, resp = await on_worker(
                srv, "GET", path, avoid=owner, params={"trace": "true"}, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=READ_TIMEOUT_S))
        except (aiohttp.ClientError, TimeoutError) as exc:
            notes["refused"].append(repr(exc))
            await asyncio.sleep(0.2)
            continue
        async with session:
            notes["connections"] += 1
            if resp.status != 200:  # e.g. while Redis is away: said, then asked again
                notes["refused"].append((resp.status, (await resp.text())[:200]))
                await asyncio.sleep(0.2)
                continue
            try:
                async with contextlib.aclosing(iter_frames(resp)) as stream:
                    async for frame in stream:
                        if frame.data is None:
                            continue
                        frames.append(frame)
                        if not restarted and sum(f.event == "text" for f in frames) >= 10:
                            restarted = True
                            await _restart(srv, redis_server, owner, outage_s)
            except (aiohttp.ClientError, TimeoutError) as exc:
                notes["refused"].append(repr(exc))
            if not frames or frames[-1].event != "done":
                notes["ended_early"] += 1
    assert restarted, f"the turn ended before Redis was restarted: {notes}"
    assert frames and frames[-1].event == "done", (
        f"no done after {RECONNECTS_MAX} connections: {notes}; last {frames[-1:]}")
    return frames, owner, request_id, notes


async def _restart(srv: Workers, redis_server: PrivateRedis, owner: str,
                   outage_s: float) -> None:
    """SIGKILL the redis-server (everything in it is gone); once the owner noticed (its
    ``/healthz`` degraded, so some appends failed), start it again, empty, on its port."""
    redis_server.kill()

    async def degraded() -> bool:
        return bool((await health_of(srv, owner))["event_log"]["state"] == "degraded")

    await until(degraded, "the owner's /healthz degraded")
    await asyncio.sleep(outage_s)  # the turn goes on meanwhile, its events only in memory
    redis_server.start()

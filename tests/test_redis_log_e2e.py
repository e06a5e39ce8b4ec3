"""The distributed event log (issue 13) end to end: real ``python server.py`` processes with
``EVENT_LOG=redis://…``.

Two servers with their own DuckDB files share one Redis: a turn runs on A, and B — which
never ran it and whose store does not know it — serves its replay and live tail from the
Redis stream (the seam for several workers). A Redis restart mid-turn (a private
redis-server the test kills and starts again) loses nothing for B's follower.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp

from tests.redis_helpers import (
    REDIS_URL,
    PrivateRedis,
    delete_prefix,
    new_prefix,
    require_redis,
    wait_for,
)
from tests.sse_client import Frame, assert_wire_rules, event_frames, iter_frames, read_frames
from tests.test_durable_e2e import (
    Server,
    background,
    get_json,
    read_until,
    replay,
    running_server,
    texts,
    user,
)

SLOW = {"OFFLINE_TOKEN_DELAY_MS": 15, "FLUSH_INTERVAL_MS": 50, "EVENT_LOG_PING_S": 0.2,
        "EVENT_LOG_RETRY_MAX_S": 0.2}


def data_of(frames: list[Frame]) -> list[Any]:
    return [frame.json for frame in event_frames(frames)]


async def finished(session: aiohttp.ClientSession, srv: Server, request_id: str) -> bool:
    body = await get_json(session, srv.url(f"/v1/requests/{request_id}"))
    return bool(body.get("status") not in {None, "running"})


async def test_a_server_that_never_ran_the_turn_follows_and_replays_it_from_redis(
        tmp_path: Path) -> None:
    require_redis()
    prefix = new_prefix()
    env = {**SLOW, "EVENT_LOG": REDIS_URL, "REDIS_PREFIX": prefix}
    try:
        async with running_server(tmp_path / "a", "a", **env) as a, \
                running_server(tmp_path / "b", "b", **env) as b, aiohttp.ClientSession() as session:
            request_id = await background(session, a, {
                "messages": [user("Follow me from another process.")], "max_tokens": 60})
            # B follows the live turn from Redis; it leaves mid-turn and resumes there.
            first = await session.get(b.url(f"/v1/requests/{request_id}/events"),
                                      params={"trace": "true"})
            assert first.status == 200
            seen = await read_until(first, lambda fs: texts(fs) >= 15)
            first.close()
            cursor = seen[-1].id
            assert not await finished(session, a, request_id), "the turn ended too soon"
            async with session.get(b.url(f"/v1/requests/{request_id}/events"),
                                   params={"trace": "true"},
                                   headers={"Last-Event-ID": str(cursor)}) as rest:
                assert rest.status == 200
                tail = event_frames(await read_frames(rest))
            followed = seen + tail
            await wait_for(lambda: finished(session, a, request_id), "the turn finished on A")
            # A's own record (its store) is the reference: B delivered the same, once each.
            reference = event_frames(await replay(session, a, request_id, params={"trace": "true"}))
            assert data_of(followed) == data_of(reference)
            assert_wire_rules(followed, trace=True)
            assert followed[-1].event == "done"
            # B replays the finished turn from Redis too (its store has never seen it) ...
            again = await replay(session, b, request_id, params={"trace": "true"})
            assert data_of(again) == data_of(reference)
            public = await replay(session, b, request_id)
            assert data_of(public) == [e for e in data_of(reference)
                                       if e["type"] not in {"llm_call", "route", "memory"}]
            # ... 204 once fully seen, and a request Redis does not have is B's 404.
            async with session.get(b.url(f"/v1/requests/{request_id}/events"),
                                   params={"since_seq": str(len(reference))}) as resp:
                assert resp.status == 204
            async with session.get(b.url("/v1/requests/req_nowhere/events")) as resp:
                assert resp.status == 404
            health_a = await get_json(session, a.url("/healthz"))
            health_b = await get_json(session, b.url("/healthz"))
            assert health_a["event_log"]["state"] == health_b["event_log"]["state"] == "ok"
            assert health_a["event_log"]["appended"] == len(reference)
            assert health_a["event_log"]["prefix"] == prefix
            assert health_b["event_log"]["appended"] == 0
    finally:
        await delete_prefix(REDIS_URL, prefix)


async def test_a_redis_restart_mid_turn_loses_nothing_for_a_follower_on_another_server(
        tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path / "redis")
    with redis_server:
        env = {**SLOW, "EVENT_LOG": redis_server.url, "REDIS_PREFIX": new_prefix(),
               "HEARTBEAT_S": 0.2}
        async with running_server(tmp_path / "a", "a", **env) as a, \
                running_server(tmp_path / "b", "b", **env) as b, aiohttp.ClientSession() as session:
            request_id = await background(session, a, {
                "messages": [user("Survive a Redis restart.")], "max_tokens": 120})
            follower = await session.get(b.url(f"/v1/requests/{request_id}/events"),
                                         params={"trace": "true"})
            assert follower.status == 200

            async def degraded() -> bool:
                body = await get_json(session, a.url("/healthz"))
                return bool(body["status"] == "degraded"
                            and body["event_log"]["state"] == "degraded")

            # One pass over the stream (a second reader would drop frames parsed already).
            frames: list[Frame] = []
            restarted = False
            async with contextlib.aclosing(iter_frames(follower)) as stream:
                async for frame in stream:
                    if frame.data is None:
                        continue
                    frames.append(frame)
                    if not restarted and texts(frames) >= 10:
                        restarted = True
                        redis_server.kill()  # everything in Redis is gone
                        await wait_for(degraded, "A's /healthz degraded")
                        await asyncio.sleep(0.3)  # the turn goes on meanwhile
                        redis_server.start()  # empty, on the same port
            follower.close()
            assert restarted
            await wait_for(lambda: finished(session, a, request_id), "the turn finished on A")
            reference = event_frames(await replay(session, a, request_id, params={"trace": "true"}))
            assert data_of(frames) == data_of(reference)
            assert frames[-1].event == "done" and frames[-1].json["ok"] is True
            health = await get_json(session, a.url("/healthz"))
            assert health["status"] == "ok"
            assert health["event_log"]["repairs"] >= 1
            assert health["event_log"]["failed_batches"] >= 1


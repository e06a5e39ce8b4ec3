"""The distributed event log (issue 13) against the machine's real Redis (127.0.0.1:6379).

Each test uses its own ``REDIS_PREFIX`` and deletes its keys. Round trips are counted at
the socket (one ``send_packed_command`` is one round trip), restarts use a private
``redis-server`` the test starts and kills itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from pytest_aiohttp import AiohttpClient
from redis.asyncio.connection import Connection

from core.config import Settings
from core.events import Event
from server import create_app
from sinks.event_log import EventLogError, RedisEventLog
from tests.procs import free_port
from tests.redis_helpers import (
    REDIS_URL,
    PrivateRedis,
    Turn,
    collect,
    delete_prefix,
    dumps,
    event_log,
    new_prefix,
    require_redis,
    turn_events,
    wait_for,
)
from tests.sse_client import event_frames, read_frames


@pytest.fixture
def prefix() -> str:
    require_redis()
    return new_prefix()


@pytest.fixture
async def rlog(prefix: str) -> AsyncIterator[RedisEventLog]:
    async with event_log(REDIS_URL, prefix) as log:
        yield log


async def stream_entries(log: RedisEventLog, request_id: str) -> list[tuple[bytes, bytes]]:
    raw = await log.client.xrange(log.key(request_id), "-", "+")
    return [(entry_id, fields[b"e"]) for entry_id, fields in raw]


class CountingConnection(Connection):
    """Counts what goes to Redis: one packed send is one round trip."""

    sends: ClassVar[list[bytes]] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        packed = command if isinstance(command, bytes | str) else b"".join(
            part if isinstance(part, bytes) else bytes(part) for part in command)
        CountingConnection.sends.append(packed if isinstance(packed, bytes) else packed.encode())
        await super().send_packed_command(command, check_health)


# -- the writer ---------------------------------------------------------------------------------
async def test_a_burst_of_events_is_one_round_trip(prefix: str) -> None:
    CountingConnection.sends = []
    async with event_log(REDIS_URL, prefix, ping_s=3600,
                         connection_class=CountingConnection) as log:
        turn = Turn(log, turn_events("req_burst", texts=95))
        assert len(turn.events) == 102
        await wait_for(lambda: log._run_id is not None, "the monitor's first INFO")
        before = len(CountingConnection.sends)
        turn.emit(102)  # one loop tick
        await wait_for(lambda: log.stats.appended == 102, "all appended")
        sends = CountingConnection.sends[before:]
        appends = [packet for packet in sends if b"EVALSHA" in packet]
        assert len(appends) == 1, f"{len(sends)} sends, {len(appends)} appends"
        assert log.stats.batches == 1
        entries = await stream_entries(log, "req_burst")
    assert [entry_id for entry_id, _ in entries] == [f"{seq}-0".encode() for seq in range(1, 103)]
    assert [payload.decode() for _, payload in entries] == dumps(turn.events)


async def test_events_of_several_ticks_and_turns_batch_while_a_batch_is_in_flight(
        rlog: RedisEventLog) -> None:
    turns = [Turn(rlog, turn_events(f"req_many{i}", texts=30)) for i in range(4)]
    while any(turn.left for turn in turns):
        for turn in turns:
            turn.emit(1)
        await asyncio.sleep(0)  # a new tick for every event of every turn
    total = sum(len(turn.events) for turn in turns)
    await wait_for(lambda: rlog.stats.appended == total, "all appended")
    # Fewer round trips than ticks: what arrives while one is in flight goes in the next.
    assert rlog.stats.batches < total // 4
    for turn in turns:
        entries = await stream_entries(rlog, turn.events[0].request_id)
        assert [payload.decode() for _, payload in entries] == dumps(turn.events)


async def test_ttl_is_the_live_one_until_done_then_event_log_ttl(prefix: str) -> None:
    async with event_log(REDIS_URL, prefix, ttl_s=120, live_ttl_s=7200) as log:
        turn = Turn(log, turn_events("req_ttl"))
        turn.emit(10)
        await wait_for(lambda: log.stats.appended == 10, "first part appended")
        live_ttl = await log.client.ttl(log.key("req_ttl"))
        turn.emit(turn.left)
        await wait_for(lambda: log.stats.appended == len(turn.events), "all appended")
        done_ttl = await log.client.ttl(log.key("req_ttl"))
        assert log.health()["live_streams"] == 0
    assert 7000 < live_ttl <= 7200
    assert 0 < done_ttl <= 120


async def test_a_stale_writer_is_refused_and_logged_not_a_crash(
        rlog: RedisEventLog, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    events = turn_events("req_stale", texts=10)
    owner = Turn(rlog, events)
    owner.emit(12)
    await wait_for(lambda: rlog.stats.appended == 12, "owner appended 12")
    async with event_log(REDIS_URL, prefix, cleanup=False) as other:  # a second writer
        stale = Turn(other, events)
        with caplog.at_level(logging.ERROR, logger="sinks.event_log"):
            stale.emit(5)  # seq 1..5: behind the stream's end
            await wait_for(lambda: other.stats.refused == 1, "the stale batch refused")
        assert other.health()["live_streams"] == 0  # it stopped appending to that stream
    assert any("stale writer refused" in record.getMessage() for record in caplog.records)
    owner.emit(owner.left)
    await wait_for(lambda: rlog.stats.appended == len(events), "owner appended the rest")
    entries = await stream_entries(rlog, "req_stale")
    assert [payload.decode() for _, payload in entries] == dumps(events)
    assert rlog.stats.refused == 0


# -- the follower -------------------------------------------------------------------------------
async def test_resume_after_every_drop_point_of_a_finished_turn(rlog: RedisEventLog) -> None:
    turn = Turn(rlog, turn_events("req_drop", texts=12))
    turn.emit(turn.left)
    await wait_for(lambda: rlog.stats.appended == len(turn.events), "all appended")
    last = len(turn.events)
    for since in range(last):
        got = await collect(rlog, "req_drop", since=since)
        assert dumps(got) == dumps(turn.events[since:]), f"since={since}"
    head = await rlog.head("req_drop")
    assert (head.exists, head.last_seq, head.done) == (True, last, True)
    assert not (await rlog.head("req_unknown")).exists


async def test_resume_after_every_drop_point_of_a_live_turn(rlog: RedisEventLog) -> None:
    events = turn_events("req_livedrop", texts=12)
    for since in range(len(events)):
        request_id = f"req_livedrop{since}"
        turn = Turn(rlog, [e.model_copy(update={"request_id": request_id}) for e in events])
        turn.emit(8)  # the turn is live, eight events in
        await wait_for(lambda t=turn: rlog.stats.appended >= 8 and not t.writer._turn.pending,
                       "first part appended")
        follower = asyncio.create_task(collect(rlog, request_id, since=since))
        await wait_for(lambda: rlog.followers == 1, "follower started")
        while turn.left:
            turn.emit(1)
            await asyncio.sleep(0.001)
        got = await asyncio.wait_for(follower, 10)
        assert dumps(got) == dumps(turn.events[since:]), f"since={since}"


async def test_subscribe_before_read_no_gap_when_appends_race_the_start(
        rlog: RedisEventLog) -> None:
    """Appends land between the follower's subscription and its first read, and between
    that read and its wait: every event arrives once, in order."""
    turn = Turn(rlog, turn_events("req_race", texts=40))
    turn.emit(5)
    await wait_for(lambda: rlog.stats.appended == 5, "first five appended")
    real_xrange = rlog.client.xrange
    calls = 0

    async def racing_xrange(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # subscribed already: append 10 more before this read runs
            turn.emit(10)
            await wait_for(lambda: rlog.stats.appended == 15, "appended before the read")
        result = await real_xrange(*args, **kwargs)
        if calls == 1:  # ... and 10 more after it, before the follower waits
            turn.emit(10)
            await wait_for(lambda: rlog.stats.appended == 25, "appended after the read")
        return result

    rlog.client.xrange = racing_xrange  # type: ignore[method-assign]
    follower = asyncio.create_task(collect(rlog, "req_race", since=2))
    await wait_for(lambda: calls >= 2, "the follower read again after a notification")
    turn.emit(turn.left)
    got = await asyncio.wait_for(follower, 10)
    assert dumps(got) == dumps(turn.events[2:])


async def test_many_followers_started_while_the_writer_appends_get_everything_once(
        rlog: RedisEventLog) -> None:
    turn = Turn(rlog, turn_events("req_crowd", texts=200))
    followers: list[tuple[int, asyncio.Task[list[Event]]]] = []
    while turn.left:
        turn.emit(3)
        if len(turn.items) % 9 == 0:
            since = len(turn.items) // 2
            followers.append((since, asyncio.create_task(collect(rlog, "req_crowd", since=since))))
        await asyncio.sleep(0)
    assert len(followers) > 10
    for since, task in followers:
        assert dumps(await asyncio.wait_for(task, 10)) == dumps(turn.events[since:]), since
    assert rlog.followers == 0


async def test_two_prefixes_on_one_redis_never_see_each_other(prefix: str) -> None:
    other_prefix = new_prefix()
    async with event_log(REDIS_URL, prefix) as a, event_log(REDIS_URL, other_prefix) as b:
        turn_a = Turn(a, turn_events("req_same", texts=5))
        turn_b = Turn(b, [e.model_copy(update={"ts": 1.0}) for e in turn_events("req_same", texts=9)])
        follow_a = asyncio.create_task(collect(a, "req_same"))
        follow_b = asyncio.create_task(collect(b, "req_same"))
        await wait_for(lambda: a.followers == 1 and b.followers == 1, "followers subscribed")
        turn_a.emit(turn_a.left)
        turn_b.emit(turn_b.left)
        assert dumps(await asyncio.wait_for(follow_a, 10)) == dumps(turn_a.events)
        assert dumps(await asyncio.wait_for(follow_b, 10)) == dumps(turn_b.events)
        assert a.key("req_same") != b.key("req_same")
        assert a.channel("req_same") != b.channel("req_same")


async def test_a_follower_beats_on_silence(rlog: RedisEventLog) -> None:
    turn = Turn(rlog, turn_events("req_idle", texts=3))
    turn.emit(2)
    seen: list[int | None] = []
    async with contextlib.aclosing(rlog.follow("req_idle", idle_s=0.05)) as events:
        async for event in events:
            seen.append(None if event is None else event.seq)
            if seen.count(None) == 2:
                turn.emit(turn.left)
    assert [s for s in seen if s is not None] == list(range(1, len(turn.events) + 1))
    assert seen[:2] == [1, 2] and seen[2:4] == [None, None]


# -- Redis restarts -----------------------------------------------------------------------------
async def test_a_redis_restart_mid_turn_is_repaired_and_followers_get_everything(
        tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    with server:
        async with event_log(server.url, new_prefix()) as log:
            turn = Turn(log, turn_events("req_restart", texts=60))
            follower = asyncio.create_task(collect(log, "req_restart", idle_s=0.05))
            await wait_for(lambda: log.followers == 1, "follower started")
            turn.emit(20)
            await wait_for(lambda: log.stats.appended == 20, "20 appended")
            server.kill()
            turn.emit(10)  # while Redis is down: the turn goes on, appends wait
            await wait_for(lambda: log.health()["state"] == "degraded", "degraded")
            assert log.health()["pending"] == 10
            server.start()  # empty: the 20 appended before are gone
            # No new event: the owner notices the restart and re-fills the stream itself.
            await wait_for(lambda: log.health()["state"] == "ok", "reachable again")
            await wait_for(lambda: log.stats.appended >= 50 and log.health()["pending"] == 0,
                           "stream re-filled")
            turn.emit(turn.left)
            got = await asyncio.wait_for(follower, 15)
            assert dumps(got) == dumps(turn.events)
            assert log.stats.repairs >= 1
            entries = await stream_entries(log, "req_restart")
            assert [p.decode() for _, p in entries] == dumps(turn.events)
            assert log.stats.follower_reconnects >= 1


async def test_a_follower_of_a_stream_nobody_re_fills_after_a_restart_ends_with_an_error(
        tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    with server:
        prefix = new_prefix()
        async with event_log(server.url, prefix, cleanup=False) as owner:
            turn = Turn(owner, turn_events("req_orphan", texts=10))
            turn.emit(8)
            await wait_for(lambda: owner.stats.appended == 8, "eight appended")
        # The owner is gone (closed without done); a follower elsewhere reads what is there.
        async with event_log(server.url, prefix, lost_after_s=0.5) as other:
            got: list[Event] = []

            async def follow() -> None:
                async with contextlib.aclosing(other.follow("req_orphan", idle_s=0.05)) as events:
                    async for event in events:
                        if event is not None:
                            got.append(event)

            task = asyncio.create_task(follow())
            await wait_for(lambda: len(got) == 8, "the eight read")
            server.kill()
            server.start()  # empty, and no owner re-fills the stream
            with pytest.raises(EventLogError, match="gone from Redis"):
                await asyncio.wait_for(task, 10)
            assert dumps(got) == dumps(turn.events[:8])


async def test_a_turn_stream_ending_without_done_is_forgotten_once_appended(
        rlog: RedisEventLog) -> None:
    turn = Turn(rlog, turn_events("req_nodone", texts=4))
    turn.emit(5)
    turn.writer.on_completed()
    await wait_for(lambda: rlog.health()["live_streams"] == 0, "forgotten")
    assert rlog.stats.appended == 5
    assert await rlog.client.xlen(rlog.key("req_nodone")) == 5


# -- the server with Redis, in process -----------------------------------------------------------
def redis_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(db_path=tmp_path / "events.duckdb", offline_token_delay_ms=1,
                    event_log_ping_s=0.1, event_log_retry_max_s=0.2, **overrides)


async def test_the_turn_never_fails_while_redis_is_down(
        aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = create_app(redis_settings(tmp_path, event_log=dead, redis_prefix=new_prefix()))
    client = await aiohttp_client(app)
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "trace": True}) as resp:
        assert resp.status == 200
        frames = event_frames(await read_frames(resp))
    done = frames[-1].json
    assert (done["type"], done["ok"], done["reason"]) == ("done", True, "completed")
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "degraded"
    assert health["event_log"]["state"] == "degraded"
    assert health["event_log"]["pending"] == len(frames)  # waiting for Redis, not lost
    assert health["event_log"]["last_error"]
    # The store has the turn and the replay serves it from there.
    request_id = done["request_id"]
    async with client.get(f"/v1/requests/{request_id}/events", params={"trace": "true"}) as resp:
        assert resp.status == 200
        assert [f.json for f in event_frames(await read_frames(resp))] == [f.json for f in frames]


async def test_memory_is_the_default_and_healthz_says_so(
        aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(redis_settings(tmp_path)))
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok"
    assert health["event_log"] == {"kind": "memory", "state": "ok"}


async def test_replay_endpoint_follows_a_turn_that_only_redis_has(
        aiohttp_client: AiohttpClient, tmp_path: Path, prefix: str) -> None:
    """The seam for several workers: this app never ran the turn; another writer did."""
    app = create_app(redis_settings(tmp_path, event_log=REDIS_URL, redis_prefix=prefix))
    client = await aiohttp_client(app)
    try:
        async with event_log(REDIS_URL, prefix, cleanup=False) as other_process:
            turn = Turn(other_process, turn_events("req_elsewhere", texts=10))
            turn.emit(7)
            await wait_for(lambda: other_process.stats.appended == 7, "seven appended")
            async with client.get("/v1/requests/req_elsewhere/events",
                                  params={"since_seq": "2", "trace": "true"}) as resp:
                assert resp.status == 200
                first = await resp.content.readuntil(b'"seq":7')
                assert b'"seq":3' in first
                turn.emit(turn.left)
                frames = event_frames(await read_frames(resp))
            assert [f.json["seq"] for f in frames][-1] == len(turn.events)
            async with client.get("/v1/requests/req_elsewhere/events") as resp:
                visible = [f.json for f in event_frames(await read_frames(resp))]
            assert visible == [e.model_dump(mode="json") for e in turn.events
                               if e.type not in {"route", "memory", "llm_call"}]
            last = len(turn.events)
            async with client.get("/v1/requests/req_elsewhere/events",
                                  params={"since_seq": str(last)}) as resp:
                assert resp.status == 204
    finally:
        await delete_prefix(REDIS_URL, prefix)


async def test_a_local_turn_with_redis_is_appended_and_served_from_redis_after_it_ends(
        aiohttp_client: AiohttpClient, tmp_path: Path, prefix: str) -> None:
    app = create_app(redis_settings(tmp_path, event_log=REDIS_URL, redis_prefix=prefix,
                                    event_log_ttl_s=60))
    client = await aiohttp_client(app)
    try:
        async with client.post("/v1/orchestrate", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "trace": True}) as resp:
            frames = event_frames(await read_frames(resp))
        request_id = frames[0].json["request_id"]
        redis = aioredis.Redis.from_url(REDIS_URL)
        try:
            key = f"{prefix}:req:{request_id}:events"
            await wait_for(lambda: redis.xlen(key), "appended")
            await wait_for(lambda: _xlen_is(redis, key, len(frames)), "all appended")
            raw = await redis.xrange(key)
            assert [fields[b"e"].decode() for _, fields in raw] == [f.data for f in frames]
            assert 0 < await redis.ttl(key) <= 60
        finally:
            await redis.aclose()
        async with client.get(f"/v1/requests/{request_id}/events",
                              params={"trace": "true", "since_seq": "3"}) as resp:
            assert [f.data for f in event_frames(await read_frames(resp))] == [f.data for f in frames[3:]]
        health = await (await client.get("/healthz")).json()
        assert health["event_log"]["state"] == "ok"
        assert health["event_log"]["appended"] == len(frames)
    finally:
        await delete_prefix(REDIS_URL, prefix)


async def _xlen_is(redis: aioredis.Redis, key: str, count: int) -> bool:
    return int(await redis.xlen(key)) == count


def test_event_log_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="EVENT_LOG"):
        Settings(event_log="postgres://nope")
    with pytest.raises(ValueError):
        Settings(event_log=REDIS_URL, redis_prefix="has space")
    assert not Settings().redis_log
    assert Settings(event_log=REDIS_URL).redis_log




# -- the recorder's reads: a gap between reads, cut short on demand (issue 13) -----------------
async def test_a_follower_with_a_read_gap_gets_everything_once_and_hurry_cuts_the_gap(
        rlog: RedisEventLog) -> None:
    events = turn_events("req_gap", texts=30)
    turn = Turn(rlog, events)
    hurry = asyncio.Event()
    got: list[Event] = []

    async def follow() -> None:
        # A gap far longer than the test may wait: only ``hurry`` can get past it.
        async with contextlib.aclosing(rlog.follow("req_gap", gap_s=600.0, hurry=hurry)) as it:
            async for event in it:
                if event is not None:
                    got.append(event)

    follower = asyncio.create_task(follow())
    await wait_for(lambda: rlog.followers == 1, "follower started")
    turn.emit(5)
    await wait_for(lambda: len(got) == 5, "the first read")
    while turn.left:  # the rest arrives while the follower sits in its gap
        turn.emit(1)
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)
    assert len(got) == 5  # still in the gap: no read per event
    hurry.set()  # somebody waits for this turn
    await asyncio.wait_for(follower, 10)
    assert dumps(got) == dumps(events)  # every event, in order, once


async def test_a_failing_notification_callback_does_not_end_the_subscriber(
        rlog: RedisEventLog, caplog: pytest.LogCaptureFixture) -> None:
    """The one pub/sub connection serves every follower of the process: a failure that is
    not Redis's (here a callback's bug) reconnects it like a lost connection, so later
    notifications still arrive (it ended the subscriber for good before)."""
    from sinks.event_log import _PatternWatch

    heard: list[tuple[bytes, int]] = []
    confirmed: list[int] = []

    def on_message(channel: bytes, seq: int) -> None:
        heard.append((channel, seq))
        if len(heard) == 1:
            raise KeyError("a bug in a callback")

    watch = _PatternWatch(rlog.notify_pattern, on_message, lambda: confirmed.append(1))
    await rlog._notifier.watch(watch)
    await wait_for(lambda: watch.subscribed, "subscribed")
    channel = rlog.channel("req_cb").encode()
    with caplog.at_level(logging.ERROR, logger="sinks.event_log"):
        await rlog.client.publish(channel, b"1")
        await wait_for(lambda: len(confirmed) == 2, "subscribed again after the failure")
    assert "the pub/sub reader failed; reconnecting" in caplog.text
    await rlog.client.publish(channel, b"2")
    await wait_for(lambda: len(heard) == 2, "the next notification")
    assert heard == [(channel, 1), (channel, 2)]
    await rlog._notifier.unwatch(watch)


async def test_a_subscribe_redis_never_answers_drops_the_connection_instead_of_hanging() -> None:
    """An (un)subscribe that does not go out within the command timeout (a stuck
    connection) drops that connection, and the subscriber reconnects; neither the
    follower's ``register`` nor the re-subscription after the reconnect waits forever.
    (A fake connection: a real Redis cannot be made to stall one write.)"""
    from sinks.event_log import EventLogStats, _Notifier

    made: list[StuckConnection] = []

    class StuckConnection:
        def __init__(self) -> None:
            self.closed = asyncio.Event()
            made.append(self)

        async def connect(self) -> None:
            return None

        async def send_command(self, *args: Any) -> None:
            await asyncio.Event().wait()  # the write never completes

        async def read_response(self, **_: Any) -> Any:  # (timeout=math.inf)
            await self.closed.wait()
            raise ConnectionError("closed")

        async def disconnect(self) -> None:
            self.closed.set()

    notifier = _Notifier(StuckConnection, retry_base_s=0.01,  # type: ignore[arg-type]
                         retry_max_s=0.05, stats=EventLogStats(), send_timeout_s=0.2)
    notifier.start()
    try:
        await wait_for(lambda: notifier._conn is not None, "connected")
        await asyncio.wait_for(notifier.register(b"chan"), 2.0)  # bounded, not stuck
        assert made[0].closed.is_set()  # the stuck connection was dropped
        # Each new connection's SUBSCRIBE of the waiting channel is bounded too.
        await wait_for(lambda: len(made) >= 3 and made[1].closed.is_set(), "reconnected")
    finally:
        await asyncio.wait_for(notifier.aclose(), 2.0)

"""The log recorder (issue 13) in process, against the machine's Redis (db 11).

A turn is appended to the Redis log by a writer with a meta (as a worker's is), so it is
announced on the discovery stream; a :class:`~sinks.log_recorder.LogRecorder` records it
into a DuckDB file. The properties: every event exactly once with the rows the single
process writes; entries read but not acknowledged are read again after a restart (own
pending, or claimed from a dead consumer) and the rows are not doubled; a turn announced
twice (a repair from seq 1) is recorded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.events import (
    Done,
    Event,
    RequestReceived,
    StreamEnd,
    StreamStart,
    Text,
    ToolCall,
    ToolResult,
)
from core.turn import TurnContext
from sinks.event_log import APPEND_SCRIPT, RedisEventLog
from sinks.log_recorder import LogRecorder
from sinks.recorder import turn_meta
from sinks.store import EventStore
from tests.redis_helpers import REDIS_HOST, REDIS_PORT, delete_prefix, require_redis, wait_for

URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"


def prefix() -> str:
    return f"rec-{uuid.uuid4().hex[:12]}"


def ctx_of(request_id: str, conversation_id: str = "conv_r") -> TurnContext:
    return TurnContext(request_id=request_id, conversation_id=conversation_id,
                       messages=[{"role": "user", "content": "hello"}], trace=False,
                       model="offline", max_tokens=None, kind="orchestrate")


def events_of(request_id: str, *, texts: int = 10, conversation_id: str = "conv_r") -> list[Event]:
    body: list[Event] = [
        RequestReceived(agent="assistant", conversation_id=conversation_id),
        StreamStart(stream_id=1, agent="assistant"),
        ToolCall(stream_id=1, tool="clock.now", execution_id="ex1", params={"tz": "UTC"}),
        ToolResult(stream_id=1, tool="clock.now", execution_id="ex1", ok=True, data={"t": 1}),
        *(Text(stream_id=1, delta=f"w{i} ") for i in range(texts)),
        StreamEnd(stream_id=1),
        Done(ok=True, duration_ms=3.0, reason="completed"),
    ]
    return [event.model_copy(update={"request_id": request_id, "seq": seq})
            for seq, event in enumerate(body, start=1)]


class Owner:
    """A turn's owner: emits the turn's events into the log, one batch at a time."""

    def __init__(self, log: RedisEventLog, events: list[Event], ctx: TurnContext) -> None:
        self.events = events
        self.items: list[Event] = []
        self.writer = log.writer(ctx.request_id, history=lambda: self.items,
                                 meta=turn_meta(ctx, started_at=time.time()))
        self.log = log

    async def emit(self, count: int) -> None:
        for event in self.events[len(self.items): len(self.items) + count]:
            self.items.append(event)
            self.writer.on_next(event)
        last = self.items[-1].seq
        assert await self.log.appended(self.events[0].request_id, seq=last, within=10)


@contextlib.asynccontextmanager
async def redis_log(pfx: str) -> AsyncIterator[RedisEventLog]:
    log = RedisEventLog(URL, prefix=pfx, retry_base_s=0.02, retry_max_s=0.2, ping_s=0.1)
    await log.start()
    try:
        yield log
    finally:
        await log.aclose(timeout_s=1.0)


@contextlib.asynccontextmanager
async def recorder(log: RedisEventLog, store: EventStore, **options: Any
                   ) -> AsyncIterator[LogRecorder]:
    options = {"block_ms": 50, "retry_max_s": 0.1, **options}
    rec = LogRecorder(log, store, **options)
    await rec.start()
    try:
        assert await rec.ready()
        yield rec
    finally:
        await rec.aclose()


def open_store(path: Path) -> EventStore:
    return EventStore(path, flush_interval_ms=20).open()


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def assert_recorded_once(path: Path, request_id: str, events: list[Event]) -> None:
    stored = rows(path, f"SELECT seq, data FROM events WHERE request_id = '{request_id}' "
                        "ORDER BY seq")
    assert [seq for seq, _ in stored] == [event.seq for event in events]
    assert [data for _, data in stored] == [event.model_dump_json() for event in events]
    assert rows(path, f"SELECT status, kind, conversation_id, last_seq FROM requests "
                      f"WHERE request_id = '{request_id}'") == [
        ("completed", "orchestrate", "conv_r", events[-1].seq)]
    texts = "".join(e.delta for e in events if isinstance(e, Text))
    assert rows(path, f"SELECT role, content, status FROM messages WHERE request_id = "
                      f"'{request_id}' ORDER BY ordinal") == [
        ("user", "hello", "complete"), ("assistant", texts, "complete")]
    assert rows(path, f"SELECT execution_id, status, params FROM tool_executions "
                      f"WHERE request_id = '{request_id}'") == [("ex1", "ok", '{"tz": "UTC"}')]


async def pending(log: RedisEventLog) -> int:
    info = await log.client.xpending(log.turns_key, "recorder")
    return int(info["pending"])


@pytest.fixture
async def pfx() -> AsyncIterator[str]:
    require_redis()
    name = prefix()
    yield name
    await delete_prefix(URL, name)


async def test_a_turn_is_recorded_once_with_its_rows_and_acknowledged(tmp_path: Path,
                                                                       pfx: str) -> None:
    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    try:
        async with redis_log(pfx) as log, recorder(log, store) as rec:
            events = events_of("req_one")
            owner = Owner(log, events, ctx_of("req_one"))
            await owner.emit(3)
            await owner.emit(len(events))
            await wait_for(lambda: rec.stats.turns_recorded == 1, "the turn recorded")
            assert await pending(log) == 0
            assert await log.client.xlen(log.turns_key) == 0  # acknowledged entries deleted
    finally:
        store.close()
    assert_recorded_once(path, "req_one", events)


async def test_entries_read_but_not_acknowledged_are_read_again_after_a_restart(
        tmp_path: Path, pfx: str) -> None:
    """The recorder stops mid-turn (its entry read, not acknowledged); the turn goes on;
    a new recorder under the same name re-reads its pending entry, takes the turn up from
    what the store has, and no row is doubled."""
    path = tmp_path / "rec.duckdb"
    events = events_of("req_two", texts=30)
    async with redis_log(pfx) as log:
        owner = Owner(log, events, ctx_of("req_two"))
        store = open_store(path)
        async with recorder(log, store) as first:
            await owner.emit(12)
            await wait_for(lambda: first.stats.events_recorded >= 12, "half recorded")
            await store.flush()
        store.close()  # the recorder is gone: its entry pending, half the turn stored
        assert await pending(log) == 1
        assert rows(path, "SELECT count(*) FROM events") == [(12,)]

        await owner.emit(len(events))  # the turn ends while no recorder runs
        store = open_store(path)
        try:
            async with recorder(log, store) as second:
                await wait_for(lambda: second.stats.turns_recorded == 1, "the turn recorded")
                assert second.stats.redelivered == 1 and second.stats.resumed == 1
                assert await pending(log) == 0
        finally:
            store.close()
    assert_recorded_once(path, "req_two", events)


async def test_a_dead_consumers_entries_are_claimed(tmp_path: Path, pfx: str) -> None:
    path = tmp_path / "rec.duckdb"
    events = events_of("req_three")
    async with redis_log(pfx) as log:
        owner = Owner(log, events, ctx_of("req_three"))
        store = open_store(path)
        async with recorder(log, store, consumer="recorder-a") as first:
            await owner.emit(5)
            await wait_for(lambda: first.stats.events_recorded >= 5, "some recorded")
        store.close()
        await owner.emit(len(events))
        store = open_store(path)
        try:
            async with recorder(log, store, consumer="recorder-b", claim_idle_s=0) as second:
                await wait_for(lambda: second.stats.turns_recorded == 1, "the turn recorded")
                assert second.stats.redelivered == 1
                assert await pending(log) == 0
        finally:
            store.close()
    assert_recorded_once(path, "req_three", events)


async def test_a_turn_announced_twice_and_recorded_twice_has_its_rows_once(
        tmp_path: Path, pfx: str) -> None:
    """A repair re-appends from seq 1 (a second discovery entry), and the recorder stops
    after the commit but before the acknowledgement: the turn is recorded again, the same
    rows."""
    path = tmp_path / "rec.duckdb"
    events = events_of("req_four")
    async with redis_log(pfx) as log:
        owner = Owner(log, events, ctx_of("req_four"))
        await owner.emit(len(events))
        store = open_store(path)
        rec = LogRecorder(log, store, block_ms=50, retry_max_s=0.1)

        async def no_ack(entries: list[bytes]) -> None:  # the recorder dies right here
            raise RuntimeError("killed before XACK")

        rec._ack = no_ack  # type: ignore[method-assign]
        await rec.start()
        await wait_for(lambda: rec.stats.events_recorded == len(events) and not rec.live_turns,
                       "the turn recorded, not acknowledged")
        await rec.aclose()
        store.close()
        assert rows(path, "SELECT count(*) FROM events") == [(len(events),)]
        # the repair: the stream is gone, the owner re-appends it all (announcing it again)
        await log.client.delete(log.key("req_four"))
        raw = aioredis.Redis.from_url(URL)
        try:
            sha = await raw.script_load(APPEND_SCRIPT)
            await raw.evalsha(sha, 2, log.key("req_four"), log.turns_key, log.channel("req_four"),
                              1, 60, "req_four", turn_meta(ctx_of("req_four"), started_at=1.0),
                              *(event.model_dump_json() for event in events))
        finally:
            await raw.aclose()
        assert await log.client.xlen(log.turns_key) == 2
        store = open_store(path)
        try:
            async with recorder(log, store) as second:
                await wait_for(lambda: second.stats.turns_recorded >= 1 and not second.live_turns
                               and second.stats.discovered == 2, "both entries handled")
                assert await pending(log) == 0
        finally:
            store.close()
    assert_recorded_once(path, "req_four", events)


async def test_a_live_turns_entry_is_kept_fresh_so_no_other_recorder_claims_it(
        tmp_path: Path, pfx: str) -> None:
    events = events_of("req_five")
    async with redis_log(pfx) as log:
        owner = Owner(log, events, ctx_of("req_five"))
        store = open_store(tmp_path / "a.duckdb")
        other_store = open_store(tmp_path / "b.duckdb")
        try:
            async with recorder(log, store, consumer="a", claim_idle_s=1.5) as first:
                await owner.emit(3)
                await wait_for(lambda: first.stats.events_recorded >= 3, "following")
                await asyncio.sleep(2.5)  # longer than claim_idle_s: kept fresh meanwhile
                async with recorder(log, other_store, consumer="b", claim_idle_s=1.5) as second:
                    assert second.stats.redelivered == 0 and second.live_turns == 0
                await owner.emit(len(events))
                await wait_for(lambda: first.stats.turns_recorded == 1, "recorded by a")
        finally:
            store.close()
            other_store.close()
    assert_recorded_once(tmp_path / "a.duckdb", "req_five", events)


async def test_the_group_is_created_again_when_redis_lost_it(tmp_path: Path, pfx: str) -> None:
    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    events = events_of("req_six")
    try:
        async with redis_log(pfx) as log, recorder(log, store) as rec:
            await log.client.delete(log.turns_key)  # what an empty restart leaves
            await asyncio.sleep(0.2)
            owner = Owner(log, events, ctx_of("req_six"))
            await owner.emit(len(events))
            await wait_for(lambda: rec.stats.turns_recorded == 1, "recorded after NOGROUP")
    finally:
        store.close()
    assert_recorded_once(path, "req_six", events)


async def test_sync_waits_for_the_log_and_fails_when_the_recorder_cannot_get_there(
        tmp_path: Path, pfx: str) -> None:
    """The read-your-writes barrier: it returns once what the log holds is committed (even
    for a turn not announced yet when it was asked), and raises rather than pretending."""
    from core.errors import StoreError

    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    events = events_of("req_seven")
    try:
        async with redis_log(pfx) as log, recorder(log, store) as rec:
            with pytest.raises(StoreError):
                await rec.sync(request_id="req_never", seq=3, timeout_s=0.3)
            owner = Owner(log, events, ctx_of("req_seven"))
            waiting = asyncio.ensure_future(rec.sync(request_id="req_seven", seq=8, timeout_s=10))
            await owner.emit(8)
            await waiting  # seq 8 committed: the store has it now
            assert store.query("SELECT max(seq) FROM events WHERE request_id = 'req_seven'") \
                == [(8,)]
            await owner.emit(len(events))
            await rec.sync(timeout_s=10)  # everything the log holds
            assert store.query("SELECT status FROM requests WHERE request_id = 'req_seven'") \
                == [("completed",)]
    finally:
        store.close()
    assert_recorded_once(path, "req_seven", events)


async def test_many_live_turns_are_read_together_in_few_round_trips(tmp_path: Path,
                                                                    pfx: str) -> None:
    """60 live turns emit their events in rounds, one event of every turn per round (as 60
    model streams do): every turn is recorded once, in order, and the recorder's reads of
    the live turns number about one per round, not one per turn per round (which a follower
    per turn needs: 60 x rounds)."""
    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    turns = [f"req_many_{i}" for i in range(60)]
    all_events = {rid: events_of(rid, texts=8) for rid in turns}
    rounds = len(all_events[turns[0]])
    try:
        async with redis_log(pfx) as log, recorder(log, store) as rec:
            owners = [Owner(log, all_events[rid], ctx_of(rid)) for rid in turns]
            for done in range(1, rounds + 1):
                for owner in owners:  # one event of each turn, queued in one loop tick
                    event = owner.events[len(owner.items)]
                    owner.items.append(event)
                    owner.writer.on_next(event)
                goal = done * len(owners)
                await wait_for(lambda goal=goal: rec.stats.events_recorded >= goal,  # type: ignore[misc]
                               "the round recorded")
            await wait_for(lambda: rec.stats.turns_recorded == len(turns), "every turn recorded")
            assert rec.stats.events_recorded == len(turns) * rounds
            # (the first reads come as turns are discovered, a few at a time)
            assert rec.reader.reads <= 2 * rounds + len(turns), rec.reader.reads
            assert len(rec.reader) == 0 and rec.live_turns == 0
            assert await pending(log) == 0
    finally:
        store.close()
    stored = rows(path, "SELECT request_id, list(seq ORDER BY seq), list(data ORDER BY seq) "
                        "FROM events GROUP BY request_id")
    assert {rid: (seqs, data) for rid, seqs, data in stored} == {
        rid: ([e.seq for e in evs], [e.model_dump_json() for e in evs])
        for rid, evs in all_events.items()}
    assert rows(path, "SELECT status, count(*) FROM requests GROUP BY status") == [
        ("completed", len(turns))]


async def test_a_turn_longer_than_one_read_is_read_in_bounded_reads_in_order(
        tmp_path: Path, pfx: str) -> None:
    """RECORDER_READ_COUNT bounds what one read takes of a turn: 300 events already in the
    log, 40 per read, all recorded once and in seq order."""
    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    events = events_of("req_long", texts=300)
    try:
        async with redis_log(pfx) as log:
            owner = Owner(log, events, ctx_of("req_long"))
            await owner.emit(len(events))
            async with recorder(log, store, live_count=40) as rec:
                await wait_for(lambda: rec.stats.turns_recorded == 1, "the turn recorded")
                assert rec.reader.reads >= len(events) // 40
    finally:
        store.close()
    assert_recorded_once(path, "req_long", events)


async def test_a_turn_whose_stream_is_gone_is_closed_as_interrupted_not_waited_for(
        tmp_path: Path, pfx: str) -> None:
    """The recorder stops mid-turn; while it is away the turn's stream expires (a recorder
    down longer than EVENT_LOG_TTL_S) and nobody re-fills it. The next recorder takes the
    pending entry up, finds no stream, and after RECORDER_LOST_S closes the turn as
    interrupted and acknowledges it, rather than following a stream that will never come."""
    path = tmp_path / "rec.duckdb"
    events = events_of("req_gone", texts=10)
    async with redis_log(pfx) as log:
        owner = Owner(log, events, ctx_of("req_gone"))
        store = open_store(path)
        async with recorder(log, store) as first:
            await owner.emit(5)
            await wait_for(lambda: first.stats.events_recorded >= 5, "half recorded")
        store.close()
        await log.client.delete(log.key("req_gone"))
        store = open_store(path)
        try:
            async with recorder(log, store, lost_s=0.5) as second:
                await wait_for(lambda: second.stats.lost == 1 and second.stats.turns_recorded == 1,
                               "the turn closed as lost")
                assert await pending(log) == 0 and second.live_turns == 0
        finally:
            store.close()
    assert rows(path, "SELECT status, last_seq >= 5 FROM requests WHERE request_id = 'req_gone'"
                ) == [("interrupted", True)]
    assert [seq for (seq,) in rows(path, "SELECT seq FROM events WHERE request_id = 'req_gone' "
                                        "AND seq <= 5 ORDER BY seq")] == [1, 2, 3, 4, 5]


async def test_after_the_subscription_is_lost_every_live_turn_is_read_again(
        tmp_path: Path, pfx: str) -> None:
    """The pattern subscription's connection drops; what is published before it is back is
    unheard of, so every live turn is read again once it is: nothing is missed."""
    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    events = events_of("req_resub", texts=20)
    try:
        async with redis_log(pfx) as log, recorder(log, store) as rec:
            owner = Owner(log, events, ctx_of("req_resub"))
            await owner.emit(4)
            await wait_for(lambda: rec.stats.events_recorded >= 4, "following")
            conn = log._notifier._conn
            assert conn is not None
            await conn.disconnect()  # the subscriber's connection is gone (its reader notices)
            await owner.emit(len(events))  # published while unsubscribed, or just after
            await wait_for(lambda: rec.stats.turns_recorded == 1, "the turn recorded")
            assert log.stats.follower_reconnects >= 1
    finally:
        store.close()
    assert_recorded_once(path, "req_resub", events)


async def test_with_a_read_gap_a_sync_cuts_it_short_and_nothing_is_missed(
        tmp_path: Path, pfx: str) -> None:
    """RECORDER_READ_GAP_S far longer than the test may wait: after a read, the live turns
    are not read again before it ends, unless somebody waits for a turn (a sync)."""
    path = tmp_path / "rec.duckdb"
    store = open_store(path)
    events = events_of("req_gap", texts=20)
    try:
        async with redis_log(pfx) as log, recorder(log, store, read_gap_s=600.0) as rec:
            owner = Owner(log, events, ctx_of("req_gap"))
            await owner.emit(3)
            await wait_for(lambda: rec.stats.events_recorded >= 3, "the first read")
            await owner.emit(10)
            await asyncio.sleep(0.3)  # (a read would have come by now without the gap)
            assert rec.stats.events_recorded < 10
            await rec.sync(request_id="req_gap", seq=10, timeout_s=5)
            assert rec.stats.events_recorded >= 10
            await owner.emit(len(events))
            await rec.sync(request_id="req_gap", seq=len(events), timeout_s=5)
            await wait_for(lambda: rec.stats.turns_recorded == 1, "the turn recorded")
    finally:
        store.close()
    assert_recorded_once(path, "req_gap", events)

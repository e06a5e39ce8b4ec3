"""The cluster membership (:mod:`sinks.cluster`) in-process against the machine's Redis (db
12): two reapers racing for one dead owner's turn, leases held and lost, the append
script refusing a second closer, a forwarded cancel."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from core.events import Done
from core.turn import TurnContext
from sinks.cluster import Cluster, RemoteCancelError
from sinks.event_log import RedisEventLog
from tests.redis_helpers import (
    REDIS_HOST,
    REDIS_PORT,
    Turn,
    delete_prefix,
    event_log,
    require_redis,
    turn_events,
    wait_for,
)

URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/12"


def new_prefix() -> str:
    return f"wrk-{uuid.uuid4().hex[:12]}"


async def _refuse(request_id: str) -> dict[str, Any]:
    return {"cancelled": False}


@contextlib.asynccontextmanager
async def member(prefix: str, worker_id: str, *, lease_s: float = 0.3, **options: Any
                 ) -> AsyncIterator[Cluster]:
    async with event_log(URL, prefix, cleanup=False) as log:
        cluster = Cluster(URL, prefix=prefix, event_log=log, store=None, worker_id=worker_id,
                          lease_s=lease_s, meta_ttl_s=60, live_ttl_s=600,
                          cancel_timeout_s=2.0, cancel_local=options.pop("cancel_local", _refuse),
                          on_lease_lost=options.pop("on_lease_lost", lambda _: None), **options)
        await cluster.start()
        try:
            yield cluster
        finally:
            await cluster.aclose()


async def orphan(log: RedisEventLog, prefix: str, request_id: str, *, emitted: int) -> None:
    """A turn whose owner ``dead`` appended ``emitted`` events, then vanished (no lease)."""
    turn = Turn(log, turn_events(request_id, texts=30))
    turn.emit(emitted)
    assert await log.appended(request_id, seq=emitted, within=5)
    client = aioredis.Redis.from_url(URL)
    try:
        await client.hset(f"{prefix}:live", request_id, "dead")
        await client.hset(f"{prefix}:req:{request_id}:meta",
                          mapping={"worker": "dead", "status": "running",
                                   "conversation_id": "conv_t", "model": "offline"})
    finally:
        await client.aclose()


async def test_two_reapers_racing_for_one_dead_owners_turn_close_it_exactly_once() -> None:
    require_redis()
    prefix = new_prefix()
    try:
        async with event_log(URL, prefix, cleanup=False) as owner_log, \
                member(prefix, "a", lease_s=60) as a, member(prefix, "b", lease_s=60) as b:
            await orphan(owner_log, prefix, "req_race", emitted=12)  # stream 1 open
            closed = await asyncio.gather(a.reap_once(), b.reap_once())
            assert sorted(len(c) for c in closed) == [0, 1]
            events = await a.event_log.read_all("req_race")
            seqs = [e.seq for e in events]
            assert seqs == list(range(1, len(seqs) + 1))
            assert [e.type for e in events[12:]] == ["stream_end", "turn_error", "done"]
            assert events[12].stream_id == 1 and events[12].status == "error"
            last = events[-1]
            assert isinstance(last, Done) and last.reason == "interrupted" and not last.ok
            assert a.stats.reaped + b.stats.reaped == 1
            assert a.stats.claims_lost + b.stats.claims_lost == 1
            # Nothing is live any more; its meta says interrupted and who owned it.
            assert await a.owner("req_race") is None
            meta = await b.meta("req_race")
            assert meta is not None
            assert meta["status"] == "interrupted" and meta["worker"] == "dead"
            assert meta["closed_by"] in {"a", "b"}
            # Another pass closes nothing more.
            assert await a.reap_once() == [] and await b.reap_once() == []
            assert len(await a.event_log.read_all("req_race")) == len(events)
    finally:
        await delete_prefix(URL, prefix)


async def test_the_append_script_refuses_a_second_closer() -> None:
    require_redis()
    prefix = new_prefix()
    try:
        async with event_log(URL, prefix, cleanup=False) as log:
            await orphan(log, prefix, "req_twice", emitted=8)
            closing = [e.model_copy(update={"seq": 9 + i}) for i, e in
                       enumerate(turn_events("req_twice")[-2:])]
            assert await log.append_as_closer("req_twice", closing) == (True, 10)
            assert await log.append_as_closer("req_twice", closing) == (False, 10)
            assert len(await log.read_all("req_twice")) == 10
    finally:
        await delete_prefix(URL, prefix)


async def test_a_turn_whose_owner_renews_its_lease_is_not_reaped_and_a_lost_lease_cancels(
        ) -> None:
    require_redis()
    prefix = new_prefix()
    lost: list[str] = []
    try:
        async with member(prefix, "owner", on_lease_lost=lost.append) as owner, \
                member(prefix, "other") as other:
            ctx = TurnContext(request_id="req_held", conversation_id="conv_h", messages=[],
                              trace=False, model="offline", max_tokens=None, kind="orchestrate")
            owner.tap(ctx)
            assert await owner.registered("req_held", within=5)
            assert await other.owner("req_held") == "owner"
            await asyncio.sleep(owner.lease_s * 3)  # several renewals
            assert await other.reap_once() == []
            # Another worker took the lease (the owner stalled): the owner gives the turn up.
            client = aioredis.Redis.from_url(URL)
            try:
                await client.set(f"{prefix}:lease:req_held", "other")
            finally:
                await client.aclose()
            await wait_for(lambda: lost == ["req_held"], "the owner noticed its lost lease")
            assert owner.stats.leases_lost == 1
    finally:
        await delete_prefix(URL, prefix)


async def test_a_cancel_goes_to_the_owner_and_its_answer_comes_back() -> None:
    require_redis()
    prefix = new_prefix()
    asked: list[str] = []

    async def cancel_here(request_id: str) -> dict[str, Any]:
        asked.append(request_id)
        return {"cancelled": True, "status": "cancelled", "last_seq": 7}

    try:
        async with member(prefix, "owner", cancel_local=cancel_here), \
                member(prefix, "other") as other:
            answer = await other.cancel_remote("req_c", "owner")
            assert answer == {"cancelled": True, "status": "cancelled", "last_seq": 7}
            assert asked == ["req_c"]
            try:
                await other.cancel_remote("req_c", "nobody")
            except RemoteCancelError as exc:
                assert exc.owner == "nobody" and "does not listen" in str(exc)
            else:
                raise AssertionError("a cancel to nobody was answered")
    finally:
        await delete_prefix(URL, prefix)

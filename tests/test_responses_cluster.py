"""In-process pieces of the Responses wire across workers: the fold over a followed
(async) turn, and reading a turn's Redis stream for a snapshot (db 15, a unique prefix)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from api.cluster import logged_events, logged_head
from api.common import EVENT_LOG
from api.responses import response_events_after
from core.events import Event
from operators import ReplayLog, fold_response, to_response_events
from tests.redis_helpers import (
    REDIS_URL,
    Turn,
    event_log,
    new_prefix,
    require_redis,
    turn_events,
    wait_for,
)
from tests.test_response_events import BASE, turn_list


async def followed(events: list[Event]) -> AsyncGenerator[Event | None]:
    """The events as a follower of the log yields them, an idle mark between each."""
    for event in events:
        yield None
        yield event


async def test_the_fold_over_a_followed_turn_is_the_owners_stream_from_any_cursor() -> None:
    events = turn_list()
    owners: list[dict[str, Any]] = []
    log: ReplayLog[Event] = ReplayLog()
    log.pipe(to_response_events(response=BASE)).subscribe(owners.append)
    for event in events:
        log.on_next(event)
    _, stored = fold_response(BASE, events)
    assert owners == stored and stored[-1]["type"] == "response.completed"
    for after in [*range(-1, len(stored) + 1), 50]:
        got = [e async for e in response_events_after(followed(events), response=BASE,
                                                      after=after)]
        assert got == owners[after + 1:], after


async def test_a_turns_redis_stream_is_read_whole_or_not_at_all() -> None:
    require_redis()
    prefix = new_prefix()
    async with event_log(REDIS_URL, prefix) as redis_log:
        app = web.Application()
        app[EVENT_LOG] = redis_log
        assert await logged_head(app, "req_absent") is None
        assert await logged_events(app, "req_absent") is None

        events = turn_events("req_whole", texts=5)
        turn = Turn(redis_log, events)
        turn.emit(4)

        async def four() -> bool:
            head = await logged_head(app, "req_whole")
            return head is not None and head.last_seq == 4

        await wait_for(four, "4 events in Redis")
        head = await logged_head(app, "req_whole")
        assert head is not None and not head.done
        assert await logged_events(app, "req_whole") == events[:4]
        turn.emit(turn.left)
        await wait_for(lambda: redis_log.appended("req_whole", seq=len(events), within=5),
                       "the whole turn in Redis")
        head = await logged_head(app, "req_whole")
        assert head is not None and head.done
        assert await logged_events(app, "req_whole") == events

        # A hole (its owner re-filling the stream): not a snapshot to answer from.
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for event in turn_events("req_hole", texts=3)[:5]:
                if event.seq != 3:
                    await client.xadd(redis_log.key("req_hole"), {"e": event.model_dump_json()},
                                      id=f"{event.seq}-0")
        finally:
            await client.aclose()
        assert await logged_head(app, "req_hole") is not None
        assert await logged_events(app, "req_hole") is None

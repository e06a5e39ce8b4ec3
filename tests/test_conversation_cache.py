"""Memory from memory (issue 12): ``EventStore.load_history`` answers a conversation read
lately from what the store wrote for it, and that answer is always the one the SQL query
gives once everything is flushed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from sinks.conversations import ConversationCache
from sinks.store import HISTORY_SQL, EventStore, MessageRow

T0 = 1_790_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    with EventStore(tmp_path / "events.duckdb", flush_interval_ms=60_000) as opened:
        yield opened


def message(request_id: str, ordinal: int, role: str, content: str, *, status: str = "complete",
            at: float, conversation_id: str = "c") -> MessageRow:
    return MessageRow(message_id=f"{request_id}:{ordinal}", conversation_id=conversation_id,
                      request_id=request_id, ordinal=ordinal, role=role, content=content,
                      status=status, created_at=at, updated_at=at)


async def from_sql(store: EventStore, conversation_id: str, *, limit: int,
                   exclude: str | None) -> list[dict[str, str]]:
    await store.flush()
    rows = await store.aquery(HISTORY_SQL, [conversation_id, exclude, limit])
    return [{"role": role, "content": content} for role, content in rows]


async def test_a_cached_history_is_always_the_one_the_query_gives(store: EventStore) -> None:
    rng = random.Random(12)
    statuses = ["complete", "complete", "cancelled", "error", "pending", "streaming"]
    turns = 0
    for round_ in range(12):
        for _ in range(rng.randint(1, 4)):  # a few turns: user, then the assistant's fate
            turns += 1
            at = T0 + turns + rng.choice([0.0, 0.0000004, 0.5])  # ties at the µs, too
            request_id = f"r{turns}"
            store.put_message(message(request_id, 0, "user", f"u{turns}", at=at))
            store.put_message(message(request_id, 1, "assistant", "", status="pending", at=at))
            if rng.random() < 0.8:  # the answer is written over the pending row
                store.put_message(message(request_id, 1, "assistant",
                                          rng.choice(["", f"a{turns}"]),
                                          status=rng.choice(statuses), at=at))
        store.put_message(message(f"other{round_}", 0, "user", "elsewhere", at=T0 + turns,
                                  conversation_id="elsewhere"))
        limit = rng.choice([0, 1, 3, 200])
        exclude = rng.choice([None, f"r{turns}", f"r{max(1, turns - 1)}"])
        got = await store.load_history("c", limit=limit, exclude_request_id=exclude)
        assert got == await from_sql(store, "c", limit=limit, exclude=exclude), (round_, limit)
    stats = store.conversations.stats()
    assert stats["misses"] == 1  # the store was read once; every later load from memory


async def test_a_message_written_while_the_conversation_loads_is_not_lost() -> None:
    cache = ConversationCache(max_bytes=1 << 20)
    cache.begin("c")
    newer = message("r2", 0, "user", "written during the read", at=T0 + 2)
    cache.put(newer)  # between the flush and the read: the read may not have it
    older = message("r1", 0, "user", "from the file", at=T0 + 1)
    cache.fill("c", [(int(older.created_at * 1_000_000), older)])
    assert cache.history("c", limit=10) == [
        {"role": "user", "content": "from the file"},
        {"role": "user", "content": "written during the read"}]


async def test_past_its_bound_the_cache_lets_go_and_the_store_still_answers(
    tmp_path: Path,
) -> None:
    with EventStore(tmp_path / "events.duckdb", history_cache_bytes=1000) as store:
        for n in range(3):
            store.put_message(message(f"r{n}", 0, "user", "x" * 300, at=T0 + n))
        assert await store.load_history("c", limit=10) == [{"role": "user", "content": "x" * 300}] * 3
        assert store.conversations.stats()["conversations"] == 0  # too big to keep
        store.put_message(message("r9", 0, "user", "more", at=T0 + 9))
        history = await store.load_history("c", limit=10)
        assert history[-1] == {"role": "user", "content": "more"} and len(history) == 4


async def test_a_message_that_cannot_be_written_is_not_remembered(store: EventStore) -> None:
    store.put_message(message("r1", 0, "user", "fine", at=T0 + 1))
    assert await store.load_history("c", limit=10) == [{"role": "user", "content": "fine"}]
    store.put_message(message("r2", 0, "user", "bad \ud800", at=T0 + 2))  # a lone surrogate
    with pytest.raises(Exception, match="could not be written"):
        await store.flush(request_id="r2")
    # The file does not have it, so memory must not offer it either.
    assert await store.load_history("c", limit=10) == [{"role": "user", "content": "fine"}]


async def test_off_means_every_load_reads_the_store(tmp_path: Path) -> None:
    with EventStore(tmp_path / "events.duckdb", history_cache_bytes=0) as store:
        store.put_message(message("r1", 0, "user", "hi", at=T0))
        assert await store.load_history("c", limit=5) == [{"role": "user", "content": "hi"}]
        assert await store.load_history("c", limit=5) == [{"role": "user", "content": "hi"}]
        assert store.conversations.stats() == {"conversations": 0, "bytes": 0, "hits": 0,
                                               "misses": 2}

"""The DuckDB event store: batched writes by count and by time, upserts, barriers, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from core.errors import StoreError
from core.events import Route, Text
import sinks.store as store_module
from sinks.store import EventStore, MessageRow, RequestRow, ToolExecutionRow, _EventRow

T0 = 1_700_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "e.duckdb"


@pytest.fixture
def store(path: Path) -> Iterator[EventStore]:
    # A long interval: only a full batch, a flush() barrier or close() writes.
    s = EventStore(path, flush_interval_ms=60_000, flush_max_rows=100).open()
    try:
        yield s
    finally:
        s.close()


def text(seq: int, delta: str = "x", *, request_id: str = "r1") -> Text:
    return Text(request_id=request_id, seq=seq, stream_id=1, delta=delta)


def request(request_id: str = "r1", *, status: str = "running", **fields: object) -> RequestRow:
    row = RequestRow(
        request_id=request_id, conversation_id="c1", kind="orchestrate", status=status,
        started_at=T0,
    )
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def message(
    request_id: str, ordinal: int, role: str, content: str, *, status: str = "complete",
    created_at: float = T0, conversation_id: str = "c1",
) -> MessageRow:
    return MessageRow(
        message_id=f"{request_id}:{ordinal}", conversation_id=conversation_id,
        request_id=request_id, ordinal=ordinal, role=role, content=content, status=status,
        created_at=created_at, updated_at=created_at,
    )


def count(store: EventStore, table: str = "events") -> int:
    return int(store.query(f"SELECT count(*) FROM {table}")[0][0])


async def poll(predicate: object, *, timeout_s: float = 2.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


# -- batching -------------------------------------------------------------------------------


async def test_events_are_written_in_batches_by_count(store: EventStore) -> None:
    for seq in range(1, 1001):
        store.append_event(text(seq, f"t{seq}"), agent="assistant", depth=0)
    await store.flush()

    assert count(store) == 1000
    assert store.stats.flushes >= 10
    assert store.stats.events_written == 1000
    assert store.stats.failed_flushes == 0
    assert store.query("SELECT min(seq), max(seq), count(DISTINCT seq) FROM events") == [
        (1, 1000, 1000)
    ]


async def test_events_are_written_by_time_without_a_flush(path: Path) -> None:
    store = EventStore(path, flush_interval_ms=30, flush_max_rows=10_000).open()
    try:
        for seq in (1, 2, 3):
            store.append_event(text(seq), agent="assistant", depth=0)
        assert await poll(lambda: count(store) == 3), "the timed flush never wrote the events"
        assert store.stats.failed_flushes == 0
    finally:
        store.close()


async def test_event_row_holds_the_wire_form(store: EventStore) -> None:
    event = text(1, "hello")
    store.append_event(event, agent="assistant", depth=0)
    store.append_event(Route(request_id="r1", seq=2, route="respond"), agent=None, depth=None)
    await store.flush()

    rows = store.query(
        "SELECT request_id, seq, type, stream_id, agent, depth, visibility, data "
        "FROM events ORDER BY seq"
    )
    assert [row[:7] for row in rows] == [
        ("r1", 1, "text", 1, "assistant", 0, "public"),
        ("r1", 2, "route", None, None, None, "trace"),
    ]
    assert json.loads(rows[0][7]) == json.loads(event.model_dump_json())


# -- upserts --------------------------------------------------------------------------------


async def test_request_and_message_upserts_coalesce_latest_wins(store: EventStore) -> None:
    # One batch holding three states of the same rows: only the latest is written.
    store.put_request(request())
    store.put_message(message("r1", 1, "assistant", "", status="pending"))
    store.put_message(message("r1", 1, "assistant", "Hel", status="streaming"))
    store.put_request(request(status="completed", model="m", total_tokens=7))
    store.put_message(message("r1", 1, "assistant", "Hello", status="complete"))
    await store.flush()

    assert store.stats.failed_flushes == 0
    assert store.query("SELECT request_id, status, model, total_tokens FROM requests") == [
        ("r1", "completed", "m", 7)
    ]
    assert store.query("SELECT message_id, content, status FROM messages") == [
        ("r1:1", "Hello", "complete")
    ]

    # A later batch replaces the stored row.
    store.put_request(request(status="error", error="boom"))
    await store.flush()
    assert store.query("SELECT status, error, model FROM requests") == [("error", "boom", None)]
    assert count(store, "requests") == 1


def _replaced(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether a write fell back to upserting its rows (the slow path)."""
    return "keys already stored in a batch" in caplog.text


async def test_a_row_written_before_is_updated_in_place_with_every_column(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The first write appends; the next ones of the same keys update them by key (not an
    # upsert): every column takes the new value, NULLs included, in every upsert table.
    store.put_request(request(model="m", total_tokens=7, error="early"))
    store.put_message(message("r1", 1, "assistant", "", status="pending"))
    tool = ToolExecutionRow(execution_id="x1", request_id="r1", conversation_id="c1",
                            tool="fs.read", params='{"path": "a"}', status="running",
                            started_at=T0)
    store.put_tool_execution(tool)
    await store.flush()
    store.put_request(request(status="completed", finished_at=T0 + 2, duration_ms=2000,
                              last_seq=9))
    store.put_message(message("r1", 1, "assistant", "Hello", status="complete",
                              created_at=T0 + 1))
    store.put_request(request("r2"))  # a new key in the same batch: appended
    store.put_tool_execution(dataclasses.replace(
        tool, status="ok", ok=True, result='{"text": "hi"}', finished_at=T0 + 1, duration_ms=3))
    await store.flush()

    assert store.stats.failed_flushes == 0 and not _replaced(caplog)
    assert store.query(
        "SELECT request_id, status, model, total_tokens, error, finished_at IS NOT NULL, "
        "duration_ms, last_seq FROM requests ORDER BY request_id") == [
        ("r1", "completed", None, None, None, True, 2000, 9),
        ("r2", "running", None, None, None, False, None, None)]
    assert store.query("SELECT content, status, epoch(created_at) FROM messages") == [
        ("Hello", "complete", T0 + 1)]
    assert store.query("SELECT status, ok, result->>'text', duration_ms FROM tool_executions"
                       ) == [("ok", True, "hi", 3)]


async def test_a_key_the_file_holds_from_another_store_is_replaced_not_duplicated(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A new process's store does not know the keys its file holds (recovery re-puts the
    # rows of interrupted turns): the append is refused by the key, and the batch goes in
    # again with upserts, its events kept.
    with EventStore(path, flush_interval_ms=60_000) as first:
        first.put_request(request())
        first.put_message(message("r1", 0, "user", "hi"))
        await first.flush()
    with EventStore(path, flush_interval_ms=60_000) as second:
        second.put_request(request(status="interrupted"))
        second.put_message(message("r1", 0, "user", "hi again"))
        second.append_event(text(1), agent="assistant", depth=0)
        await second.flush()
        assert _replaced(caplog) and second.stats.failed_flushes == 0
        assert second.query("SELECT status FROM requests") == [("interrupted",)]
        assert second.query("SELECT content FROM messages") == [("hi again",)]
        assert count(second) == 1
        caplog.clear()
        second.put_request(request(status="completed"))  # now known: updated in place
        await second.flush()
        assert not _replaced(caplog)
        assert second.query("SELECT status FROM requests") == [("completed",)]


async def test_a_known_key_missing_from_the_file_is_written_not_lost(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Should the store believe it wrote a row the file does not hold, its UPDATE finds
    # fewer rows than it updates: the batch goes in with upserts, the row is not lost.
    store._written["requests"]["r1"] = None
    store.put_request(request(status="completed"))
    await store.flush()
    assert _replaced(caplog)
    assert store.query("SELECT status FROM requests") == [("completed",)]


async def test_the_store_forgets_its_oldest_keys_and_still_writes_them_right(
    store: EventStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store_module, "_WRITTEN_KEYS_MAX", 2)
    for request_id in ("r1", "r2", "r3"):
        store.put_request(request(request_id))
        await store.flush()
    assert list(store._written["requests"]) == ["r2", "r3"]
    store.put_request(request("r1", status="completed"))  # forgotten: appended, refused
    await store.flush()
    assert _replaced(caplog)
    assert store.query("SELECT request_id, status FROM requests ORDER BY 1") == [
        ("r1", "completed"), ("r2", "running"), ("r3", "running")]


async def test_many_known_rows_in_one_batch_are_all_updated(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    # More known rows than one UPDATE statement takes go through an upsert appender.
    n = store_module._UPDATE_MAX_ROWS + 6
    for i in range(n):
        store.put_request(request(f"r{i}"))
    await store.flush()
    for i in range(n):
        store.put_request(request(f"r{i}", status="completed", total_tokens=i))
    await store.flush()
    assert not _replaced(caplog) and store.stats.failed_flushes == 0
    assert store.query("SELECT count(*), sum(total_tokens) FROM requests "
                       "WHERE status = 'completed'") == [(n, n * (n - 1) // 2)]
    assert count(store, "requests") == n


async def test_put_takes_a_copy_of_the_row(store: EventStore) -> None:
    row = request()
    store.put_request(row)
    row.status = "completed"  # mutated after queueing: the queued state must not change
    await store.flush()
    assert store.query("SELECT status FROM requests") == [("running",)]


async def test_duplicate_event_key_across_batches_keeps_the_rest(store: EventStore) -> None:
    store.append_event(text(1, "a"), agent="assistant", depth=0)
    store.append_event(text(2, "b"), agent="assistant", depth=0)
    await store.flush()

    store.append_event(text(2, "DUPLICATE"), agent="assistant", depth=0)
    store.append_event(text(3, "c"), agent="assistant", depth=0)
    store.append_event(text(4, "d"), agent="assistant", depth=0)
    store.put_request(request(status="completed"))
    await store.flush()

    rows = store.query("SELECT seq, data->>'delta' FROM events ORDER BY seq")
    assert rows == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]  # the stored one is kept
    assert store.query("SELECT status FROM requests") == [("completed",)]
    assert store.stats.failed_flushes == 0


async def test_duplicate_event_key_within_one_batch_keeps_the_rest(store: EventStore) -> None:
    store.append_event(text(1, "a"), agent="assistant", depth=0)
    store.append_event(text(1, "again"), agent="assistant", depth=0)
    store.append_event(text(2, "b"), agent="assistant", depth=0)
    store.put_message(message("r1", 0, "user", "hi"))
    await store.flush()

    assert store.query("SELECT seq FROM events ORDER BY seq") == [(1,), (2,)]
    assert count(store, "messages") == 1
    assert store.stats.failed_flushes == 0


# -- lifecycle ------------------------------------------------------------------------------


async def test_close_writes_everything_queued(path: Path) -> None:
    store = EventStore(path).open()  # defaults: 250 ms, 2048 rows
    for seq in range(1, 5001):
        store.append_event(text(seq), agent="assistant", depth=0)
    store.close()
    store.close()  # idempotent

    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*), max(seq) FROM events").fetchall() == [(5000, 5000)]
    finally:
        con.close()


async def test_writes_after_close_raise_store_error(path: Path) -> None:
    store = EventStore(path).open()
    store.close()
    with pytest.raises(StoreError):
        store.append_event(text(1), agent=None, depth=None)
    with pytest.raises(StoreError):
        store.put_request(request())
    with pytest.raises(StoreError):
        store.put_message(message("r1", 0, "user", "hi"))
    with pytest.raises(StoreError):
        await store.flush()
    with pytest.raises(StoreError):
        store.query("SELECT 1")


async def test_writes_before_open_raise_store_error(path: Path) -> None:
    with pytest.raises(StoreError):
        EventStore(path).append_event(text(1), agent=None, depth=None)


# -- failures -------------------------------------------------------------------------------


async def test_writer_survives_a_failing_batch(store: EventStore) -> None:
    store.put_request(request("bad", conversation_id=None))  # NOT NULL violated
    with pytest.raises(StoreError):  # its request's barrier hears of the dead letter
        await store.flush(request_id="bad")
    assert store.stats.failed_flushes == 1 and store.stats.dead_letters == 1
    assert store.stats.last_error

    store.append_event(text(1), agent="assistant", depth=0)
    store.put_request(request("good"))
    await store.flush()
    assert count(store) == 1
    assert store.query("SELECT request_id FROM requests") == [("good",)]
    assert store.stats.failed_flushes == 1


async def test_writer_survives_a_failing_batch_without_flush(path: Path) -> None:
    store = EventStore(path, flush_interval_ms=20, flush_max_rows=10_000).open()
    try:
        store.put_request(request("bad", conversation_id=None))
        assert await poll(lambda: store.stats.failed_flushes == 1)
        store.append_event(text(1), agent="assistant", depth=0)
        assert await poll(lambda: count(store) == 1), "the writer stopped after a failure"
    finally:
        store.close()


async def test_a_failed_sub_batch_is_split_and_its_bad_row_kept_aside(path: Path) -> None:
    store = EventStore(path, flush_interval_ms=60_000, flush_max_rows=2).open()
    try:
        bad = text(1)
        bad.request_id = None  # type: ignore[assignment]  # NOT NULL violated
        store.append_event(bad, agent=None, depth=None)
        store.append_event(text(2), agent=None, depth=None)  # same sub-batch: kept (split)
        store.append_event(text(3), agent=None, depth=None)  # the final batch: written
        await store.flush()  # a reader's barrier: another row's dead letter is not its failure
        assert store.stats.dead_letters == 1
        assert store.query("SELECT seq FROM events ORDER BY seq") == [(2,), (3,)]
        assert store.query("SELECT target, row_key FROM dead_letters") == [("events", "1")]
    finally:
        store.close()


# -- history --------------------------------------------------------------------------------


@pytest.fixture
async def conversation(store: EventStore) -> EventStore:
    rows = [
        # r1: a complete exchange
        message("r1", 0, "system", "be brief", created_at=T0 + 1),
        message("r1", 1, "user", "u1", created_at=T0 + 1),
        message("r1", 2, "assistant", "a1", created_at=T0 + 1),
        # r2: the assistant produced nothing
        message("r2", 0, "user", "u2", created_at=T0 + 2),
        message("r2", 1, "assistant", "", status="complete", created_at=T0 + 2),
        # r3: the assistant failed half way
        message("r3", 0, "user", "u3", created_at=T0 + 3),
        message("r3", 1, "assistant", "half", status="error", created_at=T0 + 3),
        # r4: still pending / streaming
        message("r4", 0, "user", "u4", created_at=T0 + 4),
        message("r4", 1, "assistant", "p", status="pending", created_at=T0 + 4),
        # r5: cancelled with some text (kept: the user saw it)
        message("r5", 0, "user", "u5", created_at=T0 + 5),
        message("r5", 1, "assistant", "a5", status="cancelled", created_at=T0 + 5),
        # r6: the turn asking
        message("r6", 0, "user", "u6", created_at=T0 + 6),
        message("r6", 1, "assistant", "", status="pending", created_at=T0 + 6),
        # another conversation
        message("x1", 0, "user", "other", created_at=T0 + 2, conversation_id="c2"),
    ]
    # Inserted out of order: the query orders them.
    for row in reversed(rows):
        store.put_message(row)
    await store.flush()
    return store


async def test_load_history_order_and_filters(conversation: EventStore) -> None:
    history = await conversation.load_history("c1", limit=100, exclude_request_id="r6")
    assert history == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "user", "content": "u3"},
        {"role": "user", "content": "u4"},
        {"role": "user", "content": "u5"},
        {"role": "assistant", "content": "a5"},
    ]


async def test_load_history_without_exclusion(conversation: EventStore) -> None:
    history = await conversation.load_history("c1", limit=100)
    assert history[-1] == {"role": "user", "content": "u6"}
    assert await conversation.load_history("c2", limit=100) == [
        {"role": "user", "content": "other"}
    ]
    assert await conversation.load_history("nope", limit=100) == []


async def test_load_history_limit_keeps_the_latest_oldest_first(conversation: EventStore) -> None:
    history = await conversation.load_history("c1", limit=3, exclude_request_id="r6")
    assert history == [
        {"role": "user", "content": "u4"},
        {"role": "user", "content": "u5"},
        {"role": "assistant", "content": "a5"},
    ]


async def test_load_history_sees_unflushed_writes(store: EventStore) -> None:
    store.put_message(message("r1", 0, "user", "queued", created_at=T0))
    # No flush: load_history is itself a barrier.
    assert await store.load_history("c1", limit=10) == [{"role": "user", "content": "queued"}]


async def test_close_writes_what_was_queued_after_the_writer_stopped(tmp_path: Path) -> None:
    """An append that races close (after the writer's last drain) is written, not lost."""
    path = tmp_path / "late.duckdb"
    store = EventStore(path, flush_interval_ms=60_000).open()
    writer = store._thread
    assert writer is not None
    store._stopping = True  # the writer drains once more and exits ...
    store._wake.set()
    writer.join()
    late = Text(stream_id=1, delta="late")  # ... and then this arrives
    late.seq, late.request_id = 1, "req_late"
    store._ops.append(_EventRow(late, "a", 0))
    store.close()
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT request_id, seq FROM events").fetchall() == [("req_late", 1)]


async def test_a_file_whose_event_columns_are_in_another_order_is_written_by_name(path: Path) -> None:
    # Events go in by position on the fast path; a file made with the columns in another
    # order (another tool, an older layout) must still get each value in its own column.
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE events (data JSON NOT NULL, seq BIGINT NOT NULL,
        request_id VARCHAR NOT NULL, ts TIMESTAMP NOT NULL, type VARCHAR NOT NULL,
        stream_id INTEGER, agent VARCHAR, depth INTEGER, visibility VARCHAR NOT NULL,
        PRIMARY KEY (request_id, seq))""")
    con.close()
    store = EventStore(path).open()
    try:
        assert not store._events_by_position  # the path under test
        store.append_event(text(1, "hello"), agent="a", depth=0)
        await store.flush()
        rows = store.query("SELECT request_id, seq, type, agent, data->>'delta' FROM events")
        assert rows == [("r1", 1, "text", "a", "hello")]
    finally:
        store.close()


async def test_events_inserted_by_position_land_in_their_columns(store: EventStore) -> None:
    store.append_event(text(7, "hi", request_id="r9"), agent="planner", depth=2)
    await store.flush()
    assert store.query("SELECT request_id, seq, type, stream_id, agent, depth, visibility, "
                       "data->>'delta' FROM events") == [
        ("r9", 7, "text", 1, "planner", 2, "public", "hi")]


def test_the_store_runs_duckdb_on_the_threads_it_is_given(tmp_path: Path) -> None:
    """``STORE_THREADS`` (default 1, issue 12) reaches DuckDB; 0 leaves DuckDB's default
    (one per core), whatever the setting's default is."""
    from core.config import Settings

    assert Settings().store_threads == 1
    default = EventStore.from_settings(Settings(db_path=tmp_path / "a.duckdb")).open()
    try:
        assert default.query("SELECT current_setting('threads')") == [(1,)]
    finally:
        default.close()
    native = EventStore(tmp_path / "b.duckdb", threads=0).open()
    try:
        plain = duckdb.connect()
        try:
            expected = plain.execute("SELECT current_setting('threads')").fetchall()
        finally:
            plain.close()
        assert native.query("SELECT current_setting('threads')") == expected
    finally:
        native.close()


async def test_a_barrier_that_does_not_wake_the_writer_settles_with_the_next_write(
        store: EventStore) -> None:
    """``flush(wake=False)`` (the recorder's commit of a finished turn) forces no write of
    its own: it waits for the next one (here another barrier's), and then it is settled
    with everything queued before it on disk."""
    store.append_event(text(1), agent="assistant", depth=0)
    lazy = asyncio.ensure_future(store.flush(wake=False))
    await asyncio.sleep(0.3)  # the writer's interval is a minute: nothing is written
    assert not lazy.done() and count(store) == 0 and store.stats.flushes == 0
    store.append_event(text(2), agent="assistant", depth=0)
    await store.flush()
    await asyncio.wait_for(lazy, 2.0)
    assert count(store) == 2 and store.stats.flushes == 1

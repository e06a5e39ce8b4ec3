"""Analysts' ways in: the read-only query guard, the views, the Parquet lake, HTTP, CLI, report.

The views are checked against synthetic turns (``tests/analytics_data.py``) whose expected
figures are computed here from the turns themselves. The end-to-end test runs the real
``server.py`` and a separate ``duckdb`` process that reads the lake while the server keeps
writing.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server
from api.analytics import ANALYTICS, PARQUET_TYPE, Analytics, add_analytics_routes
from core.config import Settings
from pipeline.cli import main as cli_main
from sinks.lake import STATE_FILE, export_lake, lake_views_sql, list_lake
from sinks.query import (
    QueryError,
    QueryRefusedError,
    QueryTimeoutError,
    harden,
    json_safe,
    run_query,
)
from sinks.store import SCHEMA, EventStore
from sinks.views import VIEWS, create_views
from tests.analytics_data import DAY1, TurnBuilder, create_store_views, record, synthetic_turns
from tests.procs import free_port
from tests.test_docs import sql_blocks

ROOT = Path(__file__).resolve().parents[1]
ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


def lake_blocks() -> list[str]:
    """The docs' ```sql lake blocks: queries over the exported Parquet files."""
    return re.findall(r"```sql lake\n(.*?)```", (ROOT / "docs" / "analysts.md").read_text(), flags=re.S)


# -- the guard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[duckdb.DuckDBPyConnection, Path]]:
    folder = tmp_path_factory.mktemp("guard")
    con = duckdb.connect(str(folder / "events.duckdb"))
    con.execute(SCHEMA)
    create_views(con)
    con.execute("INSERT INTO events VALUES ('r1', 1, TIMESTAMP '2026-03-01 09:00:00', 'text', 1, "
                "'assistant', 0, 'public', '{\"delta\": \"hi\"}')")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    yield con, folder
    con.close()


REFUSED = [
    ("INSERT INTO events SELECT * FROM events", "INSERT statement: it writes"),
    ("UPDATE events SET type = 'x'", "UPDATE statement: it writes"),
    ("DELETE FROM events", "DELETE statement: it writes"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statement: it changes the schema"),
    ("CREATE VIEW v AS SELECT 1", "CREATE statement"),
    ("DROP TABLE events", "DROP statement"),
    ("ALTER TABLE events ADD COLUMN x INT", "ALTER statement"),
    ("ATTACH '{dir}/other.duckdb' AS other", "ATTACH statement"),
    ("DETACH memory", "DETACH statement"),
    ("COPY events TO '{dir}/out.csv'", "COPY statement: it copies data to or from files"),
    ("COPY events FROM '{dir}/data.csv'", "COPY statement"),
    ("EXPORT DATABASE '{dir}/dump'", "EXPORT statement: it writes files"),
    ("INSTALL httpfs", "LOAD statement: it installs or loads an extension"),
    ("LOAD httpfs", "LOAD statement"),
    ("SET threads = 1", "SET statement: it changes settings"),
    ("RESET threads", "SET statement"),
    ("SET VARIABLE x = 1", "SET statement"),
    ("USE memory", "SET statement"),
    ("PRAGMA enable_profiling", "PRAGMA statement"),
    ("PRAGMA table_info('events')", "pragma_table_info"),
    ("CALL checkpoint()", "CALL statement"),
    ("CHECKPOINT", "CALL statement"),
    ("VACUUM", "VACUUM statement"),
    ("BEGIN TRANSACTION", "TRANSACTION statement"),
    ("PREPARE p AS SELECT 1", "PREPARE statement"),
    ("SELECT 1; DROP TABLE events", "2 statements (SELECT, DROP)"),
    ("WITH gone AS (DELETE FROM events RETURNING *) SELECT * FROM gone", "a DELETE inside the query"),
    ("WITH x AS (INSERT INTO events SELECT * FROM events RETURNING *) SELECT * FROM x", "INSERT inside"),
    ("WITH x AS (UPDATE events SET type = 'x' RETURNING *) SELECT * FROM x", "UPDATE inside"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv(): it reads files"),
    ("SELECT * FROM read_csv_auto('{dir}/data.csv')", "read_csv_auto(): it reads files"),
    ("SELECT * FROM read_parquet('{dir}/*.parquet')", "read_parquet(): it reads files"),
    ("SELECT * FROM read_json('/etc/hosts')", "read_json(): it reads files"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text(): it reads files"),
    ("SELECT * FROM read_blob('/etc/passwd')", "read_blob()"),
    ("SELECT * FROM glob('/etc/*')", "glob(): it reads files"),
    ("SELECT * FROM sniff_csv('{dir}/data.csv')", "sniff_csv()"),
    ("SELECT * FROM '/etc/passwd'", "reading '/etc/passwd': it names a file"),
    ("SELECT * FROM '{dir}/data.csv'", "it names a file or URL"),
    ("SELECT * FROM 'https://example.com/x.parquet'", "it names a file or URL"),
    ("DESCRIBE '/etc/passwd'", "it names a file"),
    ("SUMMARIZE '/etc/passwd'", "it names a file"),
    ("SELECT * FROM events, (SELECT * FROM read_csv('/etc/passwd'))", "read_csv()"),
    ("SELECT (SELECT count(*) FROM glob('/*'))", "glob()"),
    ("SELECT * FROM query('SELECT 1')", "query(): it runs SQL from a string"),
    ("SELECT * FROM query_table('events')", "query_table()"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets()"),
    ("SELECT * FROM checkpoint()", "checkpoint(): it writes the store"),
    ("SELECT nextval('s')", "nextval(): it advances a sequence"),
    ("SELECT sleep_ms(10000)", "sleep_ms()"),
    ("SELECT st_point(1, 2)", "is not loaded, and queries do not install or load extensions"),
    ("SELECT * FROM secret_table", "'secret_table': it is not a table or view of the store"),
    ("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x), x", "'x': it is not a table"),
    ("EXPLAIN COPY events TO 'x.csv'", "EXPLAIN COPY"),
    ("EXPLAIN SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
    ("PIVOT events ON type", "MULTI statement"),
]


@pytest.mark.parametrize(("sql", "message"), REFUSED, ids=[sql[:48] for sql, _ in REFUSED])
def test_refused(guarded: tuple[duckdb.DuckDBPyConnection, Path], sql: str, message: str) -> None:
    con, folder = guarded
    sql = sql.replace("{dir}", str(folder))
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(QueryRefusedError) as refused:
        run_query(con, sql)
    assert message in str(refused.value)
    assert str(refused.value).startswith("refused ")
    # Nothing happened: no file appeared, the store is whole, no setting changed.
    assert sorted(p.name for p in folder.iterdir()) == before
    assert con.execute("SELECT count(*) FROM events").fetchall() == [(1,)]
    assert con.execute("SELECT current_setting('threads')").fetchall()[0][0] > 0
    assert [r[0] for r in con.execute("SELECT database_name FROM duckdb_databases() "
                                      "WHERE NOT internal").fetchall()] == ["events"]


ALLOWED = [
    ("SELECT 1 AS one", [[1]]),
    ("SELECT 1 AS one;", [[1]]),
    ("SELECT 1 AS one -- a trailing comment", [[1]]),
    ("FROM events SELECT request_id, seq", [["r1", 1]]),
    ("SELECT data->>'delta' AS delta FROM events", [["hi"]]),
    ("SELECT count(*) FROM main.events", [[1]]),
    ("SELECT count(*) FROM events.main.events", [[1]]),
    ("WITH x AS (SELECT 2 AS n) SELECT n FROM x", [[2]]),
    ('WITH "/etc/passwd" AS (SELECT 3 AS n) SELECT n FROM "/etc/passwd"', [[3]]),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
     "SELECT sum(n) FROM r", [[6]]),
    ("SELECT count(*) FROM range(10)", [[10]]),
    ("SELECT count(*) FROM generate_series(1, 5)", [[5]]),
    ("SELECT unnest([1, 2]) AS x", [[1], [2]]),
    ("SELECT row_number() OVER (ORDER BY seq) AS n, list_transform([1], lambda x: x + 1) AS l "
     "FROM events", [[1, [2]]]),
    ("SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 2", [[1]]),
    ("SELECT count(*) FROM (DESCRIBE events)", [[9]]),
    ("SELECT column_name FROM (DESCRIBE requests) WHERE column_name = 'model'", [["model"]]),
    ("SELECT count(*) > 0 FROM (SUMMARIZE events)", [[True]]),
    ("SELECT name FROM (SHOW TABLES) WHERE name = 'events'", [["events"]]),
    ("SELECT name FROM pragma_table_info('events') WHERE name = 'seq'", [["seq"]]),
    ("SELECT count(*) FROM duckdb_views() WHERE view_name = 'tool_stats'", [[1]]),
    ("SELECT count(*) FROM information_schema.tables WHERE table_name = 'events'", [[1]]),
    ("SELECT count(*) FROM request_latency", [[1]]),
    ("SELECT key FROM json_each('{\"a\": 1}')", [["a"]]),
    ("SELECT current_setting('threads') > 0", [[True]]),
]


@pytest.mark.parametrize(("sql", "rows"), ALLOWED, ids=[sql[:48] for sql, _ in ALLOWED])
def test_allowed(guarded: tuple[duckdb.DuckDBPyConnection, Path], sql: str, rows: list[list[Any]]) -> None:
    con, _folder = guarded
    result = run_query(con, sql)
    assert result.to_json()["rows"] == rows
    assert result.truncated is False


def test_explain_and_describe_run(guarded: tuple[duckdb.DuckDBPyConnection, Path]) -> None:
    con, _folder = guarded
    assert run_query(con, "EXPLAIN SELECT count(*) FROM events").columns == ["explain_key", "explain_value"]
    assert run_query(con, "EXPLAIN ANALYZE SELECT count(*) FROM events").rows
    assert [r[0] for r in run_query(con, "DESCRIBE events").rows][:2] == ["request_id", "seq"]
    assert len(run_query(con, "SUMMARIZE events").rows) == 9
    assert ("events",) in [tuple(r) for r in run_query(con, "SHOW TABLES").rows]


def test_errors_that_are_not_refusals(guarded: tuple[duckdb.DuckDBPyConnection, Path]) -> None:
    con, _folder = guarded
    for sql, fragment in (("", "empty"), ("SELEC 1", "cannot parse"),
                          ("SELECT nope FROM events", "nope"), ("  ;  ", "no statement")):
        with pytest.raises(QueryError) as error:
            run_query(con, sql)
        assert not isinstance(error.value, QueryRefusedError)
        assert fragment in str(error.value)


def test_row_limit_truncates_and_says_so(guarded: tuple[duckdb.DuckDBPyConnection, Path]) -> None:
    con, _folder = guarded
    cut = run_query(con, "SELECT range AS n FROM range(25) ORDER BY n", max_rows=10)
    assert [r[0] for r in cut.rows] == list(range(10)) and cut.truncated is True
    assert cut.to_json()["row_count"] == 10 and cut.to_json()["truncated"] is True
    whole = run_query(con, "SELECT range AS n FROM range(25)", max_rows=25)
    assert len(whole.rows) == 25 and whole.truncated is False
    # The limit goes into the plan: a huge scan stops at once instead of materialising.
    started = time.perf_counter()
    big = run_query(con, "SELECT * FROM range(10000000000)", max_rows=5, timeout_s=5)
    assert big.truncated and time.perf_counter() - started < 2


def test_timeout_interrupts_a_slow_query(guarded: tuple[duckdb.DuckDBPyConnection, Path]) -> None:
    con, _folder = guarded
    started = time.perf_counter()
    with pytest.raises(QueryTimeoutError) as slow:
        run_query(con, "SELECT count(*) FROM range(100000) a, range(100000) b, range(1000) c",
                  timeout_s=0.3)
    assert time.perf_counter() - started < 3
    assert "0.3s" in str(slow.value) and "QUERY_TIMEOUT_S" in str(slow.value)
    assert run_query(con, "SELECT 42").rows == [(42,)]  # the database is fine afterwards


def test_values_come_out_json_safe(guarded: tuple[duckdb.DuckDBPyConnection, Path]) -> None:
    con, _folder = guarded
    result = run_query(con, """
        SELECT TIMESTAMP '2026-03-01 09:00:00.5' AS ts, DATE '2026-03-01' AS day, 1.25 AS dec,
               12345678901234567890::HUGEINT AS huge, INTERVAL 90 SECOND AS span,
               '\\x01\\xff'::BLOB AS raw, 'nan'::DOUBLE AS nan, {'a': [1, 2]} AS nested,
               MAP {'k': 1} AS kv, '0b1c8a8e-8e44-4a6a-bd0f-9b1e5e7b9e51'::UUID AS id,
               NULL AS nothing, '{"x": 1}'::JSON AS doc""")
    row = dict(zip(result.columns, result.to_json()["rows"][0], strict=True))
    assert row == {
        "ts": "2026-03-01T09:00:00.500000", "day": "2026-03-01", "dec": 1.25,
        "huge": 12345678901234567890, "span": 90.0, "raw": "Af8=", "nan": None,
        "nested": {"a": [1, 2]}, "kv": {"k": 1}, "id": "0b1c8a8e-8e44-4a6a-bd0f-9b1e5e7b9e51",
        "nothing": None, "doc": '{"x": 1}',
    }
    json.dumps(result.to_json(), allow_nan=False)
    csv_text = result.to_csv()
    assert csv_text.splitlines()[0] == ",".join(result.columns)
    assert '"{""a"":[1,2]}"' in csv_text
    assert json_safe(dt.time(1, 2)) == "01:02:00"
    [[stamp]] = run_query(con, "SELECT TIMESTAMPTZ '2026-03-01 09:00:00+00' AS t").to_json()["rows"]
    assert dt.datetime.fromisoformat(stamp) == dt.datetime(2026, 3, 1, 9, tzinfo=dt.UTC)


def test_harden_switches_duckdb_guards_on_and_keeps_the_store_working(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=10).open()
        try:
            con = duckdb.connect(store.path)  # the store's database instance
            harden(con)
            with pytest.raises(duckdb.PermissionException):
                con.execute("SELECT * FROM read_csv('/etc/passwd')").fetchall()
            with pytest.raises(duckdb.Error):
                con.execute("SET enable_external_access = true")
            create_views(con)
            turns = synthetic_turns()
            await record(store, turns)  # bulk Arrow inserts still work
            assert store.stats.failed_flushes == 0
            report = export_lake(con, tmp_path / "lake", settle_s=0)  # pyarrow writes the files
            assert report.rows["events"] == sum(len(t.records) for t in turns if t.finished)
            con.close()
        finally:
            store.close()

    asyncio.run(scenario())


# -- the views --------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=20).open()
    create_store_views(store)
    yield store
    store.close()


@pytest.fixture
async def turns(store: EventStore) -> list[TurnBuilder]:
    turns = synthetic_turns()
    await record(store, turns)
    return turns


def view(store: EventStore, sql: str) -> list[dict[str, Any]]:
    con = duckdb.connect(store.path)
    try:
        result = run_query(con, sql)
    finally:
        con.close()
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def ms(seconds: float) -> Any:
    return pytest.approx(seconds * 1000, abs=0.002)  # stored timestamps have microseconds


async def test_request_latency(store: EventStore, turns: list[TurnBuilder]) -> None:
    rows = {r["request_id"]: r for r in view(store, "SELECT * FROM request_latency")}
    assert set(rows) == {t.request_id for t in turns}
    for turn in turns:
        row = rows[turn.request_id]
        texts = turn.of_type("text")
        assert row["first_token_ms"] == ms(texts[0].ts - turn.start)
        done = turn.of_type("done")
        assert row["duration_ms"] == (done[0].event.duration_ms if done else None)
        assert row["status"] == turn.status
        assert row["text_events"] == len(texts)
        assert row["errors"] == len(turn.of_type("turn_error"))
        assert row["events"] == len(turn.records)
        assert row["model"] == turn.model and row["conversation_id"] == turn.conversation_id


async def test_tokens_by_model_and_day(store: EventStore, turns: list[TurnBuilder]) -> None:
    expected: dict[tuple[str, dt.date], dict[str, Any]] = {}
    for turn in turns:
        for r in turn.of_type("token_usage"):
            day = dt.datetime.fromtimestamp(r.ts, dt.UTC).date()
            e = expected.setdefault((r.event.model, day), {
                "requests": set(), "model_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "total_tokens": 0})
            e["requests"].add(turn.request_id)
            e["model_calls"] += 1
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                e[key] += getattr(r.event, key)
    rows = view(store, "SELECT * FROM tokens_by_model_day")
    got = {(r["model"], r["day"]): r for r in rows}
    assert set(got) == set(expected) and len({day for _, day in got}) == 2
    for key, e in expected.items():
        assert got[key] == {"model": key[0], "day": key[1], **e, "requests": len(e["requests"])}


async def test_tool_stats(store: EventStore, turns: list[TurnBuilder]) -> None:
    calls: dict[str, list[Any]] = collections.defaultdict(list)
    results = {r.event.execution_id: r.event for t in turns for r in t.of_type("tool_result")}
    for turn in turns:
        for r in turn.of_type("tool_call"):
            calls[r.event.tool].append(results.get(r.event.execution_id))
    rows = {r["tool"]: r for r in view(store, "SELECT * FROM tool_stats")}
    assert set(rows) == set(calls)
    for tool, outcomes in calls.items():
        answered = [o for o in outcomes if o is not None]
        failed = sum(1 for o in answered if not o.ok)
        row = rows[tool]
        assert (row["calls"], row["results"], row["failed"], row["succeeded"], row["unanswered"]) == (
            len(outcomes), len(answered), failed, len(answered) - failed, len(outcomes) - len(answered))
        assert row["failure_rate"] == (pytest.approx(failed / len(answered)) if answered else None)
        durations = [o.duration_ms for o in answered]
        assert row["avg_duration_ms"] == (pytest.approx(sum(durations) / len(durations))
                                          if durations else None)
    executions = view(store, "SELECT * FROM tool_calls WHERE ok IS NOT NULL")
    assert {r["execution_id"] for r in executions} == set(results)


async def test_conversation_stats(store: EventStore, turns: list[TurnBuilder]) -> None:
    rows = {r["conversation_id"]: r for r in view(store, "SELECT * FROM conversation_stats")}
    by_conversation: dict[str, list[TurnBuilder]] = collections.defaultdict(list)
    for turn in turns:
        by_conversation[turn.conversation_id].append(turn)
    assert set(rows) == set(by_conversation)
    for conversation, its in by_conversation.items():
        row = rows[conversation]
        assert row["turns"] == len(its)
        assert row["completed_turns"] == sum(t.status == "completed" for t in its)
        assert row["failed_turns"] == sum(t.status == "error" for t in its)
        assert row["messages"] == 2 * len(its)  # each turn stored its user and assistant message
        assert row["user_messages"] == row["assistant_messages"] == len(its)
        assert row["completion_tokens"] == sum(
            r.event.completion_tokens for t in its if t.finished for r in t.of_type("token_usage"))
        first = dt.datetime.fromtimestamp(min(t.start for t in its), dt.UTC).replace(tzinfo=None)
        assert row["first_at"] == first


async def test_panelist_share_and_time_to_first_token(store: EventStore, turns: list[TurnBuilder]) -> None:
    [roundtable] = [t for t in turns if any(r.depth for r in t.records)]
    starts = {r.event.stream_id: r for r in roundtable.of_type("stream_start") if r.event.depth >= 1}
    chars: dict[str, int] = collections.Counter()
    first_text: dict[int, float] = {}
    for r in roundtable.of_type("text"):
        if r.event.stream_id in starts:
            chars[starts[r.event.stream_id].event.agent] += len(r.event.delta)
            first_text.setdefault(r.event.stream_id, r.ts)
    total = sum(chars.values())
    rows = {r["agent"]: r for r in view(store, "SELECT * FROM panelist_stats")}
    assert set(rows) == set(chars) == {"alice", "bob", "carol"}  # the moderator (depth 0) is not one
    assert sum(r["share_of_talk"] for r in rows.values()) == pytest.approx(1.0)
    for agent, row in rows.items():
        streams = sorted((s for s in starts.values() if s.event.agent == agent), key=lambda s: s.ts)
        assert row["request_id"] == roundtable.request_id
        assert row["streams"] == len(streams)
        assert row["chars"] == chars[agent]
        assert row["share_of_talk"] == pytest.approx(chars[agent] / total)
        first = streams[0]
        assert row["first_token_ms"] == ms(first_text[first.event.stream_id] - first.ts)
        ttfts = [first_text[s.event.stream_id] - s.ts for s in streams]
        assert row["avg_first_token_ms"] == ms(sum(ttfts) / len(ttfts))
        assert row["completion_tokens"] == sum(
            r.event.completion_tokens for r in roundtable.of_type("token_usage")
            if r.event.stream_id in {s.event.stream_id for s in streams})


async def test_views_are_idempotent_and_documented(store: EventStore) -> None:
    create_store_views(store)  # again: CREATE OR REPLACE
    names = {r["view_name"] for r in view(store, "SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert names == set(VIEWS)
    docs = (ROOT / "docs" / "analysts.md").read_text()
    for name in VIEWS:
        assert f"`{name}`" in docs, f"view {name} is not documented"


# -- the lake -----------------------------------------------------------------------------------


def lake_keys(lake: Path) -> list[tuple[str, int]]:
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT request_id, seq FROM read_parquet('{lake}/events/*/*.parquet', hive_partitioning = true)"
    ).fetchall()
    con.close()
    return sorted(rows)


async def test_export_is_partitioned_incremental_and_exactly_once(
        store: EventStore, turns: list[TurnBuilder], tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    con = duckdb.connect(store.path)
    try:
        first = export_lake(con, lake, settle_s=0)
        closed = [t for t in turns if t.finished]
        assert first.requests == len(closed)
        assert first.rows == {"events": sum(len(t.records) for t in closed), "tool_executions": 0,
                              "requests": len(closed), "messages": 2 * len(closed)}
        dates = {dt.datetime.fromtimestamp(r.ts, dt.UTC).date().isoformat()
                 for t in closed for r in t.records}
        assert {f.date for f in first.files if f.table == "events"} == dates
        for f in first.files:
            assert re.fullmatch(rf"{f.table}/date={f.date}/part-\d{{17}}\.parquet", f.path)
            assert pq.read_metadata(lake / f.path).num_rows == f.rows
        assert not list(lake.rglob("*.tmp")) and not list(lake.rglob(".*"))

        again = export_lake(con, lake, settle_s=0)
        assert again.files == [] and again.requests == 0

        # The running turn finishes (stamped long before the runs so far): the next run
        # exports it, and only it.
        [running] = [t for t in turns if not t.finished]
        known = len(running.records)
        running.text(0.5, 1, " done").end(0.6, 1).done(0.7)
        for r in running.records[known:]:
            store.append_event(r.event, agent=r.agent, depth=r.depth)
        running.write_rows(store)
        await store.flush()
        third = export_lake(con, lake, settle_s=0)
        assert third.requests == 1 and third.rows["events"] == len(running.records)
        stored = sorted(con.execute("SELECT request_id, seq FROM events").fetchall())
        assert lake_keys(lake) == stored  # every event once, none twice
        [status] = duckdb.sql(f"SELECT status FROM read_parquet('{lake}/requests/*/*.parquet') "
                              f"WHERE request_id = '{running.request_id}'").fetchall()
        assert status == ("completed",)  # exported once final, never as 'running'
        assert sorted(f.path for f in list_lake(lake)) == sorted(f.path for f in first.files + third.files)
    finally:
        con.close()


async def test_export_waits_for_recent_requests_and_redoes_a_broken_run(
        store: EventStore, turns: list[TurnBuilder], tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    con = duckdb.connect(store.path)
    try:
        # A clock before day 2: only day 1's requests have closed by then.
        early = export_lake(con, lake, now=DAY1 + 3600)
        assert {f.date for f in early.files} == {"2025-03-01"}
        state = json.loads((lake / STATE_FILE).read_text())
        assert state["last_run"] == int((DAY1 + 3600 - 1.0) * 1_000_000)
        # A run that died after writing a file but before committing …
        orphan = lake / "events" / "date=2025-03-02" / f"part-{state['last_run'] + 5:017d}.parquet"
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(b"half a file")
        (orphan.parent / ".part-x.parquet.1.2.tmp").write_bytes(b"")
        # … is cleaned up by the next run, which writes those requests again.
        later = export_lake(con, lake, settle_s=0)
        assert not orphan.exists() and not list(lake.rglob("*.tmp"))
        assert lake_keys(lake) == sorted(
            (t.request_id, r.event.seq) for t in turns if t.finished for r in t.records)
        assert later.previous_watermark == state["watermark"]
        assert json.loads((lake / STATE_FILE).read_text())["runs"] == 2
    finally:
        con.close()


def test_lake_views_sql_runs_the_views_over_the_files(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=10).open()
        try:
            create_store_views(store)
            await record(store, synthetic_turns())
            con = duckdb.connect(store.path)
            export_lake(con, tmp_path / "data" / "lake", settle_s=0)
            expected = con.execute("SELECT * FROM tool_stats ORDER BY tool").fetchall()
            con.close()
        finally:
            store.close()
        lake_con = duckdb.connect()
        lake_con.execute(lake_views_sql(tmp_path / "data" / "lake"))
        create_views(lake_con)
        assert lake_con.execute("SELECT * FROM tool_stats ORDER BY tool").fetchall() == expected
        os.chdir(tmp_path)  # the docs' lake queries use the default lake, data/lake/
        blocks = lake_blocks()
        assert blocks
        for sql in blocks:
            assert duckdb.connect().execute(sql).fetchall(), sql

    cwd = os.getcwd()
    try:
        asyncio.run(scenario())
    finally:
        os.chdir(cwd)


# -- HTTP -------------------------------------------------------------------------------------


def analytics_app(store: EventStore, **settings: Any) -> web.Application:
    options: dict[str, Any] = {"db_path": Path(store.path), "export_interval_s": 0}
    options.update(settings)
    app = web.Application(middlewares=[server.json_errors])
    app[server.SETTINGS] = Settings(**options)
    app[ANALYTICS] = Analytics(connect=lambda: duckdb.connect(store.path), flush=store.flush,
                               settings=app[server.SETTINGS])
    add_analytics_routes(app)
    return app


async def test_query_endpoint_formats(
        aiohttp_client: ClientFactory, store: EventStore, turns: list[TurnBuilder]) -> None:
    client = await aiohttp_client(analytics_app(store))
    sql = "SELECT request_id, first_token_ms, started_at FROM request_latency ORDER BY request_id"
    resp = await client.post("/v1/query", json={"sql": sql})
    assert resp.status == 200 and resp.headers["X-Truncated"] == "false"
    body = await resp.json()
    assert body["columns"] == ["request_id", "first_token_ms", "started_at"]
    assert body["types"] == ["VARCHAR", "BIGINT", "TIMESTAMP"]  # whole milliseconds
    assert [r[0] for r in body["rows"]] == sorted(t.request_id for t in turns)
    assert body["truncated"] is False and body["row_count"] == len(turns)

    resp = await client.post("/v1/query", json={"sql": sql, "format": "csv"})
    assert resp.content_type == "text/csv"
    lines = (await resp.text()).splitlines()
    assert lines[0] == "request_id,first_token_ms,started_at" and len(lines) == len(turns) + 1

    resp = await client.post("/v1/query", json={"sql": sql}, headers={"Accept": "text/csv"})
    assert resp.content_type == "text/csv"

    for ask in ({"json": {"sql": sql, "format": "parquet"}},
                {"json": {"sql": sql}, "headers": {"Accept": PARQUET_TYPE}}):
        resp = await client.post("/v1/query", **ask)  # type: ignore[arg-type]
        assert resp.status == 200 and resp.content_type == PARQUET_TYPE
        table = pq.read_table(io.BytesIO(await resp.read()))
        assert table.column_names == body["columns"]
        assert table.column("request_id").to_pylist() == [r[0] for r in body["rows"]]

    resp = await client.post("/v1/query", json={"sql": "SELECT * FROM range(100)", "max_rows": 7})
    cut = await resp.json()
    assert len(cut["rows"]) == 7 and cut["truncated"] is True and resp.headers["X-Truncated"] == "true"
    resp = await client.post("/v1/query", json={"sql": "SELECT * FROM range(100)", "format": "parquet",
                                                "max_rows": 7})
    assert pq.read_table(io.BytesIO(await resp.read())).num_rows == 7
    assert resp.headers["X-Truncated"] == "true"


async def test_query_endpoint_sees_events_not_yet_flushed(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    slow = EventStore(tmp_path / "slow.duckdb", flush_interval_ms=60_000).open()  # flushes only on demand
    try:
        create_store_views(slow)
        client = await aiohttp_client(analytics_app(slow))
        turn = synthetic_turns()[0]
        for r in turn.records:
            slow.append_event(r.event, agent=r.agent, depth=r.depth)
        resp = await client.post("/v1/query", json={"sql": "SELECT count(*) FROM events"})
        assert (await resp.json())["rows"] == [[len(turn.records)]]
    finally:
        slow.close()


async def test_query_endpoint_errors(aiohttp_client: ClientFactory, store: EventStore) -> None:
    client = await aiohttp_client(analytics_app(store, query_timeout_s=0.3, query_max_rows=50))
    cases = [
        ({"sql": "DROP TABLE events"}, 403, "query_refused", "refused DROP statement"),
        ({"sql": "SELECT * FROM read_csv('/etc/passwd')"}, 403, "query_refused", "read_csv()"),
        ({"sql": "SELECT * FROM '/etc/passwd'"}, 403, "query_refused", "'/etc/passwd'"),
        ({"sql": "SELECT nope"}, 400, "query_error", "nope"),
        ({"sql": "SELECT count(*) FROM range(100000) a, range(100000) b, range(1000) c"}, 400,
         "query_timeout", "interrupted"),
        ({"sql": ""}, 400, "invalid_body", "sql"),
        ({"sql": "SELECT 1", "format": "xml"}, 400, "invalid_body", "format"),
        ({"sql": "SELECT 1", "max_rows": 0}, 400, "invalid_body", "max_rows"),
        ({"query": "SELECT 1"}, 400, "invalid_body", "sql"),
    ]
    for body, status, code, fragment in cases:
        resp = await client.post("/v1/query", json=body)
        error = (await resp.json())["error"]
        assert (resp.status, error["code"]) == (status, code), body
        assert fragment in error["message"], (body, error)
    resp = await client.post("/v1/query", data=b"{not json")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
    # max_rows above QUERY_MAX_ROWS is capped by it.
    resp = await client.post("/v1/query", json={"sql": "SELECT * FROM range(80)", "max_rows": 70})
    assert len((await resp.json())["rows"]) == 50
    assert (await store.aquery("SELECT count(*) FROM events")) == [(0,)]


async def test_admin_key_guards_query_and_export(
        aiohttp_client: ClientFactory, store: EventStore, tmp_path: Path) -> None:
    client = await aiohttp_client(analytics_app(store, admin_key="s3cret", export_dir=tmp_path / "lake"))
    for method, path in (("POST", "/v1/query"), ("POST", "/v1/export"), ("GET", "/v1/export"),
                         ("GET", "/v1/export/files/events/x.parquet")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = await client.request(method, path, json={"sql": "SELECT 1"}, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"]["code"] == "unauthorized"
    resp = await client.post("/v1/query", json={"sql": "SELECT 1 AS one"},
                             headers={"Authorization": "Bearer s3cret"})
    assert resp.status == 200 and (await resp.json())["rows"] == [[1]]


async def test_export_endpoints(
        aiohttp_client: ClientFactory, store: EventStore, turns: list[TurnBuilder], tmp_path: Path) -> None:
    lake = tmp_path / "exported"
    client = await aiohttp_client(analytics_app(store, export_dir=lake))
    resp = await client.post("/v1/export")
    assert resp.status == 200
    report = await resp.json()
    closed = [t for t in turns if t.finished]
    assert report["requests"] == len(closed) and report["lake"] == str(lake.resolve())
    assert report["rows"]["events"] == sum(len(t.records) for t in closed)
    manifest = await (await client.get("/v1/export")).json()
    assert sorted(f["path"] for f in manifest["files"]) == sorted(f["path"] for f in report["files"])
    assert manifest["watermark"] == report["watermark"] and manifest["runs"] == 1
    first = manifest["files"][0]
    resp = await client.get(f"/v1/export/files/{first['path']}")
    assert resp.status == 200 and resp.content_type == PARQUET_TYPE
    assert pq.read_table(io.BytesIO(await resp.read())).num_rows == first["rows"]
    for bad in ("../events.duckdb", "%2e%2e/events.duckdb", "_export_state.json", "events/nothing.parquet",
                "events/date=2025-03-01/.hidden.parquet"):
        resp = await client.get(f"/v1/export/files/{bad}")
        assert resp.status == 404, bad
    assert (await (await client.post("/v1/export")).json())["files"] == []


async def test_scheduled_export(aiohttp_client: ClientFactory, store: EventStore,
                                turns: list[TurnBuilder], tmp_path: Path) -> None:
    lake = tmp_path / "scheduled"
    await aiohttp_client(analytics_app(store, export_dir=lake, export_interval_s=0.1))
    deadline = time.monotonic() + 10
    while not (lake / STATE_FILE).exists() or not list_lake(lake):
        assert time.monotonic() < deadline, "no scheduled export happened"
        await asyncio.sleep(0.05)
    # Requests close at synthetic times far in the past, so the first run takes them all.
    assert {f.table for f in list_lake(lake)} == {"events", "requests", "messages"}


# -- the command line ----------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline …`` in its own process."""
    full_env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line in this process (cheaper than a process per call)."""
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def closed_store(tmp_path: Path) -> tuple[Path, list[TurnBuilder]]:
    """A store file with the synthetic turns, closed (so other processes may open it)."""
    turns = synthetic_turns()

    async def fill() -> None:
        store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=10).open()
        try:
            await record(store, turns)  # no views: the CLI makes them itself on a read-only file
        finally:
            store.close()

    asyncio.run(fill())
    return tmp_path / "events.duckdb", turns


def test_cli_on_the_file(closed_store: tuple[Path, list[TurnBuilder]], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    db, turns = closed_store
    tools = sorted({r.event.tool for t in turns for r in t.of_type("tool_call")})
    done = cli("query", "SELECT tool, calls, failed FROM tool_stats ORDER BY tool", "--db", str(db),
               "--format", "json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["columns"] == ["tool", "calls", "failed"] and [r[0] for r in body["rows"]] == tools

    code, out, _err = run_main(capsys, "query", "SELECT request_id, status, first_token_ms FROM "
                               "request_latency ORDER BY request_id", "--db", str(db))
    assert code == 0
    lines = out.splitlines()
    assert [c.strip() for c in lines[0].split("│")] == ["request_id", "status", "first_token_ms"]
    assert lines[-1] == f"({len(turns)} rows)"
    assert sorted(line.split("│")[0].strip() for line in lines[2:-1]) == sorted(t.request_id for t in turns)

    code, out, err = run_main(capsys, "query", "SELECT * FROM range(30)", "--db", str(db),
                              "--format", "csv", "--max-rows", "4")
    assert (code, out.splitlines()) == (0, ["range", "0", "1", "2", "3"])
    assert "only the first 4 rows" in err

    code, _out, err = run_main(capsys, "query", "COPY events TO 'x.csv'", "--db", str(db))
    assert code == 1 and "refused COPY statement" in err and not (ROOT / "x.csv").exists()

    out_dir = tmp_path / "lake"
    code, out, _err = run_main(capsys, "export", "--db", str(db), "--out", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["requests"] == sum(t.finished for t in turns)
    assert lake_keys(out_dir) == sorted(
        (t.request_id, r.event.seq) for t in turns if t.finished for r in t.records)
    code, out, _err = run_main(capsys, "export", "--db", str(db), "--out", str(out_dir))
    assert code == 0 and out.startswith("exported 0 requests")


def test_cli_report_renders(closed_store: tuple[Path, list[TurnBuilder]], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    db, _turns = closed_store
    html_path, png_path = tmp_path / "report.html", tmp_path / "report.png"
    for out in (html_path, png_path):
        code, printed, err = run_main(capsys, "report", "--db", str(db), "--out", str(out))
        assert (code, printed) == (0, f"wrote {out}\n"), err
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 5  # every section had data
    for title in ("Latency", "Tokens over time", "Tools", "Roundtables"):
        assert f"<h2>{title}</h2>" in page
    assert "No data" not in page
    assert not re.search(r"(src|href)=['\"]https?:", page)  # self-contained
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("REPORT_PREVIEW"):  # to look at it: REPORT_PREVIEW=/tmp/r pytest -k report
        preview = Path(os.environ["REPORT_PREVIEW"])
        preview.mkdir(parents=True, exist_ok=True)
        for path in (html_path, png_path):
            (preview / path.name).write_bytes(path.read_bytes())


def test_report_of_an_empty_store_says_so(tmp_path: Path) -> None:
    from pipeline.report import collect, render_html, render_png

    con = duckdb.connect(str(tmp_path / "empty.duckdb"))
    con.execute(SCHEMA)
    create_views(con)
    data = collect(lambda sql: run_query(con, sql))
    page = render_html(data, source="empty")
    assert page.count("No data:") == 5 and "data:image/png" not in page
    assert render_png(data)[:4] == b"\x89PNG"
    con.close()


def test_report_charts_take_values_as_the_server_sends_them(
        closed_store: tuple[Path, list[TurnBuilder]]) -> None:
    """Through --server, timestamps arrive as ISO strings and decimals as numbers."""
    from matplotlib.figure import Figure

    from pipeline.report import CHARTS, collect
    from sinks.query import QueryResult

    db, _turns = closed_store
    con = duckdb.connect(str(db), read_only=True)
    create_views(con, temp=True)

    def over_the_wire(sql: str) -> QueryResult:
        body = json.loads(json.dumps(run_query(con, sql, fresh_cursor=False).to_json()))
        return QueryResult(columns=body["columns"], types=body["types"],
                           rows=[tuple(r) for r in body["rows"]], truncated=body["truncated"],
                           elapsed_ms=0.0)

    data = collect(over_the_wire)
    con.close()
    assert isinstance(data.tokens[0]["bucket"], str)
    for _title, draw, _empty in CHARTS:
        assert draw(Figure().add_subplot(), data)


def test_cli_on_a_file_a_server_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = EventStore(tmp_path / "events.duckdb").open()
    try:
        done = cli("query", "SELECT 1", "--db", store.path)
    finally:
        store.close()
    assert done.returncode == 2
    assert f"process {os.getpid()} holds it" in done.stderr and "--server" in done.stderr
    code, _out, err = run_main(capsys, "query", "SELECT 1", "--db", str(tmp_path / "nothing.duckdb"))
    assert code == 2 and "no event store" in err


# -- end to end: the real server, the CLI through it, and a separate reader of the lake ---------


def post(base: str, path: str, body: Any, key: str | None = None, timeout: float = 30) -> bytes:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        payload: bytes = resp.read()
        return payload


# A separate process reading a lake again and again: the counts of events it sees.
READER = """
import sys, duckdb
con = duckdb.connect()
for lake in sys.argv[2:]:
    counts = [con.execute(
        f"SELECT count(*) FROM read_parquet('{lake}/events/*/*.parquet', hive_partitioning = true)"
    ).fetchall()[0][0] for _ in range(int(sys.argv[1]))]
    print(" ".join(map(str, counts)))
"""


def read_lakes(*lakes: Path, times: int = 20) -> list[list[int]]:
    done = subprocess.run([sys.executable, "-c", READER, str(times), *map(str, lakes)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [[int(c) for c in line.split()] for line in done.stdout.splitlines()]


def test_end_to_end_with_a_running_server(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    key = "e2e-key"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(OFFLINE_TOKEN_DELAY_MS="1", ADMIN_KEY=key, EXPORT_INTERVAL_S="0.5", PYTHONUNBUFFERED="1")
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
         "--db", str(tmp_path / "events.duckdb")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)

        def turn(text: str) -> None:
            post(base, "/v1/orchestrate", {"messages": [{"role": "user", "content": text}]})

        for n in range(3):
            turn(f"question {n}")
        counted = cli("query", "SELECT count(*) AS n FROM requests WHERE status = 'completed'",
                      "--server", base, "--format", "json", env={"ADMIN_KEY": key})
        assert counted.returncode == 0, counted.stderr
        assert json.loads(counted.stdout)["rows"] == [[3]]
        code, _out, err = run_main(capsys, "query", "SELECT 1", "--server", base)
        assert code == 2 and "HTTP 401" in err  # no key
        monkeypatch.setenv("ADMIN_KEY", key)

        # Every documented query answers through the endpoint.
        for sql in sql_blocks(ROOT / "docs" / "analysts.md"):
            body = json.loads(post(base, "/v1/query", {"sql": sql}, key))
            assert body["columns"], sql

        # The first turns are in the lake once they are older than the export's settle
        # time (the schedule runs every 0.5 s): wait for that rather than for the clock.
        deadline = time.monotonic() + 30
        while not list((tmp_path / "lake").glob("events/*/*.parquet")):
            assert time.monotonic() < deadline, "the scheduled export wrote no events"
            time.sleep(0.05)
        # The server keeps writing while the CLI exports and another process reads the lake.
        stop = threading.Event()

        def keep_writing() -> None:
            n = 0
            while not stop.wait(0.02):
                turn(f"more {n}")
                n += 1

        writer = threading.Thread(target=keep_writing, daemon=True)
        writer.start()
        mirror = tmp_path / "mirror"
        try:
            exported = cli("export", "--server", base, "--out", str(mirror), "--json", env={"ADMIN_KEY": key})
            assert exported.returncode == 0, exported.stderr
            assert json.loads(exported.stdout)["copied"]["to"] == str(mirror.resolve())
            code, out, _err = run_main(capsys, "export", "--server", base, "--out", str(mirror))
            assert code == 0 and "copied" in out
            for counts in read_lakes(mirror, tmp_path / "lake"):  # the copy, and the server's lake
                assert counts[0] > 0 and counts == sorted(counts)  # whole files only, never fewer
        finally:
            stop.set()
            writer.join(timeout=30)
        time.sleep(1.2)  # past the export's settle time: every request is closed and written
        post(base, "/v1/export", {}, key)
        [[stored]] = json.loads(post(base, "/v1/query", {"sql": "SELECT count(*) FROM events"}, key))["rows"]
        assert read_lakes(tmp_path / "lake", times=1) == [[stored]]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]

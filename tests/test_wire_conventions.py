"""Browser and SSE-library conventions (issue 15), in-process: whole milliseconds on every
wire and in the store, the turn-level error event named ``turn_error``, ``retry:`` inside
the first event's block (httpx-sse), the store file's DuckDB storage version, and the
migration of store files written by the older schema."""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import httpx_sse
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from core.errors import StoreError
from core.events import EVENT_ADAPTER, TURN_ERROR, Done, ErrorEvent, Event
from sinks.sse import event_frame
from sinks.store import (
    DEFAULT_STORAGE_VERSION,
    MS_COLUMNS,
    EventStore,
    migrate,
    storage_version_of,
)
from tests.sse_client import assert_wire_rules, parse_sse, read_frames

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]

#: The store's DDL before issue 15 (``*_ms`` columns were DOUBLE), for files written then.
OLD_SCHEMA = """
CREATE TABLE events (
    request_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP NOT NULL, type VARCHAR NOT NULL,
    stream_id INTEGER, agent VARCHAR, depth INTEGER, visibility VARCHAR NOT NULL,
    data JSON NOT NULL, PRIMARY KEY (request_id, seq));
CREATE TABLE requests (
    request_id VARCHAR PRIMARY KEY, conversation_id VARCHAR NOT NULL, kind VARCHAR NOT NULL,
    status VARCHAR NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP,
    duration_ms DOUBLE, first_token_ms DOUBLE, model VARCHAR, prompt_tokens BIGINT,
    completion_tokens BIGINT, total_tokens BIGINT, trace BOOLEAN NOT NULL, last_seq BIGINT,
    error VARCHAR);
CREATE TABLE messages (
    message_id VARCHAR PRIMARY KEY, conversation_id VARCHAR NOT NULL, request_id VARCHAR NOT NULL,
    ordinal INTEGER NOT NULL, role VARCHAR NOT NULL, content VARCHAR NOT NULL,
    status VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL);
CREATE TABLE tool_executions (
    execution_id VARCHAR PRIMARY KEY, request_id VARCHAR NOT NULL, conversation_id VARCHAR NOT NULL,
    stream_id INTEGER, agent VARCHAR, tool VARCHAR NOT NULL, params JSON NOT NULL,
    status VARCHAR NOT NULL, ok BOOLEAN, result JSON, error VARCHAR, started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP, duration_ms DOUBLE);
"""

T0 = 1_790_000_000.0


def _old_event(request_id: str, seq: int, kind: str, **fields: Any) -> tuple[Any, ...]:
    data = {"request_id": request_id, "seq": seq, "ts": T0 + seq / 100, "type": kind, **fields}
    visibility = "trace" if kind in ("llm_call", "route", "memory") else "public"
    return (request_id, seq, T0 + seq / 100, kind, fields.get("stream_id"),
            "assistant" if "stream_id" in fields else None, 0 if "stream_id" in fields else None,
            visibility, json.dumps(data))


def write_old_store(path: Path) -> None:
    """A store file as the code before issue 15 wrote it: DuckDB's default (newest) storage
    version, DOUBLE milliseconds with fractions, and turn errors of type ``error``."""
    con = duckdb.connect(str(path))
    con.execute(OLD_SCHEMA)
    done_events = [
        _old_event("r_done", 1, "request_received", agent="assistant", conversation_id="c1"),
        _old_event("r_done", 2, "stream_start", stream_id=1, agent="assistant", depth=0,
                   parent_stream_id=None),
        _old_event("r_done", 3, "text", stream_id=1, delta="Hel"),
        _old_event("r_done", 4, "error", stream_id=1, error="upstream broke", retryable=True),
        _old_event("r_done", 5, "stream_end", stream_id=1, status="error", finish_reason=None),
        _old_event("r_done", 6, "done", ok=False, duration_ms=354.506, reason="error"),
    ]
    running = [
        _old_event("r_run", 1, "request_received", agent="assistant", conversation_id="c2"),
        _old_event("r_run", 2, "stream_start", stream_id=1, agent="assistant", depth=0,
                   parent_stream_id=None),
        _old_event("r_run", 3, "tool_result", stream_id=1, tool="t", execution_id="x1", ok=True,
                   data={}, error=None, duration_ms=3.4),
        _old_event("r_run", 4, "error", stream_id=1, error="a panelist failed", retryable=False),
    ]
    con.executemany("INSERT INTO events VALUES (?, ?, to_timestamp(?)::TIMESTAMP, ?, ?, ?, ?, ?, ?)",
                    done_events + running)
    con.execute("""INSERT INTO requests VALUES
        ('r_done', 'c1', 'orchestrate', 'error', to_timestamp(1790000000)::TIMESTAMP,
         to_timestamp(1790000001)::TIMESTAMP, 354.506, 12.6, 'offline', 1, 1, 2, false, 6,
         'upstream broke'),
        ('r_run', 'c2', 'orchestrate', 'running', to_timestamp(1790000000)::TIMESTAMP,
         NULL, NULL, 7.5, 'offline', NULL, NULL, NULL, false, NULL, NULL)""")
    con.execute("""INSERT INTO tool_executions VALUES ('x1', 'r_run', 'c2', 1, 'assistant', 't',
        '{}', 'ok', true, '{}', NULL, to_timestamp(1790000000)::TIMESTAMP,
        to_timestamp(1790000000)::TIMESTAMP, 3.4)""")
    con.close()


def ms_fields(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(path, value)`` of a key ending in ``_ms``, anywhere in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}"
            if key.endswith("_ms"):
                yield where, item
            yield from ms_fields(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from ms_fields(item, f"{path}[{index}]")


def assert_whole_ms(value: Any, *, at_least: int) -> list[str]:
    """Every ``*_ms`` in ``value`` is an int (or null); returns their paths."""
    found = list(ms_fields(value))
    assert len(found) >= at_least, found
    for where, item in found:
        assert item is None or (isinstance(item, int) and not isinstance(item, bool)), (where, item)
    return [where for where, _ in found]


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 1,
                               "flush_interval_ms": 20}
    return Settings(**{**options, **overrides})


# -- whole milliseconds ---------------------------------------------------------------------
async def test_every_ms_on_the_wire_and_in_the_store_is_whole(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await aiohttp_client(server.create_app(settings_for(tmp_path)))
    body = {"messages": [{"role": "user", "content": "Time this."}], "trace": True,
            "tool_calls": [{"name": "terminal.exec", "params": {"argv": ["sleep", "0.03"]}}]}
    async with client.post("/v1/orchestrate", json=body) as resp:
        assert resp.status == 200
        events = assert_wire_rules(await read_frames(resp), trace=True)
    request_id = events[0]["request_id"]
    assert_whole_ms(events, at_least=2)  # done.duration_ms, tool_result.duration_ms
    done, result = events[-1], next(e for e in events if e["type"] == "tool_result")
    assert isinstance(done["duration_ms"], int) and done["duration_ms"] >= 30, done
    assert isinstance(result["duration_ms"], int) and result["duration_ms"] >= 30, result

    replayed = await client.get(f"/v1/requests/{request_id}/events", params={"trace": "true"})
    assert assert_wire_rules(await read_frames(replayed), trace=True) == events

    status = await (await client.get(f"/v1/requests/{request_id}")).json()
    assert set(assert_whole_ms(status, at_least=2)) >= {".timings.duration_ms",
                                                        ".timings.first_token_ms"}
    assert status["timings"]["duration_ms"] == done["duration_ms"]

    store = client.app[server.STORE]
    await store.flush()
    for table, column in MS_COLUMNS:
        [(kind,)] = await store.aquery(
            "SELECT data_type FROM information_schema.columns WHERE table_name = ? "
            "AND column_name = ?", [table, column])
        assert kind == "BIGINT", (table, column)
    [(duration, first_token)] = await store.aquery(
        "SELECT duration_ms, first_token_ms FROM requests WHERE request_id = ?", [request_id])
    [(tool_ms,)] = await store.aquery(
        "SELECT duration_ms FROM tool_executions WHERE request_id = ?", [request_id])
    assert (duration, type(first_token), type(tool_ms)) == (done["duration_ms"], int, int)
    assert tool_ms == result["duration_ms"]
    [(view_duration, view_first)] = await store.aquery(
        "SELECT duration_ms, first_token_ms FROM request_latency WHERE request_id = ?", [request_id])
    assert (view_duration, type(view_first)) == (done["duration_ms"], int)

    query = await (await client.post("/v1/query", json={"sql": "SELECT 1 AS one"})).json()
    health = await (await client.get("/healthz")).json()
    assert set(assert_whole_ms([query, health], at_least=2)) == {
        "[0].elapsed_ms", "[1].store.last_flush_ms"}


def test_fractional_ms_read_back_from_an_old_store_are_rounded() -> None:
    done = EVENT_ADAPTER.validate_json(
        '{"type": "done", "ok": true, "duration_ms": 354.506, "reason": "completed"}')
    assert isinstance(done, Done) and done.duration_ms == 355
    assert json.loads(done.model_dump_json())["duration_ms"] == 355
    with pytest.raises(ValueError, match="valid integer"):
        EVENT_ADAPTER.validate_python({"type": "done", "ok": True, "duration_ms": "soon",
                                       "reason": "completed"})


# -- turn_error ------------------------------------------------------------------------------
def test_no_event_type_is_an_eventsource_name() -> None:
    """``error`` and ``message`` are EventSource's own event names; no frame may use them."""
    union = EVENT_ADAPTER.json_schema()
    kinds = {branch["properties"]["type"]["const"] for branch in union["$defs"].values()
             if "type" in branch.get("properties", {})}
    assert TURN_ERROR in kinds and len(kinds) == 13, kinds
    assert not kinds & {"error", "message"}, kinds
    error = ErrorEvent(request_id="r", seq=4, error="boom", retryable=True)
    frame = event_frame(error).decode()
    assert frame.startswith("id: 4\nevent: turn_error\ndata: {"), frame
    assert json.loads(frame.split("data: ", 1)[1])["type"] == "turn_error"


# -- retry: inside the first event's block ---------------------------------------------------
async def test_native_streams_parse_with_httpx_sse(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """httpx-sse dispatches a lone ``retry:`` block as an empty event; every event it
    dispatches from our streams (live and replayed) is JSON, and it learns the retry."""
    client = await aiohttp_client(server.create_app(settings_for(tmp_path, sse_retry_ms=1234)))
    base = str(client.make_url("/"))
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        async with httpx_sse.aconnect_sse(http, "POST", "/v1/orchestrate", json=body) as source:
            live = [(sse.event, sse.id, sse.json(), sse.retry) async for sse in source.aiter_sse()]
        request_id = live[0][2]["request_id"]
        async with httpx_sse.aconnect_sse(
                http, "GET", f"/v1/requests/{request_id}/events") as source:
            replayed = [(sse.event, sse.id, sse.json(), sse.retry)
                        async for sse in source.aiter_sse()]
        raw = (await http.get(f"/v1/requests/{request_id}/events")).content
    for events in (live, replayed):
        assert [kind for kind, *_ in events] == [data["type"] for _, _, data, _ in events]
        assert events[0][0] == "request_received" and events[-1][0] == "done"
        assert [sse_id for _, sse_id, *_ in events] == [str(d["seq"]) for _, _, d, _ in events]
        # The advice arrives with the first event, in its block; no other event carries it.
        assert [retry for *_, retry in events] == [1234] + [None] * (len(events) - 1)
    assert live == replayed
    assert raw.startswith(b": stream open\n\nretry: 1234\nid: 1\nevent: request_received\ndata: {")
    assert raw.count(b"retry:") == 1
    frames = parse_sse(raw)
    assert all(f.data is not None for f in frames if f.retry is not None)


# -- the store file: storage version and migration -----------------------------------------
def _file_version(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[8:12] == b"DUCK", header
    return int(struct.unpack("<Q", header[12:20])[0])


def test_new_store_files_use_the_chosen_storage_version(tmp_path: Path) -> None:
    assert Settings().store_storage_version == DEFAULT_STORAGE_VERSION == "v1.4.0"
    for version, number in (("v1.4.0", 67), ("v1.5.0", 68)):
        path = tmp_path / f"{version}.duckdb"
        with EventStore(path, storage_version=version) as store:
            cursor = store.cursor()
            assert storage_version_of(cursor) == f"{version}+"
            cursor.close()
            # Other code in the process can still open the same file with no configuration.
            other = duckdb.connect(str(path))
            assert other.execute("SELECT count(*) FROM events").fetchall() == [(0,)]
            other.close()
        assert _file_version(path) == number, version
    with pytest.raises(StoreError, match=r"v9\.9\.9"):
        EventStore(tmp_path / "bad.duckdb", storage_version="v9.9.9").open()
    with pytest.raises(ValueError, match="store_storage_version"):
        Settings(store_storage_version="1.4")


def test_migrate_is_idempotent_and_says_what_it_did(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    write_old_store(path)
    con = duckdb.connect(str(path))
    assert migrate(con) == [
        "requests.duration_ms: DOUBLE -> BIGINT", "requests.first_token_ms: DOUBLE -> BIGINT",
        "tool_executions.duration_ms: DOUBLE -> BIGINT",
        "events: 2 of type 'error' -> 'turn_error'",
    ]
    assert migrate(con) == []
    assert con.execute("SELECT request_id, duration_ms, first_token_ms FROM requests "
                       "ORDER BY request_id").fetchall() == [("r_done", 355, 13), ("r_run", None, 8)]
    assert con.execute("SELECT duration_ms FROM tool_executions").fetchall() == [(3,)]
    rows = con.execute("SELECT request_id, seq, type, data->>'type' FROM events "
                       "WHERE seq = 4 ORDER BY request_id").fetchall()
    assert rows == [("r_done", 4, "turn_error", "turn_error"), ("r_run", 4, "turn_error", "turn_error")]
    con.close()


async def test_a_store_written_by_the_old_schema_opens_replays_and_recovers(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    write_old_store(tmp_path / "events.duckdb")
    version_before = _file_version(tmp_path / "events.duckdb")
    client = await aiohttp_client(server.create_app(settings_for(tmp_path)))
    store = client.app[server.STORE]

    # A finished request replays with the new names and whole milliseconds.
    resp = await client.get("/v1/requests/r_done/events")
    assert resp.status == 200
    frames = await read_frames(resp)
    events = assert_wire_rules(frames, trace=False)
    assert [f.event for f in frames if f.event] == [
        "request_received", "stream_start", "text", "turn_error", "stream_end", "done"]
    assert events[3] == {"request_id": "r_done", "seq": 4, "ts": T0 + 0.04, "type": "turn_error",
                         "stream_id": 1, "error": "upstream broke", "retryable": True}
    assert events[-1]["duration_ms"] == 355

    # The request the old process left running was closed by recovery, after the old error.
    resp = await client.get("/v1/requests/r_run/events")
    recovered = assert_wire_rules(await read_frames(resp), trace=False)
    assert [e["type"] for e in recovered] == [
        "request_received", "stream_start", "tool_result", "turn_error", "stream_end",
        "turn_error", "done"]
    assert recovered[-1]["reason"] == "interrupted" and recovered[-1]["duration_ms"] == 0
    assert recovered[2]["duration_ms"] == 3

    # Status and the analysts' views agree.
    status = await (await client.get("/v1/requests/r_done")).json()
    assert status["timings"]["duration_ms"] == 355 and status["timings"]["first_token_ms"] == 13
    rows = await store.aquery("SELECT request_id, errors, duration_ms FROM request_latency "
                              "ORDER BY request_id")
    assert rows == [("r_done", 1, 355), ("r_run", 2, 0)]
    assert await store.aquery("SELECT count(*) FROM events WHERE type = 'error'") == [(0,)]
    [(version,)] = await store.aquery(
        "SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = 'events'")
    assert version == "v2.0.0+"  # an existing file of a newer version keeps its own
    assert _file_version(tmp_path / "events.duckdb") == version_before


def test_replay_parses_old_error_rows_once_migrated(tmp_path: Path) -> None:
    """The old row's JSON itself is rewritten: the union (which has no ``error`` type) reads it."""
    write_old_store(tmp_path / "events.duckdb")
    with EventStore(tmp_path / "events.duckdb") as store:
        rows = store.query("SELECT data FROM events WHERE request_id = 'r_done' ORDER BY seq")
    parsed: list[Event] = [EVENT_ADAPTER.validate_json(data) for (data,) in rows]
    assert [e.type for e in parsed] == ["request_received", "stream_start", "text", "turn_error",
                                        "stream_end", "done"]

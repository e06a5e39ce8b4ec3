"""The DuckDB event store: every event, request and message, in one file.

Writes are queued by any thread without blocking (a deque append) and applied by one
dedicated writer thread in batches, by count (``flush_max_rows``) and by time
(``flush_interval_ms``), through Arrow bulk inserts: DuckDB's many-row parameter binding manages
about 900 rows/s, an Arrow ``INSERT … SELECT`` several hundred thousand. A ``kill -9``
loses at most one flush interval; :meth:`EventStore.close` loses nothing.

Request and message rows are upserts keyed by their primary key and coalesced in the
batch (only the latest state of a row is written), so a message that goes
pending → streaming → complete within one interval costs one write.

Reads use their own cursor (the writer keeps its own: a partly read result on the same
connection blocks bulk writes) and run in a worker thread. :meth:`EventStore.flush` is a
barrier: everything queued before it is on disk when it returns, which memory uses so a
conversation's previous turn is always seen by the next one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import duckdb
import pyarrow as pa

from core.errors import StoreError
from core.events import EVENT_ADAPTER, Event, EventBase, stream_id_of, visibility
from sinks.query import harden
from sinks.views import create_views

log = logging.getLogger(__name__)

SCHEMA: Final[str] = """
CREATE TABLE IF NOT EXISTS events (
    request_id  VARCHAR   NOT NULL,
    seq         BIGINT    NOT NULL,
    ts          TIMESTAMP NOT NULL,   -- UTC, when the harness created the event
    type        VARCHAR   NOT NULL,
    stream_id   INTEGER,
    agent       VARCHAR,
    depth       INTEGER,
    visibility  VARCHAR   NOT NULL,   -- 'public' or 'trace'
    data        JSON      NOT NULL,   -- the event exactly as on the wire
    PRIMARY KEY (request_id, seq)
);
CREATE TABLE IF NOT EXISTS requests (
    request_id        VARCHAR   PRIMARY KEY,
    conversation_id   VARCHAR   NOT NULL,
    kind              VARCHAR   NOT NULL,   -- 'orchestrate', 'chat.completions', ...
    status            VARCHAR   NOT NULL,   -- running, completed, cancelled, error, interrupted
    started_at        TIMESTAMP NOT NULL,
    finished_at       TIMESTAMP,
    duration_ms       DOUBLE,
    first_token_ms    DOUBLE,               -- from start to the first text event
    model             VARCHAR,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    total_tokens      BIGINT,
    trace             BOOLEAN   NOT NULL,
    last_seq          BIGINT,
    error             VARCHAR,
    cost_usd          DOUBLE                -- sum of the token_usage costs; NULL: unpriced
);
CREATE TABLE IF NOT EXISTS messages (
    message_id      VARCHAR   PRIMARY KEY,
    conversation_id VARCHAR   NOT NULL,
    request_id      VARCHAR   NOT NULL,
    ordinal         INTEGER   NOT NULL,     -- position within the request
    role            VARCHAR   NOT NULL,     -- system, user, assistant
    content         VARCHAR   NOT NULL,
    status          VARCHAR   NOT NULL,     -- assistant: pending, streaming, complete, error, cancelled
    created_at      TIMESTAMP NOT NULL,
    updated_at      TIMESTAMP NOT NULL,
    cost_usd        DOUBLE                  -- assistant: what producing it cost
);
CREATE TABLE IF NOT EXISTS tool_executions (
    execution_id    VARCHAR   PRIMARY KEY,  -- the tool_call / tool_result events' execution_id
    request_id      VARCHAR   NOT NULL,
    conversation_id VARCHAR   NOT NULL,
    stream_id       INTEGER,
    agent           VARCHAR,                -- the stream's agent: 'assistant' (model), 'tools' (direct)
    tool            VARCHAR   NOT NULL,     -- e.g. 'fs.read'
    params          JSON      NOT NULL,
    status          VARCHAR   NOT NULL,     -- running, ok, error, cancelled
    ok              BOOLEAN,
    result          JSON,                   -- the data, when ok
    error           VARCHAR,                -- the refusal or failure, when not
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP,
    duration_ms     DOUBLE
);
-- files made before the cost columns (issue 14)
ALTER TABLE requests ADD COLUMN IF NOT EXISTS cost_usd DOUBLE;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS cost_usd DOUBLE;
"""

_TS = pa.timestamp("us")


def _micros(epoch_s: float | None) -> int | None:
    return None if epoch_s is None else int(epoch_s * 1_000_000)


@dataclasses.dataclass(slots=True)
class RequestRow:
    """One row of ``requests``; times are epoch seconds."""

    request_id: str
    conversation_id: str
    kind: str
    status: str
    started_at: float
    trace: bool = False
    finished_at: float | None = None
    duration_ms: float | None = None
    first_token_ms: float | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    last_seq: int | None = None
    error: str | None = None
    cost_usd: float | None = None


@dataclasses.dataclass(slots=True)
class MessageRow:
    """One row of ``messages``; times are epoch seconds."""

    message_id: str
    conversation_id: str
    request_id: str
    ordinal: int
    role: str
    content: str
    status: str
    created_at: float
    updated_at: float
    cost_usd: float | None = None


@dataclasses.dataclass(slots=True)
class ToolExecutionRow:
    """One row of ``tool_executions``; ``params``/``result`` are JSON text, times epoch s."""

    execution_id: str
    request_id: str
    conversation_id: str
    tool: str
    params: str
    status: str
    started_at: float
    stream_id: int | None = None
    agent: str | None = None
    ok: bool | None = None
    result: str | None = None
    error: str | None = None
    finished_at: float | None = None
    duration_ms: float | None = None


@dataclasses.dataclass(slots=True)
class _EventRow:
    event: EventBase
    agent: str | None
    depth: int | None


@dataclasses.dataclass(slots=True)
class _Barrier:
    done: Callable[[BaseException | None], None]


@dataclasses.dataclass(slots=True)
class StoreStats:
    """Counters of the writer, for /healthz and benchmarks."""

    events_written: int = 0
    flushes: int = 0
    failed_flushes: int = 0
    last_flush_ms: float = 0.0
    last_error: str | None = None


_Op = _EventRow | RequestRow | MessageRow | ToolExecutionRow | _Barrier


class EventStore:
    """The event store. Open with :meth:`open` (or ``with``), stop with :meth:`close`.

    Args:
        path: The DuckDB file (its folder is created); ``":memory:"`` for tests.
        flush_interval_ms: An event waits at most about this long before it is written.
        flush_max_rows: A batch is written as soon as this many rows wait.
    """

    def __init__(
        self, path: Path | str, *, flush_interval_ms: float = 250.0, flush_max_rows: int = 2048
    ) -> None:
        self.path = str(path)
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_max_rows = flush_max_rows
        self.stats = StoreStats()
        self._ops: collections.deque[_Op] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._read_lock = threading.Lock()
        self._read: duckdb.DuckDBPyConnection | None = None

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> EventStore:
        """Create the file and schema and start the writer thread."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(self.path)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open the event store {self.path!r}: {exc}") from exc
        self._con.execute(SCHEMA)
        create_views(self._con)
        harden(self._con)  # no file, network or extension access for any SQL on this store
        self._read = self._con.cursor()
        writer = self._con.cursor()
        self._thread = threading.Thread(
            target=self._run_writer, args=(writer,), name="event-store-writer", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Write everything queued, stop the writer, checkpoint and close. Idempotent."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
            if self._ops and self._con is not None:
                # Queued after the writer's last drain (another thread, racing close):
                # written here, and their flush barriers settled, rather than dropped.
                late = self._con.cursor()
                try:
                    self._drain(late)
                finally:
                    late.close()
        if self._con is not None:
            with self._read_lock:
                try:
                    self._con.execute("CHECKPOINT")
                finally:
                    if self._read is not None:
                        self._read.close()
                    self._con.close()
                    self._con = None
                    self._read = None

    def __enter__(self) -> EventStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes: cheap, non-blocking, from any thread ---------------------------------
    def append_event(self, event: EventBase, *, agent: str | None, depth: int | None) -> None:
        """Queue one numbered event (its ``request_id`` and ``seq`` must be set)."""
        self._enqueue(_EventRow(event, agent, depth))

    def put_request(self, row: RequestRow) -> None:
        """Queue an upsert of a request row (a copy is taken)."""
        self._enqueue(dataclasses.replace(row))

    def put_message(self, row: MessageRow) -> None:
        """Queue an upsert of a message row (a copy is taken)."""
        self._enqueue(dataclasses.replace(row))

    def put_tool_execution(self, row: ToolExecutionRow) -> None:
        """Queue an upsert of a tool execution row (a copy is taken)."""
        self._enqueue(dataclasses.replace(row))

    def _enqueue(self, op: _Op) -> None:
        if self._thread is None:
            raise StoreError("the event store is not open")
        self._ops.append(op)
        if len(self._ops) >= self.flush_max_rows and not self._wake.is_set():
            self._wake.set()  # a lock: only once per batch, not on every append

    async def flush(self) -> None:
        """Return once everything queued before the call is written (a barrier)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(StoreError(f"flush failed: {error}"))

            loop.call_soon_threadsafe(settle)

        self._enqueue(_Barrier(done))
        self._wake.set()
        await future

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the store's database, for analysts' reads and exports."""
        if self._con is None:
            raise StoreError("the event store is not open")
        return self._con.cursor()

    # -- reads: own cursor, in a worker thread ----------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read on the reader cursor (blocking; use :meth:`aquery` on the loop)."""
        with self._read_lock:
            if self._read is None:
                raise StoreError("the event store is not open")
            return self._read.execute(sql, list(params)).fetchall()

    async def aquery(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """:meth:`query` in a worker thread, so the event loop never waits on DuckDB."""
        return await asyncio.to_thread(self.query, sql, params)

    async def load_history(
        self, conversation_id: str, *, limit: int, exclude_request_id: str | None = None
    ) -> list[dict[str, str]]:
        """The conversation's earlier messages, oldest first, as chat messages.

        Waits for pending writes first, so the previous turn is always included. Messages of
        ``exclude_request_id`` (the turn asking) and assistant messages that failed or never
        produced text are left out.
        """
        await self.flush()
        rows = await self.aquery(
            """
            SELECT role, content FROM (
                SELECT role, content, created_at, ordinal FROM messages
                WHERE conversation_id = ? AND request_id IS DISTINCT FROM ?
                  AND (role <> 'assistant' OR (status IN ('complete', 'cancelled') AND content <> ''))
                ORDER BY created_at DESC, ordinal DESC
                LIMIT ?
            ) ORDER BY created_at, ordinal
            """,
            [conversation_id, exclude_request_id, limit],
        )
        return [{"role": role, "content": content} for role, content in rows]

    async def events_since(
        self, request_id: str, since_seq: int, *, page: int = 1000
    ) -> AsyncIterator[Event]:
        """A request's stored events with ``seq > since_seq``, in order, read page by page.

        Call :meth:`flush` first when the request may still be writing.
        """
        cursor = since_seq
        while True:
            rows = await self.aquery(
                "SELECT seq, data FROM events WHERE request_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                [request_id, cursor, page],
            )
            for seq, data in rows:
                cursor = seq
                yield EVENT_ADAPTER.validate_json(data)
            if len(rows) < page:
                return

    async def request_row(self, request_id: str) -> dict[str, Any] | None:
        """The ``requests`` row of a request as a dict, or None when unknown."""
        return next(iter(await self._dicts(
            "SELECT * FROM requests WHERE request_id = ?", [request_id])), None)

    async def messages_of(self, request_id: str) -> list[dict[str, Any]]:
        """A request's messages in order (its input, then the assistant's answer)."""
        return await self._dicts(
            "SELECT * FROM messages WHERE request_id = ? ORDER BY ordinal", [request_id])

    async def _dicts(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            with self._read_lock:
                if self._read is None:
                    raise StoreError("the event store is not open")
                result = self._read.execute(sql, list(params))
                names = [column[0] for column in result.description or ()]
                return [dict(zip(names, row, strict=True)) for row in result.fetchall()]

        return await asyncio.to_thread(run)

    # -- the writer thread ----------------------------------------------------------
    def _run_writer(self, con: duckdb.DuckDBPyConnection) -> None:
        try:
            while True:
                self._wake.wait(self.flush_interval_s)
                self._wake.clear()
                stopping = self._stopping
                self._drain(con)
                if stopping:
                    self._drain(con)
                    return
        finally:
            con.close()

    def _drain(self, con: duckdb.DuckDBPyConnection) -> None:
        """Take everything queued now and write it in one batch per table."""
        events: list[_EventRow] = []
        requests: dict[str, RequestRow] = {}
        messages: dict[str, MessageRow] = {}
        tools: dict[str, ToolExecutionRow] = {}
        barriers: list[_Barrier] = []
        error: BaseException | None = None
        ops = self._ops
        while ops:
            op = ops.popleft()
            if isinstance(op, _EventRow):
                events.append(op)
            elif isinstance(op, RequestRow):
                requests[op.request_id] = op
            elif isinstance(op, MessageRow):
                messages[op.message_id] = op
            elif isinstance(op, ToolExecutionRow):
                tools[op.execution_id] = op
            else:
                barriers.append(op)
            if len(events) >= self.flush_max_rows:
                error = self._write(con, events, {}, {}) or error
                events = []
        if events or requests or messages or tools:
            error = self._write(con, events, requests, messages, tools) or error
        for barrier in barriers:
            barrier.done(error)

    def _write(
        self,
        con: duckdb.DuckDBPyConnection,
        events: list[_EventRow],
        requests: dict[str, RequestRow],
        messages: dict[str, MessageRow],
        tools: dict[str, ToolExecutionRow] | None = None,
    ) -> BaseException | None:
        started = time.perf_counter()
        error: BaseException | None = None
        batches: dict[str, pa.Table] = {}
        try:
            if events:
                batches["event_batch"] = _events_table(events)
            if requests:
                batches["request_batch"] = _rows_table(list(requests.values()), RequestRow)
            if messages:
                batches["message_batch"] = _rows_table(list(messages.values()), MessageRow)
            if tools:
                batches["tool_batch"] = _rows_table(list(tools.values()), ToolExecutionRow)
            for name, table in batches.items():
                con.register(name, table)
            try:
                _apply(con, batches, strict=True)
            except duckdb.ConstraintException:
                # A duplicate (request_id, seq) must not cost the rest of the batch.
                log.warning("duplicate event keys in a batch; keeping the stored ones")
                con.rollback()
                _apply(con, batches, strict=False)
            self.stats.events_written += len(events)
        except Exception as exc:  # keep the writer alive: log, count, go on
            error = exc
            self.stats.failed_flushes += 1
            self.stats.last_error = str(exc)
            log.exception("event store flush failed (%d events)", len(events))
            try:
                con.rollback()
            except duckdb.Error:
                pass
        finally:
            for name in batches:
                con.unregister(name)
        self.stats.flushes += 1
        self.stats.last_flush_ms = (time.perf_counter() - started) * 1000
        return error


def _apply(con: duckdb.DuckDBPyConnection, batches: dict[str, pa.Table], *, strict: bool) -> None:
    """Write the registered batches in one transaction."""
    con.begin()
    if "event_batch" in batches:
        verb = "INSERT" if strict else "INSERT OR IGNORE"
        con.execute(f"{verb} INTO events BY NAME SELECT * FROM event_batch")
    if "request_batch" in batches:
        con.execute("INSERT OR REPLACE INTO requests BY NAME SELECT * FROM request_batch")
    if "message_batch" in batches:
        con.execute("INSERT OR REPLACE INTO messages BY NAME SELECT * FROM message_batch")
    if "tool_batch" in batches:
        con.execute("INSERT OR REPLACE INTO tool_executions BY NAME SELECT * FROM tool_batch")
    con.commit()


def _events_table(rows: list[_EventRow]) -> pa.Table:
    events = [row.event for row in rows]
    return pa.table(
        {
            "request_id": pa.array([e.request_id for e in events], pa.string()),
            "seq": pa.array([e.seq for e in events], pa.int64()),
            "ts": pa.array([int(e.ts * 1_000_000) for e in events], _TS),
            "type": pa.array([getattr(e, "type", "") for e in events], pa.string()),
            "stream_id": pa.array([stream_id_of(e) for e in events], pa.int32()),
            "agent": pa.array([row.agent for row in rows], pa.string()),
            "depth": pa.array([row.depth for row in rows], pa.int32()),
            "visibility": pa.array([visibility(e) for e in events], pa.string()),
            "data": pa.array([e.model_dump_json() for e in events], pa.string()),
        }
    )


_TIME_FIELDS: Final = frozenset({"started_at", "finished_at", "created_at", "updated_at"})


def _rows_table(rows: list[Any], cls: type[Any]) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for field in dataclasses.fields(cls):
        values = [getattr(row, field.name) for row in rows]
        if field.name in _TIME_FIELDS:
            columns[field.name] = pa.array([_micros(v) for v in values], _TS)
        else:
            columns[field.name] = pa.array(values)
    table = pa.table(columns)
    return table

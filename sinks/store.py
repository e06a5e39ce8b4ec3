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

Nothing is dropped (issue 10). A batch that fails is split until every row that can be
written is written; a row that cannot (say a lone surrogate in its text) is kept in
``dead_letters`` with its content made safe, counted, and reported to its turn's barrier;
no other row pays for it. When the store itself cannot write (a full disk), the failed
batch is kept in memory, new rows join it, and it is retried with backoff until the store
takes it; :meth:`EventStore.health` says so meanwhile (no file system paths in it), and
the server refuses new turns once ``backlog_max_rows`` rows wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import duckdb
import pyarrow as pa

from core.config import Settings
from core.errors import StoreError
from core.events import EVENT_ADAPTER, Event, EventBase, stream_id_of, visibility
from sinks.conversations import ConversationCache
from sinks.query import harden
from sinks.responses_table import LocalResponses, ResponsesTable
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
    duration_ms       BIGINT,               -- whole milliseconds
    first_token_ms    BIGINT,               -- from start to the first text event, whole ms
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
    duration_ms     BIGINT                  -- whole milliseconds
);
CREATE TABLE IF NOT EXISTS dead_letters (
    request_id   VARCHAR,                   -- the turn the row belonged to
    row_key      VARCHAR,                   -- events: the seq; others: the row's primary key
    target       VARCHAR   NOT NULL,        -- the table it was meant for
    error        VARCHAR   NOT NULL,        -- why it could not be written
    content      VARCHAR   NOT NULL,        -- the row as JSON, made safe (ASCII escapes)
    recorded_at  TIMESTAMP NOT NULL
);
-- files made before the cost columns (issue 14)
ALTER TABLE requests ADD COLUMN IF NOT EXISTS cost_usd DOUBLE;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS cost_usd DOUBLE;
"""

#: The DuckDB storage format new store files are written in, on purpose: ``v1.4.0`` (file
#: version 67) opens in every DuckDB tool from the 1.4 LTS line on — the ``duckdb-cli`` 1.5.x a
#: user installs today reads file versions 64–68, and the bundled duckdb 2.x writes 69 by
#: default. An existing file keeps the version it was created with. ``STORE_STORAGE_VERSION``.
DEFAULT_STORAGE_VERSION: Final[str] = "v1.4.0"

#: Columns the docs call ``*_ms``: whole milliseconds (``BIGINT``); files created before were
#: ``DOUBLE`` and are migrated when the store opens.
MS_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("requests", "duration_ms"), ("requests", "first_token_ms"), ("tool_executions", "duration_ms"),
)


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Bring a store file written by an older version up to :data:`SCHEMA`; returns what it did.

    - ``*_ms`` columns of type ``DOUBLE`` become ``BIGINT`` (rounded);
    - events of the old turn-level type ``error`` become ``turn_error`` (column and JSON).

    Idempotent and cheap when there is nothing to do; run inside the store's open.
    """
    done: list[str] = []
    for table, column in MS_COLUMNS:
        row = con.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?",
            [table, column]).fetchall()
        if row and row[0][0] != "BIGINT":
            con.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT "
                        f"USING CAST(round({column}) AS BIGINT)")
            done.append(f"{table}.{column}: {row[0][0]} -> BIGINT")
    (legacy,) = con.execute("SELECT count(*) FROM events WHERE type = 'error'").fetchall()[0]
    if legacy:
        con.execute("""UPDATE events SET type = 'turn_error',
                       data = json_merge_patch(data, '{"type": "turn_error"}')
                       WHERE type = 'error'""")
        done.append(f"events: {legacy} of type 'error' -> 'turn_error'")
    return done


def create_file(path: str, *, storage_version: str = DEFAULT_STORAGE_VERSION) -> bool:
    """Create an empty DuckDB file in ``storage_version`` unless ``path`` exists; True if made.

    The version is a property of the file: later connections (any configuration, so other
    code in this process can still ``duckdb.connect(path)``) keep writing it.
    """
    if Path(path).exists():
        return False
    duckdb.connect(path, config={"storage_compatibility_version": storage_version}).close()
    return True


def storage_version_of(con: duckdb.DuckDBPyConnection) -> str | None:
    """The storage version DuckDB reports for the connection's database, e.g. ``v1.4.0+``."""
    rows = con.execute("SELECT tags['storage_version'] FROM duckdb_databases() "
                       "WHERE database_name = current_database()").fetchall()
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


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
    duration_ms: int | None = None
    first_token_ms: int | None = None
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
    duration_ms: int | None = None


@dataclasses.dataclass(slots=True)
class _EventRow:
    event: EventBase
    agent: str | None
    depth: int | None


@dataclasses.dataclass(slots=True)
class _Barrier:
    done: Callable[[BaseException | None], None]
    request_id: str | None = None
    events_only: bool = False


@dataclasses.dataclass(slots=True)
class StoreStats:
    """Counters of the writer, for /healthz and benchmarks (``last_error`` names no path)."""

    events_written: int = 0
    flushes: int = 0
    failed_flushes: int = 0
    last_flush_ms: float = 0.0
    last_error: str | None = None
    dead_letters: int = 0
    retries: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class StoreHealth:
    """What :meth:`EventStore.health` reports: can the store write, and how much waits.

    Attributes:
        writable: False from a write the store refused (disk full, I/O error) until a
            retry succeeds.
        backlog_rows: Rows kept in memory that the store has not taken yet.
        backlog_max_rows: From this many, new turns are refused (503).
        accepting: Whether new turns may start (``backlog_rows < backlog_max_rows``).
        dead_letters: Rows that could never be written, kept in ``dead_letters``.
        last_error: The last write error, without file system paths.
        retry_in_s: When the next retry is due (0 when writable).
    """

    writable: bool
    backlog_rows: int
    backlog_max_rows: int
    accepting: bool
    dead_letters: int
    last_error: str | None
    retry_in_s: float


_Row = _EventRow | RequestRow | MessageRow | ToolExecutionRow
_Op = _Row | _Barrier

#: How many turns' dead-letter counts are kept for their barriers to collect.
_DEAD_COUNTS_MAX = 10_000

_QUOTED_PATH = re.compile(r""""/[^"]*"|'/[^']*'""")
_PATH = re.compile(r"""(?<![\w.:/])/(?:[^\s"'/:]+/)*[^\s"'/:]*""")


def scrub_paths(text: str) -> str:
    """``text`` with every absolute file system path replaced by ``<path>``: store errors
    (DuckDB names the file it could not write) reach clients, logs stay detailed."""
    quoted = _QUOTED_PATH.sub(lambda m: f"{m.group(0)[0]}<path>{m.group(0)[0]}", text)
    return _PATH.sub("<path>", quoted)


def _safe(text: str) -> str:
    """``text`` encodable as UTF-8 (a lone surrogate becomes a backslash escape)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Unwritable(Exception):
    """The store refused a write as a whole (disk full, I/O): keep the rows, retry later."""


def _invalidated(exc: BaseException | None) -> bool:
    """Whether DuckDB invalidated the database instance (it must be reopened)."""
    return isinstance(exc, duckdb.FatalException) or "invalidated" in str(exc)


def _store_failure(exc: BaseException) -> bool:
    """Whether an error is the store's (retry later) rather than one row's (dead letter)."""
    return isinstance(exc, duckdb.OperationalError | duckdb.FatalException | OSError | MemoryError)


@dataclasses.dataclass(slots=True)
class _Batch:
    """Rows waiting to be written: events in order, upserts coalesced by key."""

    events: list[_EventRow] = dataclasses.field(default_factory=list)
    requests: dict[str, RequestRow] = dataclasses.field(default_factory=dict)
    messages: dict[str, MessageRow] = dataclasses.field(default_factory=dict)
    tools: dict[str, ToolExecutionRow] = dataclasses.field(default_factory=dict)

    def add(self, row: _Row) -> None:
        if isinstance(row, _EventRow):
            self.events.append(row)
        elif isinstance(row, RequestRow):
            self.requests[row.request_id] = row
        elif isinstance(row, MessageRow):
            self.messages[row.message_id] = row
        else:
            self.tools[row.execution_id] = row

    def extend(self, other: _Batch) -> None:
        """Add ``other``'s rows after these (its upserts win)."""
        self.events.extend(other.events)
        self.requests.update(other.requests)
        self.messages.update(other.messages)
        self.tools.update(other.tools)

    def rows(self) -> int:
        return len(self.events) + len(self.requests) + len(self.messages) + len(self.tools)

    def all_rows(self) -> list[_Row]:
        return [*self.events, *self.requests.values(), *self.messages.values(),
                *self.tools.values()]

    def chunks(self, size: int) -> list[_Batch]:
        """Events in chunks of ``size``, the upserts with the last one."""
        parts = [_Batch(events=self.events[i:i + size])
                 for i in range(0, len(self.events), size)] or [_Batch()]
        last = parts[-1]
        last.requests, last.messages, last.tools = self.requests, self.messages, self.tools
        return parts

    def halves(self) -> list[_Batch]:
        """Two (or more) smaller batches with these rows: one table each, then halves."""
        tables = [_Batch(events=self.events), _Batch(requests=self.requests),
                  _Batch(messages=self.messages), _Batch(tools=self.tools)]
        tables = [part for part in tables if part.rows()]
        if len(tables) > 1:
            return tables
        rows = self.all_rows()
        middle = len(rows) // 2
        first, second = _Batch(), _Batch()
        for row in rows[:middle]:
            first.add(row)
        for row in rows[middle:]:
            second.add(row)
        return [first, second]


class StoreApi(Protocol):
    """What the API layer uses of a store: reads, the write barrier and health.

    :class:`EventStore` (the process opens the DuckDB file) and
    :class:`sinks.remote_store.RemoteStore` (the worker role: the recorder process opens it)
    both provide it. ``cursor`` is the one part a remote store cannot give (a raw DuckDB
    connection): it raises :class:`~core.errors.StoreError` there.
    """

    stats: StoreStats

    def health(self) -> StoreHealth: ...

    async def flush(self, *, request_id: str | None = None, timeout_s: float | None = None,
                    events_only: bool = False) -> None: ...

    async def load_history(self, conversation_id: str, *, limit: int,
                           exclude_request_id: str | None = None) -> list[dict[str, str]]: ...

    def events_since(self, request_id: str, since_seq: int, *, page: int = 1000
                     ) -> AsyncIterator[Event]: ...

    async def request_row(self, request_id: str) -> dict[str, Any] | None: ...

    async def messages_of(self, request_id: str) -> list[dict[str, Any]]: ...

    async def aquery(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def cursor(self) -> duckdb.DuckDBPyConnection: ...

    def responses(self) -> ResponsesTable: ...


class EventStore:
    """The event store. Open with :meth:`open` (or ``with``), stop with :meth:`close`.

    Args:
        path: The DuckDB file (its folder is created); ``":memory:"`` for tests.
        flush_interval_ms: An event waits at most about this long before it is written.
        flush_max_rows: A batch is written as soon as this many rows wait.
        storage_version: The DuckDB storage format of a file this store creates
            (:data:`DEFAULT_STORAGE_VERSION`); an existing file keeps its own.
        backlog_max_rows: Rows kept while the store cannot write, from which
            :meth:`health` says ``accepting=False`` (rows are never dropped: running turns
            go on adding theirs).
        retry_min_ms: The first retry after a refused write; doubled after each failure.
        retry_max_ms: The longest wait between retries.
        barrier_timeout_s: How long :meth:`flush` waits by default before it raises.
    """

    def __init__(
        self, path: Path | str, *, flush_interval_ms: float = 250.0, flush_max_rows: int = 2048,
        storage_version: str = DEFAULT_STORAGE_VERSION,
        backlog_max_rows: int = 200_000, retry_min_ms: float = 100.0,
        retry_max_ms: float = 5_000.0, barrier_timeout_s: float = 10.0,
        history_cache_bytes: int = 64 * 1024 * 1024, threads: int = 1,
    ) -> None:
        self.path = str(path)
        # DuckDB's worker threads (0: its default, one per core). Each commit wakes all of
        # them: with 1, a turn's end-of-turn flush (events and two upserts) cost 4.0 ms of
        # CPU here instead of 5.3 with 2, and the streaming server's CPU per token fell
        # about a sixth; a large analyst query gets one core.
        # (SET after connecting, not a connect config: another ``duckdb.connect(path)`` in
        # this process must still find the instance's configuration unchanged.)
        self.threads = threads
        self.conversations = ConversationCache(max_bytes=history_cache_bytes)
        self.storage_version = storage_version
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_max_rows = flush_max_rows
        self.backlog_max_rows = backlog_max_rows
        self.retry_min_s = retry_min_ms / 1000
        self.retry_max_s = retry_max_ms / 1000
        self.barrier_timeout_s = barrier_timeout_s
        self.stats = StoreStats()
        self._ops: collections.deque[_Op] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._events_by_position = True  # set at open from the file's columns
        self._read_lock = threading.Lock()
        self._read: duckdb.DuckDBPyConnection | None = None
        # The writer thread's own state: rows the store refused, and who waits for them.
        self._backlog = _Batch()
        self._backlog_rows = 0  # read by other threads
        self._waiting: list[_Barrier] = []
        self._writable = True
        self._invalid = False  # DuckDB invalidated the database: reopen before writing
        self._retry_at = 0.0
        self._retry_s = self.retry_min_s
        self._dead_lock = threading.Lock()
        self._dead_by_request: dict[str | None, int] = {}
        # The writer's keys of each upsert table it has committed (oldest first): their
        # next rows are UPDATEs, the others plain appends (an upsert costs 2–3 times more).
        self._written: dict[str, dict[Any, None]] = {table: {} for table in _ROW_TYPES}

    @classmethod
    def from_settings(cls, settings: Settings) -> EventStore:
        """The store ``DB_PATH`` and the store settings describe (not opened)."""
        return cls(settings.db_path, flush_interval_ms=settings.flush_interval_ms,
                   flush_max_rows=settings.flush_max_rows,
                   storage_version=settings.store_storage_version,
                   backlog_max_rows=settings.store_backlog_max_rows,
                   retry_min_ms=settings.store_retry_min_ms,
                   retry_max_ms=settings.store_retry_max_ms,
                   barrier_timeout_s=settings.store_barrier_timeout_s,
                   history_cache_bytes=settings.history_cache_max_bytes,
                   threads=settings.store_threads)

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> EventStore:
        """Create the file and schema and start the writer thread."""
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                create_file(self.path, storage_version=self.storage_version)
            self._con = self._connect()
        except duckdb.Error as exc:
            raise StoreError(f"cannot open the event store {self.path!r}: {exc}") from exc
        self._con.execute(SCHEMA)
        for change in migrate(self._con):
            log.info("event store %s migrated: %s", self.path, change)
        create_views(self._con)
        harden(self._con)  # no file, network or extension access for any SQL on this store
        self._read = self._con.cursor()
        columns = self._con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'events' "
            "AND table_schema = 'main' ORDER BY ordinal_position").fetchall()
        # Events are inserted by position when the file's columns are ours, in our order.
        self._events_by_position = tuple(c for (c,) in columns) == EVENT_COLUMNS
        # pyarrow's first table costs about a second (lazy set-up): pay it here, not in the
        # first turn's flush barrier.
        _events_table([])
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
                    self._drain(late, force=True)
                    self._abandon()
                finally:
                    late.close()
        if self._con is not None:
            with self._read_lock:
                try:
                    self._con.execute("CHECKPOINT")
                except duckdb.Error as exc:
                    # What was committed is in the write-ahead log, which the next open
                    # replays: a failed checkpoint (a full disk) loses nothing.
                    log.error("the event store could not checkpoint on close (%s); the "
                              "write-ahead log keeps the data", _safe(str(exc)))
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
        copy = dataclasses.replace(row)
        self._enqueue(copy)
        self.conversations.put(copy)

    def put_tool_execution(self, row: ToolExecutionRow) -> None:
        """Queue an upsert of a tool execution row (a copy is taken)."""
        self._enqueue(dataclasses.replace(row))

    def _enqueue(self, op: _Op) -> None:
        if self._thread is None:
            raise StoreError("the event store is not open")
        self._ops.append(op)
        if len(self._ops) >= self.flush_max_rows and not self._wake.is_set():
            self._wake.set()  # a lock: only once per batch, not on every append

    async def flush(self, *, request_id: str | None = None, timeout_s: float | None = None,
                    events_only: bool = False, wake: bool = True) -> None:
        """Return once everything queued before the call is written (a barrier).

        Raises :class:`StoreError` when the store has not taken those rows within
        ``timeout_s`` (default ``barrier_timeout_s``: they stay queued and are written when
        it can), or, with ``request_id``, when rows of that request could not be written
        (dead letters; each is reported to one such barrier). The message names no file
        system path. ``events_only``: wait for the events only, not for the request,
        message and tool rows (derived from the events, written right after them).
        ``wake=False``: no write now for this barrier; it settles with the next one (at most
        ``FLUSH_INTERVAL_MS`` away, or sooner for another barrier): a group commit for a
        waiter in no hurry, as each write costs DuckDB about a millisecond per statement
        however few its rows.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(StoreError(scrub_paths(f"flush failed: {error}")))

            loop.call_soon_threadsafe(settle)

        self._enqueue(_Barrier(done, request_id, events_only))
        if wake:
            self._wake.set()
        timeout = self.barrier_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):  # (no task per barrier, as wait_for makes)
                await future
        except TimeoutError:
            health = self.health()
            raise StoreError(
                f"the event store has not written within {timeout:g}s "
                f"({health.backlog_rows} rows wait; last error: {health.last_error})"
            ) from None

    def health(self) -> StoreHealth:
        """Whether the store writes, and how much waits (no file system paths)."""
        backlog = self._backlog_rows + (0 if self._writable else len(self._ops))
        return StoreHealth(
            writable=self._writable, backlog_rows=backlog,
            backlog_max_rows=self.backlog_max_rows, accepting=backlog < self.backlog_max_rows,
            dead_letters=self.stats.dead_letters, last_error=self.stats.last_error,
            retry_in_s=0.0 if self._writable else round(max(0.0, self._retry_at - time.monotonic()), 3),
        )

    def responses(self) -> ResponsesTable:
        """The ``responses`` table of the Responses wire, on this store's connection."""
        return LocalResponses(self.cursor)

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

        Messages of ``exclude_request_id`` (the turn asking) and assistant messages that
        failed or never produced text are left out. A conversation read lately is answered
        from memory (:class:`~sinks.conversations.ConversationCache`: what this store
        wrote for it, exactly what the query finds once flushed); otherwise the store waits
        for pending writes first, so the previous turn is always included, and keeps the
        conversation from then on.
        """
        cached = self.conversations.history(conversation_id, limit=limit,
                                            exclude_request_id=exclude_request_id)
        if cached is not None:
            return cached
        if self.conversations.max_bytes:
            self.conversations.begin(conversation_id)
        await self.flush()
        if self.conversations.max_bytes:
            found = await self.aquery(
                f"SELECT epoch_us(created_at), {', '.join(_MESSAGE_FIELDS)} FROM messages "
                "WHERE conversation_id = ?", [conversation_id])
            self.conversations.fill(conversation_id, [
                (key, _message_row(values)) for key, *values in found])
            cached = self.conversations.history(conversation_id, limit=limit,
                                                exclude_request_id=exclude_request_id)
            if cached is not None:
                return cached
        rows = await self.aquery(HISTORY_SQL, [conversation_id, exclude_request_id, limit])
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
                wait = self.flush_interval_s
                if not self._writable:
                    wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()
                stopping = self._stopping
                if self._invalid and (stopping or time.monotonic() >= self._retry_at):
                    try:
                        con = self._reopen(con)
                        self._invalid = False
                    except duckdb.Error as exc:
                        self.stats.last_error = scrub_paths(_safe(f"{type(exc).__name__}: {exc}"))
                        self._retry_at = time.monotonic() + self._retry_s
                        log.error("the event store cannot reopen its database: %s", _safe(str(exc)))
                        if not stopping:
                            continue
                try:
                    self._drain(con, force=stopping)
                except Exception:  # never let the writer die: what it holds stays kept
                    log.exception("the event store writer failed; going on")
                    self._writable, self._invalid = False, True
                    self._retry_at = time.monotonic() + self._retry_s
                if stopping:
                    self._drain(con, force=True)
                    self._abandon()
                    return
        finally:
            con.close()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(self.path)
        if self.threads:
            con.execute(f"SET threads = {int(self.threads)}")
        return con

    def _reopen(self, con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
        """A new connection after DuckDB invalidated the database (a checkpoint failed on a
        full disk is FATAL for the instance): close every connection, connect again (the
        write-ahead log is replayed), return the writer's new cursor. Raises when it cannot."""
        with self._read_lock:
            for old in (con, self._read, self._con):
                if old is not None:
                    with contextlib.suppress(duckdb.Error):
                        old.close()
            self._con = self._read = None
            self._con = self._connect()
            harden(self._con)
            self._read = self._con.cursor()
            log.warning("the event store reopened its database after a fatal error")
            return self._con.cursor()

    def _drain(self, con: duckdb.DuckDBPyConnection, *, force: bool = False) -> None:
        """Take everything queued now and write it with the backlog, in batches by table.

        While the store refuses writes, the rows only join the backlog until the next retry
        is due (``force``: now, on close). Barriers are settled once nothing queued before
        them waits.
        """
        ops = self._ops
        backlog = self._backlog
        while ops:
            op = ops.popleft()
            if isinstance(op, _Barrier):
                self._waiting.append(op)
            else:
                backlog.add(op)
        self._backlog_rows = backlog.rows()
        if backlog.rows() and (self._writable or force or time.monotonic() >= self._retry_at):
            self._write_backlog(con)
        self._settle()

    def _settle(self) -> None:
        """Settle the barriers nothing waits for any more: all of them when the backlog is
        empty, those for events only when no event waits."""
        if not self._waiting:
            return
        empty, no_events = not self._backlog.rows(), not self._backlog.events
        waiting, self._waiting = self._waiting, []
        for barrier in waiting:
            if empty or (barrier.events_only and no_events):
                barrier.done(self._barrier_error(barrier))
            else:
                self._waiting.append(barrier)

    def _write_backlog(self, con: duckdb.DuckDBPyConnection) -> None:
        """Write the backlog: the events in chunks, the upserts with the last chunk, so a
        flush is usually one transaction (each costs about 1 ms of DuckDB's CPU however few
        its rows: one commit per flush rather than two is the hot path's saving)."""
        if not self._writable:
            self.stats.retries += 1
        backlog = self._backlog
        self._backlog = _Batch()
        parts = [part for part in reversed(backlog.chunks(self.flush_max_rows)) if part.rows()]
        try:
            self._write_parts(con, parts)  # a stack: the first chunk on top
        except Exception as exc:  # _Unwritable, or anything unforeseen: keep the rows
            cause = exc.__cause__ if isinstance(exc, _Unwritable) else exc
            if _invalidated(cause):
                self._invalid = True  # reopened before the next retry
            kept = _Batch()
            for part in reversed(parts):
                kept.extend(part)
            self._backlog = kept
            self._backlog_rows = kept.rows()
            self._writable = False
            self._retry_at = time.monotonic() + self._retry_s
            log.error("the event store cannot write (%s); keeping %d rows, retrying in %.1fs",
                      _safe(str(cause)), kept.rows(), self._retry_s)
            self._retry_s = min(self._retry_s * 2, self.retry_max_s)
            return
        # Written: say so before any barrier is settled (its waiter may look at health).
        if not self._writable:
            log.warning("the event store writes again; the backlog is written")
        self._writable = True
        self._retry_s = self.retry_min_s
        self._backlog_rows = 0

    def _write_parts(self, con: duckdb.DuckDBPyConnection, parts: list[_Batch]) -> None:
        """Write each part on the stack; split a part that fails, down to single rows,
        which become dead letters. Raises :class:`_Unwritable` (the unwritten parts left on
        the stack) when the store refuses a write as a whole."""
        while parts:
            part = parts[-1]
            error = self._write(con, part)
            if error is None:
                parts.pop()
                continue
            if _store_failure(error):
                raise _Unwritable() from error
            parts.pop()
            if part.rows() > 1:
                parts.extend(reversed(part.halves()))
                continue
            try:
                self._dead_letter(con, part.all_rows()[0], error)
            except Exception as exc:  # cannot even record it now: keep it, retry later
                parts.append(part)
                raise _Unwritable() from exc

    def _dead_letter(self, con: duckdb.DuckDBPyConnection, row: _Row, error: BaseException) -> None:
        """Record a row that cannot be written, with its content made safe."""
        match row:
            case _EventRow(event=event):
                request_id: str | None = event.request_id
                key, target = str(event.seq), "events"
                content = {"agent": row.agent, "depth": row.depth,
                           "event": event.model_dump(mode="python")}
            case RequestRow():
                request_id, key, target = row.request_id, row.request_id, "requests"
                content = dataclasses.asdict(row)
            case MessageRow():
                request_id, key, target = row.request_id, row.message_id, "messages"
                self.conversations.forget(row.conversation_id)  # memory must match the file
                content = dataclasses.asdict(row)
            case ToolExecutionRow():
                request_id, key, target = row.request_id, row.execution_id, "tool_executions"
                content = dataclasses.asdict(row)
        message = scrub_paths(_safe(f"{type(error).__name__}: {error}"))
        con.execute(
            "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, now()::TIMESTAMP)",
            [None if request_id is None else _safe(request_id), _safe(key), target, message,
             json.dumps(content, ensure_ascii=True, default=str)],
        )
        self.stats.dead_letters += 1
        with self._dead_lock:
            counts = self._dead_by_request
            counts[request_id] = counts.pop(request_id, 0) + 1
            while len(counts) > _DEAD_COUNTS_MAX:
                del counts[next(iter(counts))]
        log.error("event store: a %s row of request %s cannot be written (%s); kept in "
                  "dead_letters", target, request_id, message)

    def _barrier_error(self, barrier: _Barrier) -> BaseException | None:
        if barrier.request_id is None:
            return None  # a reader's barrier: another turn's dead letter is not its failure
        with self._dead_lock:
            lost = self._dead_by_request.pop(barrier.request_id, 0)
        if not lost:
            return None
        return StoreError(f"{lost} rows could not be written (kept in dead_letters: "
                          f"{self.stats.last_error})")

    def _abandon(self) -> None:
        """On close with a store that still refuses writes: say loudly what is lost."""
        if self._backlog.rows():
            log.error("the event store closes with %d rows it could not write; they are lost",
                      self._backlog.rows())
        waiting, self._waiting = self._waiting, []
        for barrier in waiting:
            barrier.done(StoreError("the event store closed before it could write"))

    def _write(self, con: duckdb.DuckDBPyConnection, batch: _Batch) -> BaseException | None:
        """Write one batch in one transaction; the error, or None when it is written."""
        started = time.perf_counter()
        error: BaseException | None = None
        batches: dict[str, Any] = {}
        try:
            if batch.events:
                batches["event_batch"] = _events_table(batch.events)
            for table, rows in (("requests", batch.requests), ("messages", batch.messages),
                                ("tool_executions", batch.tools)):
                if rows:
                    batches[table] = _upserts(rows, _ROW_TYPES[table], self._written[table])
            try:
                _apply(con, batches, strict=True, by_position=self._events_by_position)
            except (duckdb.ConstraintException, _Stale) as exc:
                # A duplicate (request_id, seq) must not cost the rest of the batch; a row
                # this store had not written before but the file holds (a previous
                # process's, or one whose key it forgot) is replaced after all.
                log.warning("keys already stored in a batch (%s); keeping the stored events, "
                            "replacing the other rows", type(exc).__name__)
                _rollback(con)
                _apply(con, batches, strict=False, by_position=self._events_by_position)
            for table in _ROW_TYPES:
                if table in batches:
                    self._remember(table, batches[table])
            self.stats.events_written += len(batch.events)
        except Exception as exc:  # keep the writer alive: the caller splits or keeps the rows
            error = exc
            self.stats.failed_flushes += 1
            self.stats.last_error = scrub_paths(_safe(f"{type(exc).__name__}: {exc}"))
            log.warning("event store write failed (%d rows): %s", batch.rows(),
                        _safe(str(exc)))
            _rollback(con)
        self.stats.flushes += 1
        self.stats.last_flush_ms = (time.perf_counter() - started) * 1000
        return error

    def _remember(self, table: str, upserts: _Upserts) -> None:
        """Note the keys just committed to ``table`` (the next write of one is an UPDATE),
        forgetting the oldest past :data:`_WRITTEN_KEYS_MAX`."""
        written = self._written[table]
        for key in upserts.keys():
            written.pop(key, None)  # to the young end: a live turn's rows stay known
            written[key] = None
        while len(written) > _WRITTEN_KEYS_MAX:
            del written[next(iter(written))]


class _Stale(Exception):
    """An UPDATE of rows this store wrote found fewer of them than it updates."""


#: Keys of each upsert table a store remembers having written (about 100 bytes each).
_WRITTEN_KEYS_MAX: Final = 50_000
#: Known rows up to this many go in as one ``UPDATE … FROM (VALUES …)``, more by an upsert.
_UPDATE_MAX_ROWS: Final = 64


@dataclasses.dataclass(slots=True)
class _Upserts:
    """One upsert table's rows of a batch, as columns and value tuples (key first): the
    ``fresh`` ones this store has not written before, the ``known`` ones it has."""

    columns: list[str]
    fresh: list[tuple[Any, ...]]
    known: list[tuple[Any, ...]]

    def keys(self) -> list[Any]:
        return [row[0] for row in self.fresh] + [row[0] for row in self.known]


def _upserts(rows: dict[str, Any], cls: type[Any], written: dict[Any, None]) -> _Upserts:
    columns, values = _upsert_rows(list(rows.values()), cls)
    fresh, known = [], []
    for row in values:
        (known if row[0] in written else fresh).append(row)
    return _Upserts(columns, fresh, known)


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.rollback()
    except duckdb.Error:
        pass  # no transaction was open (a failed commit ends it)


def _apply(con: duckdb.DuckDBPyConnection, batches: dict[str, Any], *, strict: bool,
           by_position: bool = True) -> None:
    """Write the batches in one transaction: ``event_batch`` (an Arrow table) and the
    upserts (``requests``, ``messages``, ``tool_executions``: :class:`_Upserts`).

    Each statement costs DuckDB 2.0 about 1 ms of CPU however few its rows (2–3 on a slow
    machine), a registered view about 0.5 ms more to register and drop, an upsert (an
    appender's ``action="upsert"``, or ``INSERT … ON CONFLICT``) 2–3 times a plain insert:
    the hot path avoids all three. The events go in through a relation over their Arrow
    table (``from_arrow(…).insert_into``), in the order of the events table
    (:data:`EVENT_COLUMNS`; a file whose columns differ is written by name). A table's
    ``fresh`` rows are appended (a key already in the file raises ``ConstraintException``),
    its ``known`` ones updated by key in one statement (:class:`_Stale` when one is
    missing). Not ``strict`` (the retry after either): events already stored are skipped
    and every other row goes through an upsert appender (it replaces the row with its key).
    """
    con.begin()
    events = batches.get("event_batch")
    if events is not None:
        if strict and by_position:
            con.from_arrow(events).insert_into("events")
        else:  # (``relation.query`` would report a NOT NULL failure as a TransactionException)
            verb = "INSERT" if strict else "INSERT OR IGNORE"
            con.register("event_batch", events)
            try:
                con.execute(f"{verb} INTO events BY NAME SELECT * FROM event_batch")
            finally:
                with contextlib.suppress(duckdb.Error):
                    con.unregister("event_batch")
    for table in _ROW_TYPES:
        upserts: _Upserts | None = batches.get(table)
        if upserts is None:
            continue
        if not strict or len(upserts.known) > _UPDATE_MAX_ROWS:
            rows, known = upserts.fresh + upserts.known, []
            action = "upsert"
        else:
            rows, known, action = upserts.fresh, upserts.known, None
        if rows:
            appender = (con.appender(table, columns=upserts.columns, action=action) if action
                        else con.appender(table, columns=upserts.columns))
            try:
                appender.append_rows(rows)
                appender.flush()
            except BaseException:
                appender.clear()  # the batch is split and retried: never apply these later
                raise
        if known:
            _update(con, table, upserts.columns, known)
    con.commit()


def _update(con: duckdb.DuckDBPyConnection, table: str, columns: list[str],
            rows: list[tuple[Any, ...]]) -> None:
    """Replace rows by their key (the first column) in one statement; :class:`_Stale`
    unless every one of them was there."""
    key = columns[0]
    row = "(" + ", ".join("?" * len(columns)) + ")"
    sets = ", ".join(f"{column} = v.{column}" for column in columns[1:])
    ((updated,),) = con.execute(
        f"UPDATE {table} SET {sets} FROM (VALUES {', '.join([row] * len(rows))}) "
        f"AS v({', '.join(columns)}) WHERE {table}.{key} = v.{key}",
        [value for values in rows for value in values]).fetchall()
    if updated != len(rows):
        raise _Stale(f"{table}: {updated} of {len(rows)} rows found to update")


_EPOCH: Final = datetime.datetime(1970, 1, 1)


def _upsert_rows(rows: list[Any], cls: type[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The columns and value tuples of dataclass rows; epoch times as naive UTC datetimes
    (the columns are ``TIMESTAMP``, UTC)."""
    names = [field.name for field in dataclasses.fields(cls)]
    times = [i for i, name in enumerate(names) if name in _TIME_FIELDS]
    out = []
    for row in rows:
        values = [getattr(row, name) for name in names]
        for i in times:
            micros = _micros(values[i])
            values[i] = None if micros is None else _EPOCH + datetime.timedelta(microseconds=micros)
        out.append(tuple(values))
    return names, out


EVENT_COLUMNS: Final = ("request_id", "seq", "ts", "type", "stream_id", "agent", "depth",
                        "visibility", "data")


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


_ROW_TYPES: Final[dict[str, type[Any]]] = {
    "requests": RequestRow, "messages": MessageRow, "tool_executions": ToolExecutionRow}
_TIME_FIELDS: Final = frozenset({"started_at", "finished_at", "created_at", "updated_at"})
# A conversation's earlier messages for memory, oldest first (see load_history).
HISTORY_SQL: Final = """
SELECT role, content FROM (
    SELECT role, content, created_at, ordinal FROM messages
    WHERE conversation_id = ? AND request_id IS DISTINCT FROM ?
      AND (role <> 'assistant' OR (status IN ('complete', 'cancelled') AND content <> ''))
    ORDER BY created_at DESC, ordinal DESC
    LIMIT ?
) ORDER BY created_at, ordinal
"""
_MESSAGE_FIELDS: Final = tuple(field.name for field in dataclasses.fields(MessageRow))


def _message_row(values: Sequence[Any]) -> MessageRow:
    """A messages row as read back (times as epoch seconds again)."""
    fields = dict(zip(_MESSAGE_FIELDS, values, strict=True))
    for name in ("created_at", "updated_at"):
        value = fields[name]
        fields[name] = (value - _EPOCH).total_seconds() if value is not None else 0.0
    return MessageRow(**fields)

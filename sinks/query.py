"""Read-only SQL for analysts: a guard that refuses what is not a plain read, and a runner.

DuckDB runs SQL with the full power of the process (files, network, extensions), and the
server's database is open read-write, so the query path checks every statement before it
runs, with DuckDB's own parser rather than regular expressions:

1. ``extract_statements``: exactly one statement, of type ``SELECT`` (which covers
   ``FROM …``, ``DESCRIBE``, ``SUMMARIZE``, ``SHOW``, ``VALUES``, set operations) or
   ``EXPLAIN [ANALYZE] <select>``. ``INSERT``, ``COPY``, ``ATTACH``, ``SET``, ``PRAGMA``,
   ``LOAD``/``INSTALL``, ``CALL`` … are refused by type, naming what they would do.
2. ``json_serialize_sql``: the whole parse tree of the ``SELECT`` is walked. Refused are
   data-modifying CTEs (``WITH x AS (DELETE … RETURNING *)``, which DuckDB 2.0 parses as a
   ``SELECT``), table functions outside a small allowlist (``read_csv``, ``read_parquet``,
   ``glob``, ``read_text``, ``query`` … are not on it), tables that are not in the catalog
   (a replacement scan: ``FROM '/etc/passwd'``, ``FROM 'https://…'``, or a Python
   variable's name), functions that are not loaded (they would make DuckDB install and
   load an extension) and a few scalar functions with side effects (``nextval``,
   ``setseed``, ``sleep_ms``, ``write_log`` …).
3. What passes runs in a ``BEGIN TRANSACTION READ ONLY`` that is always rolled back, on a
   cursor of its own, wrapped as ``SELECT * FROM (<query>) LIMIT max_rows + 1`` (so the
   engine stops early and a truncated answer says so), with a timer that calls
   ``interrupt()`` after ``timeout_s``.

For defence in depth, :func:`harden` turns DuckDB's own switches (no file or network
access, no extension auto-install) on for the whole database instance; the export writes
Parquet through pyarrow, so it works with them on.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import decimal
import io
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Final

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import PipelineError

# -- errors ------------------------------------------------------------------------------


class QueryError(PipelineError):
    """A query that failed in DuckDB (syntax, unknown column, …); ``code`` for the API."""

    code: str = "query_error"


class QueryRefusedError(QueryError):
    """A statement the read-only path does not run. ``what`` names the refused thing."""

    code = "query_refused"

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"refused {what}: {why}. /v1/query runs one read-only SELECT over the "
                         "store's tables and views")
        self.what = what


class QueryTimeoutError(QueryError):
    """The query ran longer than its timeout and was interrupted."""

    code = "query_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the query ran longer than {timeout_s:g}s (QUERY_TIMEOUT_S) and was "
                         "interrupted; filter or aggregate more, or query the Parquet export")
        self.timeout_s = timeout_s


# -- what is refused, and why --------------------------------------------------------------

_STATEMENT_REFUSALS: Final[dict[str, str]] = {
    "INSERT": "it writes to the store",
    "UPDATE": "it writes to the store",
    "DELETE": "it writes to the store",
    "CREATE": "it changes the schema",
    "DROP": "it changes the schema",
    "ALTER": "it changes the schema",
    "ATTACH": "it attaches another database (a file)",
    "DETACH": "it detaches a database",
    "COPY": "it copies data to or from files",
    "COPY_DATABASE": "it copies a database",
    "EXPORT": "it writes files",
    "LOAD": "it installs or loads an extension",
    "SET": "it changes settings",
    "VARIABLE_SET": "it changes settings",
    "PRAGMA": "pragmas change settings or read files; use SELECT * FROM pragma_table_info('events') "
              "or DESCRIBE events",
    "CALL": "it calls a procedure (e.g. checkpoint)",
    "TRANSACTION": "it controls transactions",
    "VACUUM": "it rewrites the store",
    "ANALYZE": "it rewrites statistics",
    "PREPARE": "it prepares statements",
    "EXECUTE": "it runs prepared statements",
    "MULTI": "it runs several statements (PIVOT without an IN list does)",
    "LOGICAL_PLAN": "it is not a query",
    "EXTENSION": "it runs an extension's statement",
    "UPDATE_EXTENSIONS": "it installs extensions",
    "RELATION": "it is not a query",
}

# Table functions a read may use: generators, unnesting, JSON walking, catalog listings.
# Everything else (read_*, parquet_*, glob, sniff_csv, query, query_table, checkpoint,
# json_execute_serialized_sql, duckdb_secrets, …) is refused.
ALLOWED_TABLE_FUNCTIONS: Final[frozenset[str]] = frozenset({
    "range", "generate_series", "unnest", "repeat", "json_each", "json_tree",
    "histogram", "histogram_values", "summary",
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_dependencies",
    "duckdb_functions", "duckdb_indexes", "duckdb_keywords", "duckdb_schemas",
    "duckdb_tables", "duckdb_types", "duckdb_views",
    "pragma_table_info", "pragma_show", "pragma_database_size", "pragma_storage_info",
    "pragma_version", "pragma_platform", "pragma_collations",
    "icu_calendar_names", "pg_timezone_names", "test_all_types",
})

_FILE_FUNCTION = re.compile(
    r"^(read_|parquet_|sniff_csv|glob|.*_scan$|iceberg|delta|sqlite|postgres|mysql|excel|st_read)"
)
_SQL_FROM_STRING: Final = frozenset({"query", "query_table", "json_execute_serialized_sql"})

# Scalar functions that are loaded but change state or stall.
REFUSED_FUNCTIONS: Final[dict[str, str]] = {
    "nextval": "it advances a sequence",
    "setval": "it sets a sequence",
    "currval": "it reads sequence state",
    "setseed": "it changes the session's random seed",
    "sleep_ms": "it only waits",
    "pg_sleep": "it only waits",
    "write_log": "it writes to the log",
    "json_execute_serialized_sql": "it runs SQL from a string",
}

# Parse-tree node types that read (anything else that ends in _NODE modifies: DELETE_QUERY_NODE…).
_READ_NODES: Final = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
_EXPLAIN = re.compile(r"^\s*explain(\s+analy[sz]e)?\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedQuery:
    """A statement that passed the guard, and the SQL to run for it."""

    statement: str
    run_sql: str
    limited: bool


def _one_statement(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    if not sql.strip():
        raise QueryError("the query is empty")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse the query: {exc}") from exc
    if not statements:
        raise QueryError("the query holds no statement")
    if len(statements) > 1:
        kinds = ", ".join(_type_name(s) for s in statements)
        raise QueryRefusedError(f"{len(statements)} statements ({kinds})",
                                "send one statement per request")
    return statements[0]


def _type_name(statement: Any) -> str:
    return str(statement.type).rsplit(".", 1)[-1]


def check_query(con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int) -> CheckedQuery:
    """Refuse anything but one read-only statement; return what to run.

    Args:
        con: A cursor on the store's database (its catalog decides which tables exist).
        sql: The analyst's SQL.
        max_rows: The row limit; the SQL to run fetches at most one row more.

    Raises:
        QueryRefusedError: The statement writes, attaches, loads, sets, copies or reads files.
        QueryError: It does not parse.
    """
    statement = _one_statement(con, sql)
    kind = _type_name(statement)
    text = statement.query.strip().rstrip(";").strip()
    if kind == "EXPLAIN":
        match = _EXPLAIN.match(text)
        if match is None:
            raise QueryRefusedError("EXPLAIN", "it must read EXPLAIN [ANALYZE] SELECT …")
        inner = _one_statement(con, text[match.end():])
        if _type_name(inner) != "SELECT":
            raise QueryRefusedError(f"EXPLAIN {_type_name(inner)}",
                                    _STATEMENT_REFUSALS.get(_type_name(inner), "it is not a SELECT"))
        _check_tree(con, inner.query)
        return CheckedQuery(statement=text, run_sql=text, limited=False)
    if kind != "SELECT":
        raise QueryRefusedError(f"{kind.replace('_', ' ')} statement",
                                _STATEMENT_REFUSALS.get(kind, "it is not a SELECT"))
    _check_tree(con, text)
    # A newline before ")" so a trailing -- comment cannot swallow it.
    return CheckedQuery(statement=text, run_sql=f"SELECT * FROM (\n{text}\n) LIMIT {max_rows + 1}",
                        limited=True)


def _check_tree(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    raw = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    tree = json.loads(raw)
    if tree.get("error"):
        raise QueryRefusedError("this statement", f"it cannot be checked ({tree.get('error_message')})")
    tables: list[tuple[str, str, str]] = []
    functions: set[str] = set()
    for node, ctes in _walk(tree, frozenset()):
        node_type = node.get("type")
        if isinstance(node_type, str) and node_type.endswith("_NODE") and node_type not in _READ_NODES:
            verb = node_type.removesuffix("_QUERY_NODE").removesuffix("_NODE")
            raise QueryRefusedError(f"a {verb} inside the query (a data-modifying CTE)",
                                    "it writes to the store")
        if node_type == "TABLE_FUNCTION":
            name = str(node.get("function", {}).get("function_name", "")).lower()
            if name not in ALLOWED_TABLE_FUNCTIONS:
                raise QueryRefusedError(f"the table function {name}()", _table_function_reason(name))
        elif node_type == "BASE_TABLE":
            name = str(node.get("table_name", ""))
            schema = str(node.get("schema_name") or "")
            catalog = str(node.get("catalog_name") or "")
            if not schema and not catalog and name.lower() in ctes:
                continue
            tables.append((catalog, schema, name))
        elif node.get("class") in ("FUNCTION", "WINDOW", "AGGREGATE"):
            name = str(node.get("function_name", "")).lower()
            if name in REFUSED_FUNCTIONS:
                raise QueryRefusedError(f"the function {name}()", REFUSED_FUNCTIONS[name])
            if name:
                functions.add(name)
    _check_tables(con, tables)
    _check_functions(con, functions)


def _table_function_reason(name: str) -> str:
    if name in _SQL_FROM_STRING:
        return "it runs SQL from a string"
    if _FILE_FUNCTION.match(name):
        return "it reads files or URLs"
    if name in ("checkpoint", "force_checkpoint"):
        return "it writes the store"
    return f"only these table functions are allowed: {', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))}"


def _walk(node: Any, ctes: frozenset[str]) -> Iterator[tuple[dict[str, Any], frozenset[str]]]:
    """Every dict in the parse tree, with the CTE names visible where it stands."""
    if isinstance(node, dict):
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict) and cte_map.get("map"):
            ctes = ctes | {str(entry.get("key", "")).lower() for entry in cte_map["map"]}
        yield node, ctes
        for value in node.values():
            yield from _walk(value, ctes)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, ctes)


def _looks_like_path(name: str) -> bool:
    return any(ch in name for ch in "/\\.:~*?") or name.startswith("$")


def _check_tables(con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str, str]]) -> None:
    if not tables:
        return
    known = con.execute(
        """
        SELECT lower(database_name), lower(schema_name), lower(table_name) FROM duckdb_tables()
        UNION ALL
        SELECT lower(database_name), lower(schema_name), lower(view_name) FROM duckdb_views()
        """
    ).fetchall()
    for catalog, schema, name in tables:
        wanted = (catalog.lower(), schema.lower(), name.lower())
        if not any(_matches(wanted, entry) for entry in known):
            if _looks_like_path(name):
                raise QueryRefusedError(f"reading {name!r}", "it names a file or URL, not a table")
            qualified = ".".join(part for part in (catalog, schema, name) if part)
            raise QueryRefusedError(f"the table {qualified!r}",
                                    "it is not a table or view of the store")


def _matches(wanted: tuple[str, str, str], entry: tuple[str, str, str]) -> bool:
    catalog, schema, name = wanted
    if name != entry[2]:
        return False
    if catalog and catalog != entry[0]:
        return False
    if schema:
        return schema == entry[1]
    if catalog:
        return entry[1] == "main"
    # Unqualified: resolved through the search path (main of any catalog, or the system's).
    return entry[1] in ("main", "pg_catalog", "information_schema")


def _check_functions(con: duckdb.DuckDBPyConnection, functions: set[str]) -> None:
    if not functions:
        return
    names = sorted(functions)
    found = {row[0] for row in con.execute(
        "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE lower(function_name) IN "
        f"({', '.join('?' for _ in names)})", names,
    ).fetchall()}
    missing = [name for name in names if name not in found]
    if missing:
        raise QueryRefusedError(f"the function {missing[0]}()",
                                "it is not loaded, and queries do not install or load extensions")


# -- running ---------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class QueryResult:
    """Columns, rows (Python values as DuckDB gives them) and whether rows were cut off."""

    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    elapsed_ms: float
    #: Each row as JSON text, when the runner already serialised it (to bound the bytes).
    encoded: list[str] | None = None

    def to_json_text(self) -> str:
        """:meth:`to_json` as compact JSON text (reusing the rows serialised while fetched)."""
        if self.encoded is None or len(self.encoded) != len(self.rows):
            return json.dumps(self.to_json(), separators=(",", ":"))
        head = json.dumps({"columns": self.columns, "types": self.types},
                          separators=(",", ":"))[:-1]
        tail = json.dumps({"row_count": len(self.rows), "truncated": self.truncated,
                           "elapsed_ms": round(self.elapsed_ms)}, separators=(",", ":"))[1:]
        return f'{head},"rows":[{",".join(self.encoded)}],{tail}'

    def to_json(self) -> dict[str, Any]:
        """``{"columns", "types", "rows", "row_count", "truncated", "elapsed_ms"}``, JSON-safe."""
        return {
            "columns": self.columns,
            "types": self.types,
            "rows": [[json_safe(value) for value in row] for row in self.rows],
            "row_count": len(self.rows),
            "truncated": self.truncated,
            "elapsed_ms": round(self.elapsed_ms),  # whole ms, as every *_ms on the wire
        }

    def to_csv(self) -> str:
        """RFC 4180 CSV with a header; nested values as JSON, NULL as an empty field."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_csv_value(value) for value in row])
        return out.getvalue()


def json_safe(value: Any) -> Any:
    """A DuckDB value as JSON: times in ISO 8601, decimals as numbers, bytes in base64,
    UUIDs as strings, NaN and infinities as null, maps and structs as objects."""
    match value:
        case None | bool() | int() | str():
            return value
        case float():
            return value if math.isfinite(value) else None
        case decimal.Decimal():
            return int(value) if value == value.to_integral_value() else float(value)
        case dt.datetime() | dt.date() | dt.time():
            return value.isoformat()
        case dt.timedelta():
            return value.total_seconds()
        case bytes() | bytearray() | memoryview():
            return base64.b64encode(bytes(value)).decode("ascii")
        case uuid.UUID():
            return str(value)
        case dict():
            return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
        case list() | tuple():
            return [json_safe(v) for v in value]
        case _:
            return str(value)


def _csv_value(value: Any) -> Any:
    safe = json_safe(value)
    if safe is None:
        return ""
    if isinstance(safe, dict | list):
        return json.dumps(safe, separators=(",", ":"))
    return safe


_cursor_lock = threading.Lock()


class _Deadline:
    """Interrupts a cursor after ``timeout_s`` unless stopped first."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, timeout_s: float) -> None:
        self.fired = False
        self._cur = cur
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                self._cur.interrupt()

    def stop(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


_FETCH_ROWS = 1024


def _fetch_rows(result: Any, *, max_rows: int, max_bytes: int | None, deadline: float,
                timeout_s: float) -> tuple[list[tuple[Any, ...]], list[str] | None, bool]:
    """Rows in chunks, each serialised to JSON as it comes when ``max_bytes`` is set, so
    neither the rows held nor the time spent outgrow the limits: ``(rows, encoded,
    cut)``, ``cut`` when the bytes ran out first."""
    rows: list[tuple[Any, ...]] = []
    encoded: list[str] | None = [] if max_bytes is not None else None
    size = 0
    while len(rows) <= max_rows:
        chunk = result.fetchmany(_FETCH_ROWS)
        if not chunk:
            break
        for row in chunk:
            if encoded is not None and max_bytes is not None:
                text = json.dumps([json_safe(value) for value in row], separators=(",", ":"))
                size += len(text) + 1
                if size > max_bytes:
                    return rows, encoded, True
                encoded.append(text)
            rows.append(row)
        if time.perf_counter() > deadline:
            raise QueryTimeoutError(timeout_s)
    return rows, encoded, False


def _fetch_arrow(relation: Any, *, max_bytes: int | None, deadline: float,
                 timeout_s: float) -> tuple[pa.Table, bool]:
    """The relation as Arrow record batches, stopping once ``max_bytes`` are held."""
    reader = relation.to_arrow_reader(256)
    batches: list[pa.RecordBatch] = []
    size = 0
    cut = False
    for batch in reader:
        if max_bytes is not None and size + batch.nbytes > max_bytes:
            fits = int((max_bytes - size) // max(1.0, batch.nbytes / max(1, batch.num_rows)))
            if fits > 0:
                batches.append(batch.slice(0, fits))
            cut = True
            break
        size += batch.nbytes
        batches.append(batch)
        if time.perf_counter() > deadline:
            raise QueryTimeoutError(timeout_s)
    return pa.Table.from_batches(batches, schema=reader.schema), cut


def _run(
    con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int, timeout_s: float, arrow: bool,
    fresh_cursor: bool, max_bytes: int | None = None,
) -> tuple[CheckedQuery, Any, list[str], list[str], float, list[str] | None, bool]:
    started = time.perf_counter()
    ends = started + timeout_s
    if fresh_cursor:
        with _cursor_lock:  # cursor() on a shared connection, from worker threads
            cur = con.cursor()
    else:
        cur = con
    began = False
    try:
        checked = check_query(cur, sql, max_rows=max_rows)
        cur.execute("BEGIN TRANSACTION READ ONLY")
        began = True
        deadline = _Deadline(cur, timeout_s)
        encoded: list[str] | None = None
        try:
            if arrow:
                relation = cur.sql(checked.run_sql)
                columns, types = list(relation.columns), [str(t) for t in relation.types]
                data, cut = _fetch_arrow(relation, max_bytes=max_bytes, deadline=ends,
                                         timeout_s=timeout_s)
            else:
                result = cur.execute(checked.run_sql)
                columns = [d[0] for d in result.description or []]
                types = [str(d[1]) for d in result.description or []]
                data, encoded, cut = _fetch_rows(result, max_rows=max_rows, max_bytes=max_bytes,
                                                 deadline=ends, timeout_s=timeout_s)
        except duckdb.InterruptException as exc:
            raise QueryTimeoutError(timeout_s) from exc
        except duckdb.Error as exc:
            if deadline.fired:
                raise QueryTimeoutError(timeout_s) from exc
            message = str(exc)
            if "read-only" in message:  # the READ ONLY transaction caught a write
                raise QueryRefusedError("this statement", "it writes to the store") from exc
            if isinstance(exc, duckdb.PermissionException):
                raise QueryRefusedError("this statement", message) from exc
            raise QueryError(message) from exc
        finally:
            deadline.stop()
    finally:
        if fresh_cursor:
            cur.close()  # rolls the read-only transaction back
        elif began:
            cur.execute("ROLLBACK")
    return checked, data, columns, types, (time.perf_counter() - started) * 1000, encoded, cut


def run_query(
    con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int = 10_000, timeout_s: float = 10.0,
    fresh_cursor: bool = True, max_bytes: int | None = None,
) -> QueryResult:
    """Check ``sql`` and run it read-only on a new cursor of ``con`` (blocking).

    Args:
        con: A connection (or cursor) on the store's database; it is not used itself,
            only asked for a cursor, so any thread may call this at once.
        sql: One read-only statement.
        max_rows: At most this many rows come back; ``truncated`` says whether there were more.
        timeout_s: The query is interrupted after this long; fetching (and, with
            ``max_bytes``, serialising) the rows counts too.
        max_bytes: Rows stop (``truncated``) before their JSON grows past this; they are
            serialised as they are fetched (:meth:`QueryResult.to_json_text` reuses it).
        fresh_cursor: False runs on ``con`` itself (one thread only), so it sees ``con``'s
            temporary views (the CLI on a read-only file).

    Raises:
        QueryRefusedError, QueryTimeoutError, QueryError.
    """
    checked, rows, columns, types, elapsed, encoded, cut = _run(
        con, sql, max_rows=max_rows, timeout_s=timeout_s, arrow=False,
        fresh_cursor=fresh_cursor, max_bytes=max_bytes)
    truncated = cut or (checked.limited and len(rows) > max_rows)
    return QueryResult(columns=columns, types=types, rows=rows[:max_rows], truncated=truncated,
                       elapsed_ms=elapsed,
                       encoded=encoded[:max_rows] if encoded is not None else None)


def run_query_arrow(
    con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int = 10_000, timeout_s: float = 10.0,
    max_bytes: int | None = None,
) -> tuple[pa.Table, bool]:
    """Like :func:`run_query`, as an Arrow table (for Parquet); returns ``(table, truncated)``;
    ``max_bytes`` bounds the Arrow data held."""
    checked, table, _columns, _types, _elapsed, _encoded, cut = _run(
        con, sql, max_rows=max_rows, timeout_s=timeout_s, arrow=True, fresh_cursor=True,
        max_bytes=max_bytes)
    truncated = cut or (checked.limited and table.num_rows > max_rows)
    return table.slice(0, max_rows), truncated


def parquet_bytes(table: pa.Table) -> bytes:
    """One Parquet file (zstd) holding ``table``."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def harden(con: duckdb.DuckDBPyConnection) -> None:
    """Turn DuckDB's own guards on for the whole database instance ``con`` belongs to.

    No file or network access from SQL (``read_csv``, ``COPY``, ``ATTACH`` of a file),
    no automatic install or load of extensions. These are global and cannot be turned
    back on while the database is open, so call it once, right after the store opens.
    Registered Arrow tables (the store's bulk inserts) and ``CHECKPOINT`` keep working.
    """
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")


PARQUET_TYPE: Final[str] = "application/vnd.apache.parquet"


@dataclasses.dataclass(frozen=True, slots=True)
class QueryAnswer:
    """A ``/v1/query`` answer ready to send: its body, content type and row counts."""

    body: bytes
    content_type: str
    rows: int
    truncated: bool


def answer_query(con: duckdb.DuckDBPyConnection, sql: str, fmt: str, *, max_rows: int,
                 timeout_s: float, max_bytes: int | None) -> QueryAnswer:
    """Run ``sql`` as ``/v1/query`` does and serialise it as ``fmt`` (``json``, ``csv`` or
    ``parquet``), blocking: fetching and serialising share the thread and the timeout (JSON
    rows are serialised as they are fetched, up to ``max_bytes``). The same code answers in
    the server and, for the worker role, in the recorder process.

    Raises:
        QueryRefusedError, QueryTimeoutError, QueryError.
    """
    limits: dict[str, Any] = {"max_rows": max_rows, "timeout_s": timeout_s,
                              "max_bytes": max_bytes}
    if fmt == "parquet":
        table, truncated = run_query_arrow(con, sql, **limits)
        return QueryAnswer(parquet_bytes(table), PARQUET_TYPE, table.num_rows, truncated)
    result = run_query(con, sql, **limits)
    if fmt == "csv":
        return QueryAnswer(result.to_csv().encode(), "text/csv", len(result.rows),
                           result.truncated)
    return QueryAnswer(result.to_json_text().encode(), "application/json", len(result.rows),
                       result.truncated)

"""The Parquet lake: the store's history as files any tool can read while the server runs.

Layout (Hive partitioning, so ``read_parquet(…, hive_partitioning = true)``, pandas,
polars and Spark see a ``date`` column)::

    <lake>/events/date=YYYY-MM-DD/part-<run>.parquet      by the event's ts
    <lake>/requests/date=YYYY-MM-DD/part-<run>.parquet    by started_at
    <lake>/messages/date=YYYY-MM-DD/part-<run>.parquet    by created_at
    <lake>/tool_executions/date=…/part-<run>.parquet      by started_at
    <lake>/_export_state.json                             the last committed run

What is exported is whole *closed* requests: a request goes out, with its row, its
messages and all its events, once it has its ``done`` event (or, failing that, a final
status), so every row is final when written and no file ever needs rewriting. Each
request is exported exactly once: a run takes the closed requests that are not yet in the
lake (the ``request_id`` column of the lake's ``requests`` files is the ledger, read once
per process and then only for new files), so a request whose close is stamped earlier than
the previous run (clock steps, recovered crashes) is not skipped either. Requests closed
in the last ``settle_s`` wait for the next run, which leaves rows still in the store's
write queue time to land (the server also flushes the store first).

``<run>`` is the run's cutoff in epoch microseconds, increasing from run to run. Files
are written to a hidden temporary name in their final folder and renamed into place
(``os.replace``), so a reader sees whole files or none. A run commits by recording its id
in ``_export_state.json`` last; files of a run that died before that carry an id above
the committed one, and the next run deletes them before it writes those requests again.
Parquet is written by pyarrow from Arrow batches, so the export needs no file access
inside DuckDB.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Final

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

TABLES: Final[dict[str, str]] = {
    "events": "ts", "messages": "created_at", "tool_executions": "started_at", "requests": "started_at",
}
"""Each exported table and the timestamp column its files are partitioned by (its UTC date),
in the order a run writes them: ``requests`` last (a request's row in the lake means the
rest of it is there). A table the store does not have (an older file) is skipped."""

ORDER: Final[dict[str, str]] = {
    "events": "request_id, seq", "requests": "started_at, request_id",
    "messages": "created_at, request_id, ordinal", "tool_executions": "started_at, execution_id",
}
STATE_FILE: Final = "_export_state.json"
_PART = re.compile(r"^part-(\d+)\.parquet$")

# The requests a run exports: closed by the cutoff and not yet in the lake.
_BATCH: Final = """
WITH closed AS (
    SELECT request_id, max(ts) AS closed_at FROM events WHERE type = 'done' GROUP BY request_id
    UNION ALL
    SELECT r.request_id, coalesce(r.finished_at, r.started_at) FROM requests r
    WHERE r.status <> 'running'
      AND NOT EXISTS (SELECT 1 FROM events e WHERE e.request_id = r.request_id AND e.type = 'done')
)
SELECT DISTINCT request_id FROM closed
WHERE closed_at <= $hi AND request_id NOT IN (SELECT request_id FROM exported_ids)
"""

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclasses.dataclass(frozen=True, slots=True)
class LakeFile:
    """One Parquet file of the lake; ``path`` is relative to the lake folder."""

    table: str
    date: str
    path: str
    rows: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class ExportReport:
    """What one export run wrote."""

    lake: str
    files: list[LakeFile]
    rows: dict[str, int]
    requests: int
    watermark: str | None
    previous_watermark: str | None
    elapsed_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "lake": self.lake, "files": [f.to_json() for f in self.files], "rows": self.rows,
            "requests": self.requests, "watermark": self.watermark,
            "previous_watermark": self.previous_watermark, "elapsed_ms": round(self.elapsed_ms),
        }


def _lock_for(lake: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(lake, threading.Lock())


def _micros_to_dt(micros: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=micros)


def _iso(micros: int | None) -> str | None:
    return None if micros is None else _micros_to_dt(micros).isoformat() + "Z"


def read_state(lake: Path) -> dict[str, Any]:
    """The export state: ``last_run`` (the last committed run's id), ``runs``, ``watermark``."""
    try:
        state: dict[str, Any] = json.loads((lake / STATE_FILE).read_text())
    except FileNotFoundError:
        return {"version": 2, "last_run": 0, "runs": 0, "watermark": None}
    return state


def _write_atomically(path: Path, write: Any) -> None:
    """Write through a hidden temporary file in the same folder, then rename into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Ledger:
    """The request ids already in a lake, read from its ``requests`` files (cached per file)."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.ids: set[str] = set()

    def update(self, lake: Path) -> pa.Table:
        present = {str(p.relative_to(lake)) for p in (lake / "requests").glob("date=*/part-*.parquet")}
        if not self.files <= present:  # a file went away: read everything again
            self.files, self.ids = set(), set()
        for name in sorted(present - self.files):
            self.ids.update(pq.read_table(lake / name, columns=["request_id"])
                            .column("request_id").to_pylist())
            self.files.add(name)
        return pa.table({"request_id": pa.array(sorted(self.ids), pa.string())})


_ledgers: dict[Path, _Ledger] = {}


def export_lake(
    con: duckdb.DuckDBPyConnection, lake: Path | str, *, settle_s: float = 1.0,
    now: float | None = None,
) -> ExportReport:
    """Export the closed requests that are not in ``lake`` yet (blocking).

    Args:
        con: A connection on the store's database (only asked for a cursor) or a
            read-only connection on the file.
        lake: The lake folder (created).
        settle_s: Requests closed in the last ``settle_s`` wait for the next run, so rows
            still queued for the store are not missed; 0 when nothing writes (CLI).
        now: The clock (epoch seconds), for tests.

    Returns:
        The files written, rows per table and the run's cutoff (``watermark``).
    """
    started = time.perf_counter()
    lake = Path(lake).resolve()
    lake.mkdir(parents=True, exist_ok=True)
    with _lock_for(lake):
        state = read_state(lake)
        previous = state.get("watermark")
        last_run = int(state.get("last_run") or 0)
        cutoff = int(((time.time() if now is None else now) - settle_s) * 1_000_000)
        run = max(cutoff, last_run + 1)  # file names increase even if the clock steps back
        _remove_unfinished_runs(lake, last_run)
        exported = _ledgers.setdefault(lake, _Ledger()).update(lake)
        files: list[LakeFile] = []
        rows = dict.fromkeys(TABLES, 0)
        requests = 0
        cur = con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION READ ONLY")  # one snapshot for the three tables
            cur.register("exported_ids", exported)
            batch = cur.sql(_BATCH, params={"hi": _micros_to_dt(cutoff)}).to_arrow_table()
            cur.unregister("exported_ids")
            requests = batch.num_rows
            if requests:
                cur.register("export_batch", batch)
                present = {row[0] for row in cur.sql(
                    "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
                    "AND database_name = current_database()").fetchall()}
                for table in (t for t in TABLES if t in present):
                    written = _export_table(cur, lake, table, TABLES[table], run)
                    files.extend(written)
                    rows[table] = sum(f.rows for f in written)
                cur.unregister("export_batch")
        finally:
            cur.close()
        if files:
            state = {
                "version": 2, "last_run": run, "watermark": _iso(cutoff),
                "runs": int(state.get("runs", 0)) + 1,
                "last_run_at": dt.datetime.now(dt.UTC).isoformat(),
                "last_run_requests": requests,
            }
            _write_atomically(lake / STATE_FILE,
                              lambda p: p.write_text(json.dumps(state, indent=2) + "\n"))
    return ExportReport(
        lake=str(lake), files=files, rows=rows, requests=requests,
        watermark=_iso(cutoff), previous_watermark=previous,
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )


def _export_table(
    cur: duckdb.DuckDBPyConnection, lake: Path, table: str, column: str, run: int
) -> list[LakeFile]:
    where = "request_id IN (SELECT request_id FROM export_batch)"
    dates = [row[0] for row in cur.sql(
        f"SELECT DISTINCT CAST({column} AS DATE) AS d FROM {table} WHERE {where} ORDER BY d"
    ).fetchall()]
    written: list[LakeFile] = []
    for day in dates:
        data: pa.Table = cur.sql(
            f"SELECT * FROM {table} WHERE {where} AND CAST({column} AS DATE) = $day "
            f"ORDER BY {ORDER[table]}",
            params={"day": day},
        ).to_arrow_table()
        folder = lake / table / f"date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"part-{run:017d}.parquet"
        _write_atomically(target, lambda p, d=data: pq.write_table(d, p, compression="zstd"))
        written.append(LakeFile(table=table, date=day.isoformat(),
                                path=str(target.relative_to(lake)), rows=data.num_rows,
                                bytes=target.stat().st_size))
    return written


def _remove_unfinished_runs(lake: Path, last_run: int) -> None:
    """Delete the files of runs that never committed (their id is above the last committed)."""
    for table in TABLES:
        for path in (lake / table).glob("date=*/*"):
            match = _PART.match(path.name)
            if (match and int(match.group(1)) > last_run) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)


def list_lake(lake: Path | str) -> list[LakeFile]:
    """Every Parquet file in the lake, by table, date and name."""
    lake = Path(lake)
    files: list[LakeFile] = []
    for table in TABLES:
        for path in sorted((lake / table).glob("date=*/part-*.parquet")):
            try:
                rows = pq.read_metadata(path).num_rows
                size = path.stat().st_size
            except (OSError, pa.ArrowException):  # replaced or removed meanwhile
                continue
            files.append(LakeFile(table=table, date=path.parent.name.removeprefix("date="),
                                  path=str(path.relative_to(lake)), rows=rows, bytes=size))
    return files


def lake_views_sql(lake: Path | str) -> str:
    """SQL that names the lake's files ``events``, ``requests``, ``messages`` … (as views, for
    the tables that have files), so :data:`sinks.views.VIEWS_SQL` and queries run on the lake."""
    lake = Path(lake)
    out = []
    for table in TABLES:
        if not any((lake / table).glob("date=*/*.parquet")):
            continue
        pattern = str(lake / table / "*" / "*.parquet").replace("'", "''")
        out.append(
            f"CREATE OR REPLACE VIEW {table} AS SELECT * EXCLUDE (date) FROM "
            f"read_parquet('{pattern}', hive_partitioning = true, union_by_name = true);\n"
        )
    return "".join(out)

"""Rows/s through the DuckDB event sink vs a raw Arrow bulk insert of the same rows.

Both variants write the same N numbered events (requests of ``--per-request`` events shaped
like a turn: request_received, route, memory, llm_call, stream_start, text…, token_usage,
stream_end, done) into the same schema (``sinks.store.SCHEMA``), each on a fresh DuckDB file
in a temporary folder, in the same run.

- **sink**: ``EventStore.append_event`` called at full speed for every event, then
  ``await store.flush()``; timed from the first append to the flush returning. The writer
  thread batches by count (``flush_max_rows``) and time, and builds an Arrow table per batch.
  Also reported: the producer-side enqueue cost (µs per ``append_event``: the time the event
  loop spends), the flush count and the mean flush time.
- **raw Arrow (baseline)**: on the calling thread, for each batch of the same size, build the
  Arrow table from the events (``model_dump_json`` for ``data`` included) and
  ``INSERT INTO events BY NAME SELECT * FROM tbl``.

Target: the sink ≥ 0.5× the raw bulk insert (rows/s). Median of ``--repeats`` runs; the
variants alternate. Store open/close (schema, ``CHECKPOINT``) is outside the timing.

Run: ``python bench/store_bench.py [--events N] [--batch ROWS] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import sinks  # noqa: F401
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import pyarrow as pa

from core.events import (
    Done,
    EventBase,
    LlmCall,
    Memory,
    RequestReceived,
    Route,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    stream_id_of,
    visibility,
)
from sinks.store import SCHEMA, EventStore

TARGET_RATIO = 0.5
AGENT = "assistant"
MODEL = "offline-1"

Row = tuple[EventBase, str | None, int | None]  # event, agent, depth (as the recorder passes)


def make_events(total: int, per_request: int) -> list[Row]:
    """``total`` numbered events in requests of ``per_request`` (>= 9) events."""
    rows: list[Row] = []
    request = 0
    while len(rows) < total:
        request += 1
        rid = f"req_{request:08d}"
        texts = max(per_request - 8, 1)
        turn: list[Row] = [
            (RequestReceived(agent=AGENT, conversation_id=f"conv_{request}"), AGENT, None),
            (Route(route="respond", reason="one model answers"), None, None),
            (Memory(messages_loaded=4), None, None),
            (LlmCall(stream_id=1, model=MODEL,
                     messages=[{"role": "user", "content": "hello there"}]), AGENT, 0),
            (StreamStart(stream_id=1, agent=AGENT, depth=0), AGENT, 0),
            *((Text(stream_id=1, delta=f"token {i % 97} "), AGENT, 0) for i in range(texts)),
            (TokenUsage(stream_id=1, model=MODEL, prompt_tokens=12, completion_tokens=texts,
                        total_tokens=12 + texts), AGENT, 0),
            (StreamEnd(stream_id=1, status="ok", finish_reason="stop"), AGENT, 0),
            (Done(ok=True, duration_ms=1234.5, reason="completed"), None, None),
        ]
        for seq, (event, _, _) in enumerate(turn, start=1):
            event.seq = seq
            event.request_id = rid
        rows.extend(turn[: total - len(rows)])
    return rows


# -- variant 1: the sink -----------------------------------------------------------------------
async def run_sink(
    rows: list[Row], path: Path, *, batch: int, label: str, parked: bool = False
) -> dict[str, float]:
    """Feed every row to ``append_event``, then ``await flush()``.

    ``parked`` keeps the writer asleep while the producer appends (a huge batch size and
    interval), to separate the intrinsic enqueue cost from contention with the writer.
    """
    if parked:
        store = EventStore(path, flush_max_rows=1 << 40, flush_interval_ms=1e9).open()
    else:
        store = EventStore(path, flush_max_rows=batch).open()
    flush_ms: list[float] = []
    write = store._write  # instrumented per instance: StoreStats keeps only the last flush

    def timed_write(*args: Any) -> Any:
        result = write(*args)
        flush_ms.append(store.stats.last_flush_ms)
        return result

    store._write = timed_write  # type: ignore[method-assign,assignment]
    try:
        gc.collect()
        append = store.append_event
        started = time.perf_counter()
        for event, agent, depth in rows:
            append(event, agent=agent, depth=depth)
        enqueued = time.perf_counter()
        lags: list[float] = []
        progress = asyncio.create_task(_progress(label, store, len(rows)))
        monitor = asyncio.create_task(_loop_lag(lags))
        try:
            await store.flush()
        finally:
            progress.cancel()
            monitor.cancel()
        finished = time.perf_counter()
        stats = store.stats
        if stats.events_written != len(rows) or stats.failed_flushes:
            raise SystemExit(f"sink wrote {stats.events_written}/{len(rows)} rows, "
                             f"{stats.failed_flushes} failed flushes: {stats.last_error}")
        return {
            "seconds": finished - started,
            "enqueue_us": (enqueued - started) / len(rows) * 1e6,
            "drain_s": finished - enqueued,
            "flushes": stats.flushes,
            "flush_ms": statistics.fmean(flush_ms) if flush_ms else 0.0,
            "flush_max_ms": max(flush_ms, default=0.0),
            "lag_p99_ms": _p99(lags),
            "lag_max_ms": max(lags, default=0.0),
        }
    finally:
        store.close()


async def _loop_lag(lags: list[float], *, tick_s: float = 0.001) -> None:
    """How late a 1 ms sleep wakes up (ms): the event loop stalls the writer causes."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(tick_s)
        lags.append((time.perf_counter() - started - tick_s) * 1000)


def _p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)] if values else 0.0


async def idle_lag(seconds: float = 1.0) -> list[float]:
    lags: list[float] = []
    monitor = asyncio.create_task(_loop_lag(lags))
    await asyncio.sleep(seconds)
    monitor.cancel()
    return lags


async def _progress(label: str, store: EventStore, total: int) -> None:
    while True:
        await asyncio.sleep(2.0)
        print(f"    {label}: {store.stats.events_written}/{total} rows written…",
              file=sys.stderr, flush=True)


# -- variant 2: raw Arrow bulk insert -------------------------------------------------------------
def arrow_table(rows: list[Row]) -> pa.Table:
    events = [event for event, _, _ in rows]
    return pa.table({
        "request_id": pa.array([e.request_id for e in events], pa.string()),
        "seq": pa.array([e.seq for e in events], pa.int64()),
        "ts": pa.array([int(e.ts * 1_000_000) for e in events], pa.timestamp("us")),
        "type": pa.array([getattr(e, "type") for e in events], pa.string()),  # noqa: B009
        "stream_id": pa.array([stream_id_of(e) for e in events], pa.int32()),
        "agent": pa.array([agent for _, agent, _ in rows], pa.string()),
        "depth": pa.array([depth for _, _, depth in rows], pa.int32()),
        "visibility": pa.array([visibility(e) for e in events], pa.string()),
        "data": pa.array([e.model_dump_json() for e in events], pa.string()),
    })


def run_raw(rows: list[Row], path: Path, *, batch: int, label: str) -> dict[str, float]:
    con = duckdb.connect(str(path))
    try:
        con.execute(SCHEMA)
        gc.collect()
        started = last_report = time.perf_counter()
        for start in range(0, len(rows), batch):
            tbl = arrow_table(rows[start:start + batch])  # noqa: F841 - read by DuckDB by name
            con.execute("INSERT INTO events BY NAME SELECT * FROM tbl")
            now = time.perf_counter()
            if now - last_report > 2.0:
                print(f"    {label}: {start + batch}/{len(rows)} rows written…",
                      file=sys.stderr, flush=True)
                last_report = now
        seconds = time.perf_counter() - started
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return {"seconds": seconds}


def verify(path: Path, expected: int) -> None:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT count(*), count(DISTINCT request_id) FROM events").fetchall()[0]
    finally:
        con.close()
    if row[0] != expected:
        raise SystemExit(f"{path.name}: {row[0]} rows stored, expected {expected}")


# -- driver --------------------------------------------------------------------------------------
async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000,
                        help="numbered events to write (default 200000)")
    parser.add_argument("--batch", type=int, default=2048,
                        help="rows per batch: the sink's flush_max_rows and the raw insert's "
                             "batch size (default 2048, the store's default)")
    parser.add_argument("--per-request", type=int, default=500,
                        help="events per request (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (default 3)")
    args = parser.parse_args()
    if args.events < 1 or args.batch < 1 or args.repeats < 1 or args.per_request < 9:
        parser.error("need events >= 1, batch >= 1, repeats >= 1, per-request >= 9")

    print(f"store_bench: building {args.events} events…", file=sys.stderr, flush=True)
    rows = make_events(args.events, args.per_request)
    sink_runs: list[dict[str, float]] = []
    raw_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="store_bench_") as tmp:
        folder = Path(tmp)
        # warm-up: DuckDB and pyarrow imports, pydantic serializers
        await run_sink(rows[:5_000], folder / "warm_sink.duckdb", batch=args.batch, label="warm")
        run_raw(rows[:5_000], folder / "warm_raw.duckdb", batch=args.batch, label="warm")
        idle = await idle_lag()
        for repeat in range(args.repeats):
            variants: list[tuple[str, Callable[[Path], Any]]] = [
                ("sink", lambda p: run_sink(rows, p, batch=args.batch, label="sink")),
                ("raw", lambda p: run_raw(rows, p, batch=args.batch, label="raw")),
            ]
            for name, run in variants:
                path = folder / f"{name}_{repeat}.duckdb"
                result = run(path)
                if asyncio.iscoroutine(result):
                    result = await result
                verify(path, len(rows))
                (sink_runs if name == "sink" else raw_runs).append(result)
                print(f"  run {repeat + 1}/{args.repeats} {name:<4} {result['seconds']:6.3f} s "
                      f"({len(rows) / result['seconds'] / 1000:6.1f} k rows/s)",
                      file=sys.stderr, flush=True)
                path.unlink()
        print("  context run: sink with the writer parked while appending…", file=sys.stderr,
              flush=True)
        path = folder / "sink_parked.duckdb"
        parked = await run_sink(rows, path, batch=args.batch, label="parked", parked=True)
        verify(path, len(rows))

    n = len(rows)
    sink_s = statistics.median(r["seconds"] for r in sink_runs)
    raw_s = statistics.median(r["seconds"] for r in raw_runs)
    ratio = raw_s / sink_s
    print()
    print(f"Store: {n} events ({args.per_request}/request), batches of {args.batch} rows, "
          f"fresh DuckDB {duckdb.__version__} file per run; median of {args.repeats} "
          f"(best in brackets)")
    print(f"{'variant':<34} {'rows/s':>10} {'best rows/s':>12} {'µs/row':>8} {'vs raw':>7}")
    for label, runs, seconds in (("sink (append_event … flush)", sink_runs, sink_s),
                                 ("raw Arrow INSERT … SELECT", raw_runs, raw_s)):
        best = min(r["seconds"] for r in runs)
        print(f"{label:<34} {n / seconds:>10,.0f} {n / best:>12,.0f} "
              f"{seconds / n * 1e6:>8.2f} {raw_s / seconds:>6.2f}×")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in sink_runs)
    print(f"sink producer side: {med('enqueue_us'):.2f} µs/append on the event loop "
          f"({med('enqueue_us') * n / 1e6 * 1000:.0f} ms for {n}); then "
          f"{med('drain_s') * 1000:.0f} ms until flush() returned")
    print(f"  (intrinsic, writer parked while appending: {parked['enqueue_us']:.2f} µs/append; "
          f"the rest is GIL contention with the writer thread and wake-ups)")
    print(f"sink writer: {med('flushes'):.0f} flushes, mean {med('flush_ms'):.1f} ms "
          f"(max {med('flush_max_ms'):.1f} ms) per flush")
    print(f"event-loop lag of a 1 ms sleep while the writer drains: p99 "
          f"{med('lag_p99_ms'):.1f} ms, max {med('lag_max_ms'):.1f} ms "
          f"(idle loop, same machine: p99 {_p99(idle):.1f} ms, max {max(idle):.1f} ms)")
    verdict = "MET" if ratio >= TARGET_RATIO else "NOT MET"
    print(f"target: sink ≥ {TARGET_RATIO}× raw bulk insert → {ratio:.2f}×  {verdict}")


if __name__ == "__main__":
    asyncio.run(main())

"""What one recorder sustains from the Redis log, beside the direct EventStore path (issue 13).

All in one run, against the Redis at ``--url`` (default the machine's, db 11, a fresh
prefix whose keys are deleted at the end), each variant on a fresh DuckDB file in a
temporary folder:

    direct         T turns of E events through a TurnRecorder each into an EventStore (the
                   single process's path), until a flush barrier returns
    recorder       the same T turns appended to the log first (announced, as workers do),
                   then one LogRecorder drains them into the store: from its start until
                   every turn is committed and acknowledged (XREADGROUP, XRANGE of each turn,
                   hiredis parsing, validation, the TurnRecorder, the store, XACK)
    redelivered    the recorder again over the same file (every entry pending again): each
                   turn is found stored and only acknowledged (the restart after a crash)
    duplicates     the direct path's cost of re-inserting rows the store has (the
                   ``INSERT OR IGNORE`` fallback after the strict insert fails), vs fresh rows

Reported: rows/s (event rows; the request, message and tool rows ride along), wall
seconds and this process's CPU per row (``time.process_time``: every thread, the store's
writer included; Redis's own work is not in it), median of ``--repeats``.

Run: ``python bench/recorder_bench.py [--turns T] [--events E] [--repeats R] [--url …]
[--prefix P]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from core.events import Done, Event, RequestReceived, StreamEnd, StreamStart, Text
from core.turn import TurnContext
from sinks.event_log import RedisEventLog
from sinks.log_recorder import LogRecorder
from sinks.recorder import TurnRecorder, turn_meta
from sinks.store import EventStore


def turn(request_id: str, events: int) -> tuple[TurnContext, list[Event]]:
    ctx = TurnContext(request_id=request_id, conversation_id=f"conv_{request_id}",
                      messages=[{"role": "user", "content": "hello"}], trace=False,
                      model="offline", max_tokens=None, kind="orchestrate")
    body: list[Event] = [RequestReceived(agent="assistant", conversation_id=ctx.conversation_id),
                         StreamStart(stream_id=1, agent="assistant"),
                         *(Text(stream_id=1, delta=f"token {i} ") for i in range(events - 4)),
                         StreamEnd(stream_id=1), Done(ok=True, duration_ms=1, reason="completed")]
    return ctx, [e.model_copy(update={"request_id": request_id, "seq": n})
                 for n, e in enumerate(body, start=1)]


def turns(count: int, events: int) -> list[tuple[TurnContext, list[Event]]]:
    tag = uuid.uuid4().hex[:6]
    return [turn(f"req_{tag}_{i}", events) for i in range(count)]


Timing = tuple[float, float]  # (wall seconds, process CPU seconds)


async def direct(path: Path, work: list[tuple[TurnContext, list[Event]]]) -> Timing:
    store = EventStore(path).open()
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for ctx, events in work:
            recorder = TurnRecorder(ctx, store=store)
            recorder.start()
            for event in events:
                recorder.on_next(event)
        await store.flush(timeout_s=600)
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        store.close()


async def fill_log(log: RedisEventLog, work: list[tuple[TurnContext, list[Event]]]) -> None:
    """Append every turn to the log, announced (as a worker does)."""
    for ctx, events in work:
        writer = log.writer(ctx.request_id, history=lambda e=events: e,  # type: ignore[misc]
                            meta=turn_meta(ctx, started_at=time.time()))
        for event in events:
            writer.on_next(event)
        writer.on_completed()
    for ctx, events in work:
        assert await log.appended(ctx.request_id, seq=events[-1].seq, within=120)


async def drain(path: Path, log: RedisEventLog, count: int, *, consumer: str) -> Timing:
    store = EventStore(path).open()
    recorder = LogRecorder(log, store, consumer=consumer, claim_idle_s=0, block_ms=100,
                           read_count=256)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        await recorder.start()
        # polling a counter (5 ms granularity, about 0.5% of the shortest run measured)
        while recorder.stats.turns_recorded < count:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        await recorder.aclose(drain_s=0)
        store.close()


async def redeliver(log: RedisEventLog, work: list[tuple[TurnContext, list[Event]]]) -> None:
    """Announce every turn again (what a crash before the XACK leaves)."""
    client = log.client
    pipe = client.pipeline(transaction=False)
    for ctx, _ in work:
        pipe.xadd(log.turns_key, {"r": ctx.request_id, "m": turn_meta(ctx, started_at=0.0)})
    await pipe.execute()


async def duplicates(path: Path, work: list[tuple[TurnContext, list[Event]]]
                     ) -> tuple[Timing, Timing]:
    store = EventStore(path).open()
    try:
        timings = []
        for _ in range(2):  # fresh rows, then the same rows again
            started, cpu = time.perf_counter(), time.process_time()
            for _, events in work:
                for event in events:
                    store.append_event(event, agent="assistant", depth=0)
            await store.flush(timeout_s=600)
            timings.append((time.perf_counter() - started, time.process_time() - cpu))
        return timings[0], timings[1]
    finally:
        store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--events", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--prefix", default="rec-bench", help="key prefix (a random tail is added)")
    args = parser.parse_args()
    rows = args.turns * args.events
    results: dict[str, list[Timing]] = {"direct": [], "recorder": [], "redelivered": [],
                                       "fresh rows": [], "duplicate rows": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            base = Path(folder)
            work = turns(args.turns, args.events)
            results["direct"].append(await direct(base / "direct.duckdb", work))
            fresh, dup = await duplicates(base / "dup.duckdb", work)
            results["fresh rows"].append(fresh)
            results["duplicate rows"].append(dup)
            prefix = f"{args.prefix}-{uuid.uuid4().hex[:8]}"
            log = RedisEventLog(args.url, prefix=prefix, batch_max=512, max_connections=32)
            await log.start()
            try:
                await fill_log(log, work)
                path = base / "recorder.duckdb"
                results["recorder"].append(await drain(path, log, args.turns, consumer="a"))
                await redeliver(log, work)
                results["redelivered"].append(await drain(path, log, args.turns, consumer="b"))
            finally:
                with contextlib.suppress(Exception):
                    keys = [k async for k in log.client.scan_iter(match=f"{prefix}:*", count=1000)]
                    if keys:
                        await log.client.delete(*keys)
                await log.aclose(timeout_s=1)
    print(f"{args.turns} turns x {args.events} events = {rows} event rows; median of "
          f"{args.repeats}")
    print(f"{'variant':<16}{'seconds':>10}{'rows/s':>12}{'CPU µs/row':>12}")
    for name, values in results.items():
        seconds = statistics.median(wall for wall, _ in values)
        cpu = statistics.median(cpu for _, cpu in values)
        print(f"{name:<16}{seconds:>10.2f}{rows / seconds:>12,.0f}{cpu / rows * 1e6:>12.1f}")
    info = await aioredis.Redis.from_url(args.url).info("server")
    print(f"redis {info.get('redis_version')}, duckdb via EventStore (flush_max_rows 2048)")


if __name__ == "__main__":
    asyncio.run(main())

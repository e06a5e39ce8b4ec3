"""Client CPU per event of the Redis event log vs the in-process log, and follower latency.

All in one run, against the Redis at ``--url`` (default the machine's, db 15, a fresh prefix
whose keys are deleted at the end). Events are built before timing; what is timed is what
the owner of a turn pays per event from ``on_next`` until the event is confirmed in Redis,
as process CPU (``time.process_time``: waiting for Redis costs nothing, its work is not
ours) — the whole client: serializing, queueing, the flusher's pipeline, reply parsing.

Variants:
    memory          the turn's ReplayLog with one observer (today's in-process log)
    redis, T turns  the same plus the Redis writer; T turns emit one event each per loop
                    tick, so a tick carries T events (the flusher batches them, and whatever
                    arrives while a batch is in flight joins the next)
    redis, paced    one turn that emits one event and waits until it is in Redis: one
                    round trip per event, the worst case (a single slow model stream)
    naive XADD      one awaited ``XADD`` per event, no script (what batching avoids)

Follower latency: one turn emits an event every ``--interval-ms``; a follower in the same
process reads it back through Redis (pub/sub notification → ``XRANGE``), and, for the
baseline, one follows the turn's ReplayLog through ``to_async_iterator``. Reported: p50 and
p99 of (received - emitted).

Redis server CPU (``INFO cpu`` delta) per event is printed too; it is noisy when others use
the same Redis.

Run: ``python bench/redis_log_bench.py [--events N] [--repeats R] [--url redis://…]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis
from reactivex import Observer

from core.events import Done, Event, RequestReceived, Text
from operators import ReplayLog
from sinks.async_iter import to_async_iterator
from sinks.event_log import RedisEventLog


def turn(request_id: str, count: int) -> list[Event]:
    events: list[Event] = [RequestReceived(agent="assistant", conversation_id="conv_b")]
    events += [Text(stream_id=1, delta=f" token{i}") for i in range(count - 2)]
    events.append(Done(ok=True, duration_ms=1.0, reason="completed"))
    return [e.model_copy(update={"request_id": request_id, "seq": seq})
            for seq, e in enumerate(events, start=1)]


class _Sink(Observer[Event]):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _on_next_core(self, value: Event) -> None:
        self.count += 1


def quantile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in ms."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def measure(run: Callable[[], Awaitable[int]], client: aioredis.Redis) -> tuple[float, float]:
    """(client CPU µs/event, Redis CPU µs/event) of one run."""
    gc.collect()
    server0 = await redis_cpu(client)
    cpu0 = time.process_time()
    events = await run()
    cpu = time.process_time() - cpu0
    server = await redis_cpu(client) - server0
    return cpu / events * 1e6, server / events * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000, help="events per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--latency-events", type=int, default=400)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    log = RedisEventLog(args.url, prefix=prefix, ttl_s=120, ping_s=3600)
    await log.start()
    client = aioredis.Redis.from_url(args.url)
    serial = iter(range(10**9))

    def ids(n: int) -> list[str]:
        return [f"req_b{next(serial)}" for _ in range(n)]

    async def memory(turns: int) -> int:
        per = args.events // turns
        batches = [turn(rid, per) for rid in ids(turns)]
        logs = [ReplayLog[Event]() for _ in batches]
        for shared in logs:
            shared.subscribe(_Sink())
        for i in range(per):
            for shared, events in zip(logs, batches, strict=True):
                shared.on_next(events[i])
            await asyncio.sleep(0)
        return per * turns

    async def redis_ticks(turns: int) -> int:
        per = args.events // turns
        batches = [turn(rid, per) for rid in ids(turns)]
        logs = []
        for events in batches:
            shared: ReplayLog[Event] = ReplayLog()
            shared.subscribe(_Sink())
            shared.subscribe(log.writer(events[0].request_id, history=lambda s=shared: s.items))
            logs.append(shared)
        for i in range(per):
            for shared, events in zip(logs, batches, strict=True):
                shared.on_next(events[i])
            await asyncio.sleep(0)
        for events in batches:
            await log.appended(events[0].request_id, seq=events[-1].seq, within=30)
        return per * turns

    async def paced() -> int:
        count = max(200, args.events // 20)
        (rid,) = ids(1)
        events = turn(rid, count)
        shared: ReplayLog[Event] = ReplayLog()
        shared.subscribe(log.writer(rid, history=lambda: shared.items))
        for event in events:
            shared.on_next(event)
            await log.appended(rid, seq=event.seq, within=5)
        return count

    async def naive() -> int:
        count = max(200, args.events // 20)
        (rid,) = ids(1)
        key = log.key(rid)
        for event in turn(rid, count):
            await client.xadd(key, {"e": event.model_dump_json()}, id=f"{event.seq}-0")
        await client.expire(key, 120)
        return count

    variants: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("memory (ReplayLog), 64 turns", lambda: memory(64)),
        ("redis, 1 turn, burst", lambda: redis_ticks(1)),
        ("redis, 16 turns (16/tick)", lambda: redis_ticks(16)),
        ("redis, 64 turns (64/tick)", lambda: redis_ticks(64)),
        ("redis, paced (1 event/round trip)", paced),
        ("naive awaited XADD per event", naive),
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    batches_before: dict[str, int] = {}
    for repeat in range(args.repeats):
        for name, run in variants:
            before = log.stats.batches
            results[name].append(await measure(run, client))
            batches_before[name] = log.stats.batches - before
            print(f"repeat {repeat + 1}: {name} done", file=sys.stderr)

    base = statistics.median(cpu for cpu, _ in results[variants[0][0]])
    print(f"\nclient CPU per event ({args.events} events per variant; median of {args.repeats})\n")
    print("| variant | client µs/event | × memory | Redis server µs/event | round trips (last run) |")
    print("| --- | --- | --- | --- | --- |")
    for name, _ in variants:
        cpu = statistics.median(c for c, _ in results[name])
        server = statistics.median(s for _, s in results[name])
        trips = batches_before[name] if name.startswith("redis") else "-"
        print(f"| {name} | {cpu:.2f} | {cpu / base:.1f} | {server:.2f} | {trips} |")

    # -- follower latency ---------------------------------------------------------------
    async def latency(via_redis: bool) -> list[float]:
        (rid,) = ids(1)
        events = turn(rid, args.latency_events)
        shared: ReplayLog[Event] = ReplayLog()
        if via_redis:
            shared.subscribe(log.writer(rid, history=lambda: shared.items))
        sent: dict[int, float] = {}
        got: list[float] = []

        async def follow() -> None:
            source = (log.follow(rid) if via_redis
                      else to_async_iterator(shared, max_buffer=10**6))
            async with contextlib.aclosing(source) as stream:
                async for event in stream:
                    if event is not None:
                        got.append(time.perf_counter() - sent[event.seq])
                        if isinstance(event, Done):
                            return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        for event in events:
            sent[event.seq] = time.perf_counter()
            shared.on_next(event)
            await asyncio.sleep(args.interval_ms / 1000)
        await asyncio.wait_for(task, 30)
        return got

    print(f"\nfollower latency (emit → follower, {args.latency_events} events, one every "
          f"{args.interval_ms} ms)\n")
    print("| follower | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- |")
    for name, via in (("in-process (ReplayLog)", False), ("through Redis", True)):
        samples = sorted(await latency(via))
        print(f"| {name} | {quantile(samples, 0.5):.3f} | {quantile(samples, 0.99):.3f} | "
              f"{samples[-1] * 1e3:.3f} |")

    await log.aclose()
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()



if __name__ == "__main__":
    asyncio.run(main())

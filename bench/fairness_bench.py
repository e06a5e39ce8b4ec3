"""Fairness: how long each panelist waits at a slow consumer, ``merge_fair`` vs plain ``merge``.

A panel of three, in real asyncio time: ``fast`` streams an event every ``--fast-ms`` (ten
times faster, and so ten times more verbose, than the others), ``bob`` and ``carol`` one
every ten times that, all for the same ``--seconds``. The consumer (an SSE writer that
needs ``--consumer-ms`` per event) is slower than the panel as a whole, so events pile up
somewhere and the question is whose wait. Both variants feed the same consumer coroutine:

- plain: ``reactivex.merge(*panel)`` → ``to_async_iterator(max_buffer=…)`` → consumer
  (the backlog is one FIFO queue: bob and carol wait behind fast's backlog);
- fair:  ``merge_fair(*panel, demand=…)`` ← ``iterate_with_demand`` → consumer
  (one queue per panelist, released round-robin as the consumer asks).

Reported per panelist: the longest and the mean wait between two of its events at the
consumer (the first wait counted from the start), and the longest time one of its events
sat queued (consumed − produced). Then the ratio plain/fair of the longest wait. The
variants run one after the other in the same process; no figure is asserted.

Run: ``python bench/fairness_bench.py [--seconds S] [--fast-ms F] [--consumer-ms C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

try:
    import operators  # noqa: F401
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reactivex
from reactivex import Observable

from operators import from_async_iterable, merge_fair
from sinks.async_iter import to_async_iterator
from sinks.fair_iter import iterate_with_demand

Item = tuple[str, int, float]  # (panelist, index, produced at)
MAX_BUFFER = 100_000  # large on purpose: the bench measures waits, not overflow


def panelist(name: str, *, every: float, count: int, t0: float) -> Observable[Item]:
    """Emits ``count`` items, one every ``every`` seconds on an absolute schedule (no drift)."""

    async def gen() -> AsyncIterator[Item]:
        loop = asyncio.get_running_loop()
        for i in range(count):
            await asyncio.sleep(max(0.0, t0 + (i + 1) * every - loop.time()))
            yield (name, i, loop.time())

    return from_async_iterable(gen)


async def consume(events: AsyncIterator[Item], cost: float) -> list[tuple[Item, float]]:
    """The slow consumer: ``cost`` seconds per event (an SSE write awaiting drain)."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[Item, float]] = []
    async for item in events:
        seen.append((item, loop.time()))
        await asyncio.sleep(cost)
    return seen


async def run(variant: str, args: argparse.Namespace) -> tuple[float, list[tuple[Item, float]]]:
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.01
    fast_every = args.fast_ms / 1000
    slow_every = fast_every * 10
    count_fast = round(args.seconds / fast_every)
    count_slow = round(args.seconds / slow_every)

    def panel() -> list[Observable[Item]]:
        return [
            panelist("fast", every=fast_every, count=count_fast, t0=t0),
            panelist("bob", every=slow_every, count=count_slow, t0=t0),
            panelist("carol", every=slow_every, count=count_slow, t0=t0),
        ]

    iterator: AsyncGenerator[Item]
    if variant == "fair":
        build: Callable[[Observable[int]], Observable[Item]] = lambda demand: merge_fair(  # noqa: E731
            *panel(), demand=demand, max_buffer_per_key=MAX_BUFFER
        )
        iterator = iterate_with_demand(build)
    else:
        iterator = to_async_iterator(reactivex.merge(*panel()), max_buffer=MAX_BUFFER)
    async with aclosing(iterator) as events:
        seen = await consume(events, args.consumer_ms / 1000)
    return t0, seen


def waits(t0: float, seen: list[tuple[Item, float]], name: str) -> tuple[float, float, float, int]:
    """Longest and mean wait between events, longest queueing time (ms), and the count."""
    times = [at for (who, _, _), at in seen if who == name]
    gaps = [b - a for a, b in zip([t0, *times], times, strict=False)]
    queued = [at - produced for (who, _, produced), at in seen if who == name]
    return max(gaps) * 1000, statistics.fmean(gaps) * 1000, max(queued) * 1000, len(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.6, help="how long the panel talks")
    parser.add_argument("--fast-ms", type=float, default=2.0, help="fast panelist: ms per event")
    parser.add_argument("--consumer-ms", type=float, default=4.0, help="consumer: ms per event")
    args = parser.parse_args()

    panel_rate = 1000 / args.fast_ms * 1.2  # fast + two at a tenth of its rate
    consumer_rate = 1000 / args.consumer_ms
    print(f"fairness_bench: fast every {args.fast_ms:g} ms, bob and carol every "
          f"{args.fast_ms * 10:g} ms, for {args.seconds:g} s; panel {panel_rate:.0f} events/s "
          f"into a consumer of {consumer_rate:.0f} events/s ({args.consumer_ms:g} ms/event)")

    results = {variant: await run(variant, args) for variant in ("plain", "fair")}

    names = ("fast", "bob", "carol")
    print()
    print(f"{'panelist':<8} {'variant':<6} {'events':>6} {'longest wait':>13} {'mean wait':>10} "
          f"{'longest queued':>15}")
    longest: dict[tuple[str, str], float] = {}
    queued_most: dict[tuple[str, str], float] = {}
    for name in names:
        for variant in ("plain", "fair"):
            t0, seen = results[variant]
            worst, mean, queued, count = waits(t0, seen, name)
            longest[name, variant] = worst
            queued_most[name, variant] = queued
            print(f"{name:<8} {variant:<6} {count:>6} {worst:>10.1f} ms {mean:>7.1f} ms "
                  f"{queued:>12.1f} ms")
    print()
    for name in names:
        ratio = longest[name, "plain"] / longest[name, "fair"]
        queued_ratio = queued_most[name, "plain"] / queued_most[name, "fair"]
        print(f"{name:<6} plain/fair: longest wait {ratio:5.2f}×, longest queued {queued_ratio:6.2f}×")
    worst_plain = max(longest[n, "plain"] for n in names)
    worst_fair = max(longest[n, "fair"] for n in names)
    print(f"worst panelist's longest wait: plain {worst_plain:.1f} ms, fair {worst_fair:.1f} ms "
          f"({worst_plain / worst_fair:.2f}×)")
    for variant in ("plain", "fair"):
        t0, seen = results[variant]
        print(f"{variant:<6} consumer finished after {(seen[-1][1] - t0) * 1000:.0f} ms, "
              f"{len(seen)} events")


if __name__ == "__main__":
    asyncio.run(main())

"""What the durable-done barrier adds to a turn's end, against no barrier, in the same run.

With ``DONE_BARRIER`` on (the default), a turn's ``done`` waits until the event store holds
the turn's events (``EventStore.flush(request_id=...)``: the writer wakes at once and writes
what is queued); without it, ``done`` follows ``stream_end`` at once and the events are
written within ``FLUSH_INTERVAL_MS``.

- **measured**: the real ``StreamingOrchestrator`` (router → memory → response, envelope,
  numbering, ``ReplayLog``, ``TurnRecorder`` → ``EventStore`` on a fresh DuckDB file) with a
  scripted provider that streams ``--tokens`` pieces without sleeping. The *turn end* is
  the time from ``stream_end`` to ``done`` as a subscriber of the turn sees them; also the
  whole turn (``run`` to ``done``) and turns/s.
- **baseline**: the same, ``durable_done=False``.

Both run ``--turns`` turns, one at a time (``--concurrency 1``) and ``--concurrency C`` at
once (their barriers share the writer's batches); the variants alternate, ``--repeats``
times; the table shows medians (p99 of the turn end in its own column).

Run: ``python bench/done_barrier_bench.py [--turns N] [--tokens T] [--concurrency C] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

# This checkout first, even where another one is installed (editable) in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.events import Done, Event, StreamEnd
from core.turn import ChatMessage, TurnInput
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import Delta, Finish, Piece, Usage
from sinks.store import EventStore


class Fast:
    """A provider that streams ``tokens`` pieces at once."""

    name = "fast"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    async def stream_chat(self, *, model: str, messages: Sequence[dict[str, Any]],
                          max_tokens: int | None = None) -> AsyncIterator[Piece]:
        for i in range(self.tokens):
            yield Delta(f"w{i} ")
        yield Finish("stop")
        yield Usage(model=model, prompt_tokens=1, completion_tokens=self.tokens,
                    total_tokens=self.tokens + 1)

    async def list_models(self) -> list[str]:
        return ["m"]


async def run_variant(*, durable: bool, turns: int, tokens: int, concurrency: int,
                      folder: Path) -> dict[str, float]:
    store = EventStore(folder / f"{'barrier' if durable else 'none'}-{time.monotonic_ns()}.duckdb"
                       ).open()
    ends: list[float] = []
    wholes: list[float] = []
    try:
        orchestrator = StreamingOrchestrator(provider=Fast(tokens), store=store,
                                             default_model="m", durable_done=durable)

        async def one() -> None:
            marks: dict[str, float] = {}

            def seen(event: Event) -> None:
                if isinstance(event, StreamEnd):
                    marks["end"] = time.perf_counter()
                elif isinstance(event, Done):
                    marks["done"] = time.perf_counter()

            started = time.perf_counter()
            turn = orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content="hi")]))
            turn.stream.subscribe(seen)
            result = await turn.result
            assert result.status == "completed", result
            ends.append((marks["done"] - marks["end"]) * 1000)
            wholes.append((marks["done"] - started) * 1000)

        began = time.perf_counter()
        for start in range(0, turns, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, turns - start))))
        elapsed = time.perf_counter() - began
        await store.flush()
        stored = store.query("SELECT count(DISTINCT request_id) FROM events")[0][0]
        assert stored == turns, (stored, turns)
    finally:
        store.close()
    ends.sort()
    return {
        "end_ms": statistics.median(ends),
        "end_p99_ms": ends[min(len(ends) - 1, int(len(ends) * 0.99))],
        "turn_ms": statistics.median(wholes),
        "turns_per_s": turns / elapsed,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows: dict[tuple[int, bool], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for concurrency in (1, args.concurrency):
                for durable in (True, False):
                    print(f"repeat {repeat + 1}: concurrency {concurrency}, "
                          f"barrier {'on' if durable else 'off'}", file=sys.stderr)
                    rows.setdefault((concurrency, durable), []).append(await run_variant(
                        durable=durable, turns=args.turns, tokens=args.tokens,
                        concurrency=concurrency, folder=Path(tmp)))
    print(f"{args.turns} turns of {args.tokens} tokens; median of {args.repeats}\n")
    print("| concurrency | done barrier | stream_end → done, median ms | p99 ms "
          "| whole turn, median ms | turns/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for (concurrency, durable), runs in rows.items():
        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[key] for run in runs)
        print(f"| {concurrency} | {'on' if durable else 'off (baseline)'} | {med('end_ms'):.2f} "
              f"| {med('end_p99_ms'):.2f} | {med('turn_ms'):.2f} | {med('turns_per_s'):.0f} |")
    for concurrency in (1, args.concurrency):
        on = statistics.median(r["turns_per_s"] for r in rows[(concurrency, True)])
        off = statistics.median(r["turns_per_s"] for r in rows[(concurrency, False)])
        added = (statistics.median(r["end_ms"] for r in rows[(concurrency, True)])
                 - statistics.median(r["end_ms"] for r in rows[(concurrency, False)]))
        print(f"\nconcurrency {concurrency}: the barrier adds {added:.2f} ms to a turn's end; "
              f"throughput {on / off:.2f}x the baseline")


if __name__ == "__main__":
    asyncio.run(main())

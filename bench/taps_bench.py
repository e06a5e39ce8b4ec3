"""Taps: the cost per event of the observers the orchestrator adds to every turn's stream.

``sinks.metrics.TurnMeter`` (Prometheus metrics) and ``sinks.telemetry.TurnSpans``
(OpenTelemetry spans, exported to memory here) each observe a turn's whole shared stream,
beside the recorder. One turn of ``--events`` text events plus the envelope is fed to each,
synchronously; the baseline is a bare ``reactivex.Observer`` that does nothing, measured in
the same run. Printed: µs/event (the best of ``--repeats``) and the extra cost over the
baseline. Nothing is asserted.

Run: ``python bench/taps_bench.py [--events N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code

from reactivex import Observer

from core.events import Done, Event, LlmCall, RequestReceived, StreamEnd, StreamStart, Text, TokenUsage
from core.turn import TurnContext
from sinks.metrics import Metrics


class _Bare(Observer[Event]):
    def _on_next_core(self, value: Event) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=50_000, help="text events in the turn")
    parser.add_argument("--repeats", type=int, default=5, help="runs per tap (the best counts)")
    args = parser.parse_args()
    ctx = TurnContext(request_id="req_b", conversation_id="conv_b", messages=[], trace=False,
                      model="m", max_tokens=None, kind="orchestrate")
    events: list[Event] = [
        RequestReceived(agent="a", conversation_id="c"), LlmCall(stream_id=1, model="m", messages=[]),
        StreamStart(stream_id=1, agent="a"), *[Text(stream_id=1, delta="x") for _ in range(args.events)],
        TokenUsage(stream_id=1, model="m"), StreamEnd(stream_id=1),
        Done(ok=True, duration_ms=1, reason="completed")]
    taps: dict[str, Callable[[], Observer[Any]]] = {"bare Observer (baseline)": _Bare,
                                                    "metrics (TurnMeter)": lambda: Metrics().tap(ctx)}
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from sinks.telemetry import Tracing

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        taps["traces (TurnSpans)"] = lambda: Tracing(provider).tap(ctx)
    except ImportError:
        print("(no otel extra: traces not measured)", file=sys.stderr)
    results: dict[str, float] = {}
    for name, make in taps.items():
        best = float("inf")
        for _ in range(args.repeats):
            tap = make()
            started = time.perf_counter()
            for event in events:
                tap.on_next(event)
            best = min(best, time.perf_counter() - started)
        results[name] = best / len(events) * 1e6
    base = results["bare Observer (baseline)"]
    print(f"Taps: one turn of {len(events)} events, best of {args.repeats}")
    print(f"{'tap':<28}{'µs/event':>10}{'over bare':>12}")
    for name, micros in results.items():
        print(f"{name:<28}{micros:>10.2f}{micros - base:>+12.2f}")


if __name__ == "__main__":
    main()

"""Events/s through the orchestrator's Rx chain vs a plain async-generator chain.

Both variants run in the same process and the same run, on the same source: three async
generators shaped like a real turn (router → ``route``; memory → ``memory``; response →
``llm_call``, ``stream_start``, N × ``text``, ``token_usage``, ``stream_end``) that never
sleep, so the pipeline runs at full speed.

Rx: the real :class:`pipeline.orchestrator.StreamingOrchestrator` (``store=None``) with these
generators as its harnesses, i.e. exactly the chain ``run`` builds::

    sequence(*[from_async_iterable(harness) ...])
      .pipe(turn_envelope(...), number_events(request_id)) → ReplayLog (hot, shared)
      ├──► TurnRecorder      (TurnState.apply + stream → agent map; no store)
      └──► turn.events(trace=False): visible(trace=False) → to_async_iterator → async for

Plain baseline (the same work, async generators chained in plain Python)::

    body (the same factories one after another)
      → envelope (request_received first, open-stream tracking, done last)
      → number (seq, request_id) → fold (the same fold) → filter trace → async for

Reported: events/s (events through the chain, trace and envelope included), µs/event and
the ratio Rx/plain, the median of ``--repeats`` runs (the variants alternate). A
``source only`` row (draining the generators, which build the pydantic events) shows how much
of each figure is the source rather than the chain. Optionally the cost of
``sinks.sse.event_frame`` per event, for context (a native SSE client pays it per event).

Run: ``python bench/pipeline_bench.py [--events N] [--turns T] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

try:
    import operators  # noqa: F401
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reactivex import Observer

from core.events import (
    TRACE_TYPES,
    Done,
    ErrorEvent,
    Event,
    LlmCall,
    Memory,
    RequestReceived,
    Route,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
)
from core.turn import ChatMessage, TurnInput, TurnState
from pipeline.orchestrator import StreamingOrchestrator
from sinks.sse import event_frame

TARGET_RATIO = 0.4
AGENT = "assistant"
MODEL = "offline-1"
# Events per turn besides the texts: request_received, route, memory, llm_call,
# stream_start, token_usage, stream_end, done (3 of them trace-only).
EXTRA_EVENTS = 8
TRACE_EVENTS = 3


# -- the source: harness-shaped async generators, no sleeps ---------------------------------
def harness_factories(texts: int) -> list[Callable[[], AsyncGenerator[Event]]]:
    """Router, memory and response harnesses of one turn with ``texts`` text events."""

    async def router() -> AsyncGenerator[Event]:
        yield Route(route="respond", reason="one model answers the conversation")

    async def memory() -> AsyncGenerator[Event]:
        yield Memory(messages_loaded=4)

    async def response() -> AsyncGenerator[Event]:
        yield LlmCall(stream_id=1, model=MODEL, messages=[{"role": "user", "content": "hi"}])
        yield StreamStart(stream_id=1, agent=AGENT, depth=0)
        for i in range(texts):
            yield Text(stream_id=1, delta=f"tok{i % 10} ")
        yield TokenUsage(stream_id=1, model=MODEL, prompt_tokens=12,
                         completion_tokens=texts, total_tokens=12 + texts)
        yield StreamEnd(stream_id=1, status="ok", finish_reason="stop")

    return [router, memory, response]


# -- the shared fold (what TurnRecorder does, without a store) -------------------------------
class Fold:
    """TurnState.apply plus the recorder's stream → (agent, depth) lookup."""

    def __init__(self, request_id: str, conversation_id: str) -> None:
        self.state = TurnState(request_id, conversation_id, MODEL)
        self.streams: dict[int, tuple[str, int]] = {}
        self.events = 0
        self.done = False

    def apply(self, event: Event) -> None:
        self.state.apply(event)
        self.events += 1
        match event:
            case StreamStart(stream_id=stream_id, agent=agent, depth=depth):
                self.streams[stream_id] = (agent, depth)
            case RequestReceived():
                pass
            case _:
                owner = getattr(event, "stream_id", None)
                if owner is not None:
                    self.streams.get(owner, (None, None))
        if isinstance(event, Done):
            self.state.result()
            self.done = True


class FoldObserver(Observer[Event]):
    """An Observer subclass, like TurnRecorder."""

    def __init__(self, fold: Fold) -> None:
        super().__init__()
        self.fold = fold

    def _on_next_core(self, value: Event) -> None:
        self.fold.apply(value)


# -- variant 1: the orchestrator's Rx chain --------------------------------------------------
class _NoModel:
    """Unused: the benchmark's harnesses replace the model call."""

    name = "none"

    def stream_chat(self, **_: Any) -> AsyncIterator[Any]:
        raise NotImplementedError

    async def list_models(self) -> list[str]:
        return [MODEL]


async def run_rx(texts: int, turn: int, *, clients: int = 1) -> tuple[int, int, TurnState]:
    """One turn through the real orchestrator (store=None: its recorder still folds every
    event into the turn state); ``clients`` views drain ``turn.events(trace=False)``.

    Returns (events in the chain, events seen by the first client, the final state).
    """
    factories = harness_factories(texts)
    orchestrator = StreamingOrchestrator(
        provider=_NoModel(), store=None, default_model=MODEL, agent=AGENT,
        harnesses=[(lambda ctx, f=f: f()) for f in factories],
    )
    run = orchestrator.run(TurnInput(
        messages=[ChatMessage(role="user", content="bench")], conversation_id=f"conv_{turn}"))
    seen = [0] * clients

    async def client(index: int) -> None:
        async with aclosing(run.events(trace=False, max_buffer=1 << 30)) as events:
            async for _event in events:
                seen[index] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    await run.result
    state = run._recorder.state
    return state.last_seq, seen[0], state


# -- variant 2: plain async generators doing the same work -----------------------------------
async def p_body(factories: list[Callable[[], AsyncGenerator[Event]]]) -> AsyncGenerator[Event]:
    for factory in factories:
        async with aclosing(factory()) as harness:
            async for event in harness:
                yield event


async def p_envelope(
    source: AsyncIterator[Event], *, agent: str, conversation_id: str
) -> AsyncGenerator[Event]:
    started = time.monotonic()
    open_streams: dict[int, None] = {}
    errors = 0
    reason = "completed"
    yield RequestReceived(agent=agent, conversation_id=conversation_id)
    try:
        async for event in source:
            match event:
                case StreamStart(stream_id=stream_id):
                    open_streams[stream_id] = None
                case StreamEnd(stream_id=stream_id):
                    open_streams.pop(stream_id, None)
                case ErrorEvent():
                    errors += 1
                case _:
                    pass
            yield event
    except Exception as exc:  # same contract as turn_envelope: errors become events
        errors += 1
        yield ErrorEvent(stream_id=next(reversed(open_streams), None), error=str(exc))
        reason = "error"
    if open_streams:
        errors += 1
        for stream_id in reversed(list(open_streams)):
            yield StreamEnd(stream_id=stream_id, status="error")
    ok = reason == "completed" and errors == 0
    yield Done(ok=ok, duration_ms=round((time.monotonic() - started) * 1000, 3),
               reason="completed" if ok else "error")


async def p_number(source: AsyncIterator[Event], request_id: str) -> AsyncGenerator[Event]:
    seq = 0
    async for event in source:
        seq += 1
        event.seq = seq
        event.request_id = request_id
        yield event


async def p_fold(source: AsyncIterator[Event], fold: Fold) -> AsyncGenerator[Event]:
    async for event in source:
        fold.apply(event)
        yield event


async def p_visible(source: AsyncIterator[Event]) -> AsyncGenerator[Event]:
    async for event in source:
        if getattr(event, "type", "") not in TRACE_TYPES:
            yield event


async def run_plain(texts: int, turn: int) -> tuple[int, int, Fold]:
    request_id, conversation_id = f"req_plain_{turn}", f"conv_{turn}"
    fold = Fold(request_id, conversation_id)
    chain = p_visible(p_fold(p_number(p_envelope(
        p_body(harness_factories(texts)), agent=AGENT, conversation_id=conversation_id,
    ), request_id), fold))
    seen = 0
    async with aclosing(chain) as events:
        async for _event in events:
            seen += 1
    return fold.events, seen, fold


# -- the source alone (what both variants pay before any chain work) --------------------------
async def run_source(texts: int, turn: int) -> tuple[int, int, Fold | None]:
    count = 0
    for factory in harness_factories(texts):
        async for _event in factory():
            count += 1
    return count + 2, count + 2 - TRACE_EVENTS, None  # + the envelope's two events


# -- driver ------------------------------------------------------------------------------------
Runner = Callable[[int, int], Any]


async def measure(runner: Runner, *, events: int, turns: int) -> tuple[float, int, int]:
    """Seconds for ``turns`` sequential turns sharing ``events`` texts; chain and client counts."""
    per_turn = [events // turns + (1 if i < events % turns else 0) for i in range(turns)]
    gc.collect()
    chain = seen = 0
    started = time.perf_counter()
    for turn, texts in enumerate(per_turn):
        n_chain, n_seen, fold = await runner(texts, turn)
        chain += n_chain
        seen += n_seen
        state = fold.state if isinstance(fold, Fold) else fold
        if state is not None and state.status == "running":
            raise SystemExit(f"{runner.__name__}: turn {turn} ended without done")
    return time.perf_counter() - started, chain, seen


def frame_cost(events: int) -> float:
    """µs per ``event_frame`` call on numbered text events."""
    sample = [Text(stream_id=1, delta=f"tok{i % 10} ", seq=i + 1, request_id="req_frame")
              for i in range(min(events, 50_000))]
    started = time.perf_counter()
    for event in sample:
        event_frame(event)
    return (time.perf_counter() - started) / len(sample) * 1e6


async def diagnose(args: argparse.Namespace, n: int, rx: float, plain: float) -> None:
    """Where the Rx time goes: the same chain with publish() and with a second client."""
    print(f"diagnose (Rx variants, median of {args.repeats}; not what the orchestrator builds "
          f"unless marked):", flush=True)
    cases: list[tuple[str, Runner]] = [
        ("2 client views", lambda texts, turn: run_rx(texts, turn, clients=2)),
        ("4 client views", lambda texts, turn: run_rx(texts, turn, clients=4)),
    ]
    for label, runner in cases:
        values = []
        for repeat in range(args.repeats):
            seconds, _, _ = await measure(runner, events=args.events, turns=args.turns)
            values.append(seconds)
            print(f"  diagnose {label} run {repeat + 1}/{args.repeats}: {seconds:.3f} s",
                  file=sys.stderr, flush=True)
        med = statistics.median(values)
        print(f"  {label:<34} {med / n * 1e6:8.2f} µs/event  ({plain / med:.2f}× plain; "
              f"Δ vs orchestrator chain {(med - rx) / n * 1e6:+.2f} µs/event)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000,
                        help="text events in total (default 50000)")
    parser.add_argument("--turns", type=int, default=1,
                        help="split the texts over this many sequential turns (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (default 3)")
    parser.add_argument("--no-frame", action="store_true", help="skip the event_frame figure")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time the Rx chain with ops.publish() instead of ops.replay() "
                             "and with 2 client views, to split the Rx cost (not the target)")
    args = parser.parse_args()
    if args.events < 1 or args.turns < 1 or args.repeats < 1 or args.turns > args.events:
        parser.error("need events >= turns >= 1 and repeats >= 1")

    variants: dict[str, Runner] = {"rx": run_rx, "plain": run_plain, "source only": run_source}
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, tuple[int, int]] = {}
    print(f"pipeline_bench: {args.events} text events in {args.turns} turn(s), "
          f"{args.repeats} repeats per variant (alternating), full speed", file=sys.stderr)
    await measure(run_rx, events=min(args.events, 2_000), turns=1)  # warm-up (imports, caches)
    await measure(run_plain, events=min(args.events, 2_000), turns=1)
    for repeat in range(args.repeats):
        for name, runner in variants.items():
            seconds, chain, seen = await measure(runner, events=args.events, turns=args.turns)
            times[name].append(seconds)
            counts[name] = (chain, seen)
            print(f"  run {repeat + 1}/{args.repeats} {name:<11} {seconds:7.3f} s "
                  f"({chain / seconds / 1000:8.1f} k events/s)", file=sys.stderr, flush=True)

    expected_chain = args.events + EXTRA_EVENTS * args.turns
    expected_seen = expected_chain - TRACE_EVENTS * args.turns
    for name in ("rx", "plain"):
        if counts[name] != (expected_chain, expected_seen):
            raise SystemExit(f"{name}: saw {counts[name]}, expected "
                             f"{(expected_chain, expected_seen)}: the variants do not do the same work")

    n = expected_chain
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    ratio = median["plain"] / median["rx"]  # throughput ratio rx / plain
    src = median["source only"]
    print()
    print(f"Pipeline: {args.events} texts + {EXTRA_EVENTS}/turn envelope & trace events "
          f"= {n} events through the chain, {args.turns} turn(s); "
          f"median of {args.repeats} (best in brackets)")
    print(f"{'variant':<30} {'events/s':>12} {'µs/event':>10} {'best µs/ev':>11} {'vs plain':>9}")
    rows = [("Rx chain (orchestrator)", "rx"), ("plain async-gen chain", "plain"),
            ("source only (both pay this)", "source only")]
    for label, name in rows:
        us = median[name] / n * 1e6
        vs = "—" if name == "source only" else f"{median['plain'] / median[name]:.2f}×"
        print(f"{label:<30} {n / median[name]:>12,.0f} {us:>10.2f} "
              f"{best[name] / n * 1e6:>11.2f} {vs:>9}")
    rx_chain = (median["rx"] - src) / n * 1e6
    plain_chain = (median["plain"] - src) / n * 1e6
    print(f"chain only (minus source):     rx {rx_chain:.2f} µs/event, plain "
          f"{plain_chain:.2f} µs/event, rx costs {rx_chain / plain_chain:.2f}× plain")
    if not args.no_frame:
        print(f"context: sinks.sse.event_frame  {frame_cost(args.events):.2f} µs/event "
              f"(per native SSE client, on top of the chain)")
    if args.diagnose:
        await diagnose(args, n, median["rx"], median["plain"])
    verdict = "MET" if ratio >= TARGET_RATIO else "NOT MET"
    print(f"target: Rx ≥ {TARGET_RATIO}× plain throughput → {ratio:.2f}×  {verdict}")


if __name__ == "__main__":
    asyncio.run(main())

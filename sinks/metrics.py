"""Prometheus metrics, derived from each turn's event stream (a tap beside the recorder).

Turn and event metrics come from the events themselves, so every turn counts the same way
whichever wire started it (native, OpenAI, WebSocket, roundtable): one :class:`TurnMeter`
observes a turn's whole shared stream, like the recorder. Figures the server already
keeps (live turns, open streams, store flush failures, cut-off clients, provider errors)
are read at scrape time through callbacks (:meth:`Metrics.gauge`, :meth:`Metrics.counter`)
instead of being counted twice.

Each :class:`Metrics` has its own ``CollectorRegistry`` (tests build many apps in one
process; the global default registry would refuse the second).

    >>> metrics = Metrics()
    >>> orchestrator = StreamingOrchestrator(..., taps=[metrics.tap])  # doctest: +SKIP
    >>> metrics.render()  # the text format  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from reactivex import Observer

from core.events import Done, Event, LlmCall, RequestReceived, Text, TokenUsage
from core.turn import TurnContext

log = logging.getLogger(__name__)

#: The Content-Type of :meth:`Metrics.render` (the Prometheus text format 0.0.4).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The server's metrics in one registry: turn metrics from taps, state from callbacks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.turns = Counter(
            "agentflow_turns", "Finished turns, by kind (orchestrate, chat, roundtable, …) and "
            "status (completed, error, cancelled, interrupted).", ["kind", "status"],
            registry=self.registry)
        # Counted in a plain dict on the event loop (a labelled Counter's lock costs several
        # µs per event) and exposed at scrape time by the collector below.
        self.event_counts: dict[str, int] = {}
        self.time_to_first_token = Histogram(
            "agentflow_time_to_first_token_seconds",
            "From request_received to the turn's first text event, by model.", ["model"],
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.turn_duration = Histogram(
            "agentflow_turn_duration_seconds", "A turn's duration (done.duration_ms), by model.",
            ["model"], buckets=DURATION_BUCKETS, registry=self.registry)
        self._state = _StateCollector()
        self._state.add_labelled("agentflow_events", "Events produced, by type (trace ones included).",
                                 "type", self.event_counts)
        self.registry.register(self._state)

    def tap(self, ctx: TurnContext) -> Observer[Event]:
        """The observer of one turn (pass ``tap`` to the orchestrator's ``taps``)."""
        return TurnMeter(self, ctx)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value ``read()`` gives at scrape time."""
        self._state.add(name, documentation, read, counter=False)

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter (``name`` without ``_total``) whose running total ``read()`` gives."""
        self._state.add(name, documentation, read, counter=True)

    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class TurnMeter(Observer[Event]):
    """Counts one turn's events; at ``done`` its outcome and duration; at the first text its
    time to first token. The model is the one last named by ``llm_call`` or
    ``token_usage``, else the turn's. Never raises into the turn's stream."""

    def __init__(self, metrics: Metrics, ctx: TurnContext) -> None:
        super().__init__()
        self._metrics = metrics
        self._counts = metrics.event_counts
        self._ctx = ctx
        self._model = ctx.model
        self._started: float | None = None
        self._first_token = False

    def _on_next_core(self, event: Event) -> None:
        kind = event.type
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if self._first_token and kind == "text":
            return  # the common case, kept cheap
        try:
            self._observe(event)
        except Exception:  # a failing metric must never break the turn
            log.exception("metrics for %s seq=%s failed", event.type, event.seq)

    def _observe(self, event: Event) -> None:
        metrics = self._metrics
        match event:
            case RequestReceived(ts=ts):
                self._started = ts
            case LlmCall(model=model) | TokenUsage(model=model) if model:
                self._model = model
            case Text(ts=ts) if not self._first_token:
                self._first_token = True
                started = self._started if self._started is not None else ts
                metrics.time_to_first_token.labels(self._model).observe(max(ts - started, 0.0))
            case Done(ok=ok, reason=reason, duration_ms=duration_ms):
                status = {"cancelled": "cancelled", "interrupted": "interrupted"}.get(
                    reason, "completed" if ok else "error")
                metrics.turns.labels(self._ctx.kind, status).inc()
                metrics.turn_duration.labels(self._model).observe(duration_ms / 1000)
            case _:
                pass

    def _on_error_core(self, error: Exception) -> None:
        pass  # the recorder reports it; the envelope makes failures events

    def _on_completed_core(self) -> None:
        pass


class _StateCollector(Collector):
    """Gauges and counters read from existing state at scrape time."""

    def __init__(self) -> None:
        self._reads: list[tuple[str, str, Callable[[], float], bool]] = []
        self._labelled: list[tuple[str, str, str, Mapping[str, int]]] = []

    def add(self, name: str, documentation: str, read: Callable[[], float], *, counter: bool) -> None:
        self._reads.append((name, documentation, read, counter))

    def add_labelled(self, name: str, documentation: str, label: str, counts: Mapping[str, int]) -> None:
        """A counter with one label, one sample per key of ``counts``."""
        self._labelled.append((name, documentation, label, counts))

    def describe(self) -> Iterable[Metric]:
        return self._families(values=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(values=True)

    def _families(self, *, values: bool) -> Iterator[Metric]:
        for name, documentation, label, counts in self._labelled:
            labelled = CounterMetricFamily(name, documentation, labels=[label])
            if values:
                for key, count in sorted(counts.items()):
                    labelled.add_metric([key], count)
            yield labelled
        for name, documentation, read, counter in self._reads:
            family: Metric
            if counter:
                family = CounterMetricFamily(name, documentation)
            else:
                family = GaugeMetricFamily(name, documentation)
            if values:
                try:
                    family.add_metric([], float(read()))
                except Exception:  # the app is starting or stopping: leave it out
                    continue
            yield family

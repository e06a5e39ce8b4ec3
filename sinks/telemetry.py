"""OpenTelemetry traces of turns, derived from each turn's event stream (a tap).

One trace per turn; its spans follow the events, with the events' own timestamps::

    turn <kind>                         request_received … done
    └── invoke_agent <agent>            stream_start … stream_end (nested by parent_stream_id)
        ├── chat <model>                llm_call … token_usage (or stream_end)
        └── execute_tool <tool>         tool_call … tool_result

with the OpenTelemetry GenAI semantic-convention attributes (``gen_ai.operation.name``,
``gen_ai.system``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, ``gen_ai.agent.name``,
``gen_ai.tool.name``, ``gen_ai.tool.call.id``, ``gen_ai.conversation.id``), so Jaeger,
Phoenix or Langfuse show the runs. Failures (``error`` events, failed tools, streams that
end ``error``) set the span status to ERROR.

Deriving spans from events rather than instrumenting harnesses keeps one source of truth:
what a trace shows is exactly what the store recorded.

    >>> tracing = start_tracing(endpoint="http://127.0.0.1:4318", service_name="agentflow")
    >>> orchestrator = StreamingOrchestrator(..., taps=[tracing.tap])  # doctest: +SKIP
    >>> tracing.shutdown()  # exports what is queued  # doctest: +SKIP

This module needs the ``otel`` extra (``pip install -e '.[otel]'``).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode
from reactivex import Observer

from core.events import (
    Done,
    ErrorEvent,
    Event,
    LlmCall,
    RequestReceived,
    StreamEnd,
    StreamStart,
    TokenUsage,
    ToolCall,
    ToolResult,
)
from core.turn import TurnContext

log = logging.getLogger(__name__)

#: ``gen_ai.system`` / ``gen_ai.provider.name``: every model call goes through the OpenAI API.
SYSTEM: Final = "openai"
INSTRUMENTATION: Final = "agentflow"


def _ns(ts: float) -> int:
    return int(ts * 1e9)


class Tracing:
    """A tracer provider exporting over OTLP/HTTP (protobuf), and the per-turn tap."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION)

    def tap(self, ctx: TurnContext) -> Observer[Event]:
        """The observer of one turn (pass ``tap`` to the orchestrator's ``taps``)."""
        return TurnSpans(self.tracer, ctx)

    def shutdown(self) -> None:
        """Export what is queued and stop (blocking: run it in a thread on the loop)."""
        self.provider.shutdown()


def start_tracing(*, endpoint: str | None = None, service_name: str = "agentflow",
                  exporter: SpanExporter | None = None) -> Tracing:
    """Traces to the OTLP/HTTP collector at ``endpoint`` (``…/v1/traces`` is added), or to
    ``exporter``; spans are batched (``OTEL_BSP_*`` tune the batching)."""
    if exporter is None:
        if endpoint is None:
            raise ValueError("start_tracing needs an endpoint or an exporter")
        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


class TurnSpans(Observer[Event]):
    """Builds one turn's spans from its events. Never raises into the turn's stream."""

    def __init__(self, tracer: trace.Tracer, ctx: TurnContext) -> None:
        super().__init__()
        self._tracer = tracer
        self._ctx = ctx
        self._root: Span | None = None
        self._streams: dict[int, Span] = {}
        self._models: dict[int, Span] = {}  # the open model call of each stream
        self._tools: dict[str, Span] = {}
        # A response harness sends its llm_call just before its stream_start: held until then.
        self._early_calls: dict[int, LlmCall] = {}

    def _on_next_core(self, event: Event) -> None:
        if event.type == "text":
            return  # the common case: no span of its own
        try:
            self._observe(event)
        except Exception:  # a failing exporter must never break the turn
            log.exception("tracing %s seq=%s failed", event.type, event.seq)

    def _start(self, name: str, parent: Span | None, ts: float, attributes: dict[str, Any]) -> Span:
        context = trace.set_span_in_context(parent) if parent is not None else otel_context.Context()
        return self._tracer.start_span(name, context=context, start_time=_ns(ts),
                                       attributes={k: v for k, v in attributes.items() if v is not None})

    def _parent(self, stream_id: int | None) -> Span | None:
        if stream_id is not None and stream_id in self._streams:
            return self._streams[stream_id]
        return self._root

    def _observe(self, event: Event) -> None:
        ctx = self._ctx
        match event:
            case RequestReceived(agent=agent, conversation_id=conversation_id):
                self._root = self._start(f"turn {ctx.kind}", None, event.ts, {
                    "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent,
                    "gen_ai.conversation.id": conversation_id, "gen_ai.request.model": ctx.model,
                    "gen_ai.system": SYSTEM, "agentflow.request_id": event.request_id,
                    "agentflow.kind": ctx.kind})
            case StreamStart(stream_id=stream_id, agent=agent, depth=depth, parent_stream_id=parent):
                early = self._early_calls.pop(stream_id, None)
                started = min(event.ts, early.ts) if early is not None else event.ts
                self._streams[stream_id] = self._start(
                    f"invoke_agent {agent}", self._parent(parent), started, {
                        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent,
                        "gen_ai.conversation.id": ctx.conversation_id, "gen_ai.system": SYSTEM,
                        "agentflow.stream_id": stream_id, "agentflow.depth": depth})
                if early is not None:
                    self._start_model(early)
            case LlmCall(stream_id=stream_id):
                if stream_id in self._streams:
                    self._start_model(event)
                else:
                    self._early_calls[stream_id] = event
            case TokenUsage(stream_id=stream_id, model=model):
                span = self._models.pop(stream_id, None)
                if span is None:  # usage without a traced call: one span for the call
                    span = self._start(f"chat {model}", self._parent(stream_id), event.ts, {
                        "gen_ai.operation.name": "chat", "gen_ai.system": SYSTEM,
                        "gen_ai.provider.name": SYSTEM, "gen_ai.request.model": model})
                span.set_attributes({"gen_ai.response.model": model,
                                     "gen_ai.usage.input_tokens": event.prompt_tokens,
                                     "gen_ai.usage.output_tokens": event.completion_tokens})
                span.end(end_time=_ns(event.ts))
            case ToolCall(stream_id=stream_id, tool=tool, execution_id=execution_id):
                self._tools[execution_id] = self._start(f"execute_tool {tool}", self._parent(stream_id),
                                                        event.ts, {
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                    "gen_ai.tool.call.id": execution_id, "gen_ai.system": SYSTEM})
            case ToolResult(execution_id=execution_id, ok=ok, error=error):
                span = self._tools.pop(execution_id, None)
                if span is not None:
                    if not ok:
                        span.set_attribute("error.type", "tool_error")
                        span.set_status(Status(StatusCode.ERROR, error or "tool failed"))
                    span.end(end_time=_ns(event.ts))
            case ErrorEvent(stream_id=stream_id, error=message, retryable=retryable):
                for span in (self._models.get(stream_id) if stream_id is not None else None,
                             self._parent(stream_id), self._root):
                    if span is not None:
                        span.set_status(Status(StatusCode.ERROR, message))
                        span.set_attribute("error.type", "turn_error")
                if self._root is not None:
                    self._root.add_event("turn_error", {"message": message, "retryable": retryable},
                                         timestamp=_ns(event.ts))
            case StreamEnd(stream_id=stream_id, status=status, finish_reason=reason):
                self._end_model(stream_id, event.ts, failed=status == "error")
                span = self._streams.pop(stream_id, None)
                if span is not None:
                    span.set_attribute("agentflow.status", status)
                    if reason:
                        span.set_attribute("gen_ai.response.finish_reasons", [reason])
                    if status == "error":
                        span.set_status(Status(StatusCode.ERROR, "stream ended with an error"))
                    span.end(end_time=_ns(event.ts))
            case Done(ok=ok, reason=reason, duration_ms=duration_ms):
                self._finish(event.ts, ok=ok, reason=reason, duration_ms=duration_ms)
            case _:
                pass

    def _start_model(self, call: LlmCall) -> None:
        self._end_model(call.stream_id, call.ts)  # a new call ends the previous one
        self._models[call.stream_id] = self._start(
            f"chat {call.model}", self._parent(call.stream_id), call.ts, {
                "gen_ai.operation.name": "chat", "gen_ai.system": SYSTEM,
                "gen_ai.provider.name": SYSTEM, "gen_ai.request.model": call.model,
                "gen_ai.request.max_tokens": self._ctx.max_tokens,
                "gen_ai.conversation.id": self._ctx.conversation_id,
                "agentflow.messages": len(call.messages)})

    def _end_model(self, stream_id: int, ts: float, *, failed: bool = False) -> None:
        span = self._models.pop(stream_id, None)
        if span is not None:
            if failed:
                span.set_status(Status(StatusCode.ERROR, "model call failed"))
            span.end(end_time=_ns(ts))

    def _finish(self, ts: float, *, ok: bool, reason: str, duration_ms: float) -> None:
        for span in [*self._models.values(), *self._tools.values(), *self._streams.values()]:
            span.end(end_time=_ns(ts))  # the turn ended first (cancelled, interrupted)
        self._models.clear()
        self._tools.clear()
        self._streams.clear()
        if self._root is not None:
            self._root.set_attributes({"agentflow.ok": ok, "agentflow.reason": reason,
                                       "agentflow.duration_ms": duration_ms})
            if not ok:
                self._root.set_status(Status(StatusCode.ERROR, reason))
            self._root.end(end_time=_ns(ts))
            self._root = None

    def _on_error_core(self, error: Exception) -> None:
        pass  # the envelope turns failures into events; the recorder reports the rest

    def _on_completed_core(self) -> None:
        pass

"""OpenTelemetry traces (issue 15): a trace per turn, spans per stream, model call and tool
call with GenAI attributes, derived from the events; sent over OTLP/HTTP to a receiver."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from core.events import (
    Done,
    Event,
    LlmCall,
    RequestReceived,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
    ToolResult,
)
from core.turn import TurnContext
from sinks.telemetry import Tracing
from tests.ops_server import launch, start
from tests.procs import free_port
from tests.sse_client import read_frames


def turn_events() -> list[Event]:
    """An agent loop: a model call asks for a tool, the tool fails, a second call answers."""
    return [
        RequestReceived(agent="assistant", conversation_id="conv_1", ts=100.0),
        # as the response harness sends them: its first llm_call just before its stream_start
        LlmCall(stream_id=1, model="m", messages=[{"role": "user", "content": "x"}], ts=100.1),
        StreamStart(stream_id=1, agent="assistant", ts=100.2),
        ToolCall(stream_id=1, tool="fs.read", execution_id="ex_1", params={"path": "a"}, ts=100.3),
        TokenUsage(stream_id=1, model="m-2024", prompt_tokens=10, completion_tokens=5,
                   total_tokens=15, ts=100.35),
        ToolResult(stream_id=1, tool="fs.read", execution_id="ex_1", ok=False, error="no such file",
                   ts=100.4),
        LlmCall(stream_id=1, model="m", messages=[], ts=100.5),
        Text(stream_id=1, delta="sorry", ts=100.6),
        TokenUsage(stream_id=1, model="m-2024", prompt_tokens=20, completion_tokens=7,
                   total_tokens=27, ts=100.8),
        StreamEnd(stream_id=1, finish_reason="stop", ts=100.9),
        Done(ok=True, duration_ms=1000, reason="completed", ts=101.0),
    ]


def test_a_turns_events_become_one_trace_of_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ctx = TurnContext(request_id="req_1", conversation_id="conv_1", messages=[], trace=False,
                      model="m", max_tokens=64, kind="orchestrate")
    tap = Tracing(provider).tap(ctx)
    for event in turn_events():
        tap.on_next(event.model_copy(update={"request_id": "req_1"}))
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}

    def row(span: ReadableSpan) -> tuple[Any, ...]:
        parent = by_id[span.parent.span_id].name if span.parent is not None else None
        return (span.name, parent, span.start_time / 1e9, span.end_time / 1e9)  # type: ignore[operator]

    assert sorted(map(row, spans), key=lambda r: (r[2], r[0])) == [
        ("turn orchestrate", None, 100.0, 101.0),
        ("chat m", "invoke_agent assistant", 100.1, 100.35),
        ("invoke_agent assistant", "turn orchestrate", 100.1, 100.9),
        ("execute_tool fs.read", "invoke_agent assistant", 100.3, 100.4),
        ("chat m", "invoke_agent assistant", 100.5, 100.8),
    ]
    assert len({span.context.trace_id for span in spans}) == 1
    first_call = next(s for s in spans if s.name == "chat m" and s.start_time == 100_100_000_000)
    assert dict(first_call.attributes or {}) == {
        "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "m", "gen_ai.request.max_tokens": 64,
        "gen_ai.conversation.id": "conv_1", "agentflow.messages": 1,
        "gen_ai.response.model": "m-2024", "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 5}
    tool = next(s for s in spans if s.name.startswith("execute_tool"))
    assert tool.status.status_code is StatusCode.ERROR and tool.status.description == "no such file"
    assert (tool.attributes or {})["gen_ai.tool.call.id"] == "ex_1"
    root = next(s for s in spans if s.parent is None)
    assert (root.attributes or {})["agentflow.request_id"] == "req_1"
    assert root.status.status_code is StatusCode.UNSET
    agent = next(s for s in spans if s.name == "invoke_agent assistant")
    assert (agent.attributes or {})["gen_ai.response.finish_reasons"] == ("stop",)


# -- a real server sending to a loopback OTLP/HTTP receiver ------------------------------
def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.services: set[str] = set()

    async def traces(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            self.services.add(resource["service.name"])
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "status": span.status.code,
                    })
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


async def test_a_real_server_sends_a_trace_per_turn_to_an_otlp_receiver(tmp_path: Path) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace" / "notes.txt").write_text("The launch code is 7421.")
    try:
        running = await asyncio.to_thread(
            start, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
            OTEL_SERVICE_NAME="agentflow-test", OTEL_BSP_SCHEDULE_DELAY="100")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{running.base}/v1/orchestrate", json={
                        "messages": [{"role": "user", "content": "read the file notes.txt"}],
                        "trace": True}) as resp:
                    request_id = resp.headers["X-Request-Id"]
                    events = [f.json for f in await read_frames(resp) if f.data]
            deadline = time.monotonic() + 20
            while not any(s["name"] == "turn orchestrate" for s in receiver.spans):
                assert time.monotonic() < deadline, f"no trace arrived: {receiver.spans}"
                await asyncio.sleep(0.1)
        finally:
            code = await asyncio.to_thread(running.stop)
    finally:
        await runner.cleanup()
    assert code == 0, running.output()
    assert "sending traces to" in running.output()
    assert receiver.services == {"agentflow-test"}
    spans = receiver.spans
    assert len({s["trace_id"] for s in spans}) == 1  # one trace for the turn
    names = {s["span_id"]: s["name"] for s in spans}
    tree = sorted((s["name"], names.get(s["parent"])) for s in spans)
    model_calls = sum(e["type"] == "llm_call" for e in events)
    assert model_calls == 2  # the tool round, then the answer
    assert tree == sorted([
        ("turn orchestrate", None),
        ("invoke_agent assistant", "turn orchestrate"),
        ("execute_tool fs.read", "invoke_agent assistant"),
        *[("chat offline", "invoke_agent assistant")] * model_calls,
    ])
    root = next(s for s in spans if s["name"] == "turn orchestrate")
    assert root["attributes"]["agentflow.request_id"] == request_id
    usage = [e for e in events if e["type"] == "token_usage"]
    calls = sorted((s["attributes"]["gen_ai.usage.input_tokens"],
                    s["attributes"]["gen_ai.usage.output_tokens"])
                   for s in spans if s["name"] == "chat offline")
    assert calls == sorted((u["prompt_tokens"], u["completion_tokens"]) for u in usage)
    for span in spans:
        if span["name"] == "chat offline":
            assert span["attributes"]["gen_ai.request.model"] == "offline"
            assert span["attributes"]["gen_ai.operation.name"] == "chat"
            assert span["attributes"]["gen_ai.system"] == "openai"
    tool = next(s for s in spans if s["name"] == "execute_tool fs.read")
    assert tool["attributes"]["gen_ai.tool.name"] == "fs.read"
    assert tool["attributes"]["gen_ai.tool.call.id"] == next(
        e["execution_id"] for e in events if e["type"] == "tool_call")


def test_traces_without_the_otel_extra_is_a_one_line_startup_failure(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed', name='opentelemetry')\n")
    running = launch(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
                     PYTHONPATH=str(shadow.parent))
    code = running.proc.wait(timeout=60)
    lines = running.output().strip().splitlines()
    assert code == 1
    assert "Traceback" not in running.output() and len(lines) <= 3, lines
    assert "cannot start: OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed" \
        in lines[-1]
    assert "pip install -e '.[otel]'" in lines[-1]

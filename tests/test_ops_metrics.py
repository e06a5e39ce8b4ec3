"""``GET /metrics`` (issue 15): the Prometheus text format, turn and event metrics derived
from the turns' streams, state gauges and counters read from the server."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

import server
from api.ops import METRICS
from core.config import Settings
from core.events import Done, RequestReceived, Text, TokenUsage
from core.turn import TurnContext
from sinks.metrics import Metrics
from tests.ops_server import start
from tests.sse_client import read_frames

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def scrape(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and sorted labels (parsing proves the format)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ctx(kind: str = "orchestrate", model: str = "m0") -> TurnContext:
    return TurnContext(request_id="req_1", conversation_id="conv_1", messages=[], trace=False,
                       model=model, max_tokens=None, kind=kind)


def test_a_turn_meter_folds_events_into_metrics() -> None:
    metrics = Metrics()
    meter = metrics.tap(ctx())
    for event in (RequestReceived(agent="a", conversation_id="c", ts=100.0),
                  TokenUsage(stream_id=1, model="m1", ts=100.1),
                  Text(stream_id=1, delta="x", ts=100.25), Text(stream_id=1, delta="y", ts=100.5),
                  Done(ok=False, duration_ms=2500, reason="completed", ts=102.5)):
        meter.on_next(event)
    samples = scrape(metrics.render().decode())
    assert samples[("agentflow_turns_total", (("kind", "orchestrate"), ("status", "error")))] == 1
    assert samples[("agentflow_events_total", (("type", "text"),))] == 2
    assert samples[("agentflow_time_to_first_token_seconds_sum", (("model", "m1"),))] == \
        pytest.approx(0.25)
    assert samples[("agentflow_turn_duration_seconds_sum", (("model", "m1"),))] == 2.5
    assert samples[("agentflow_turn_duration_seconds_bucket", (("le", "2.5"), ("model", "m1")))] == 1
    assert samples[("agentflow_turn_duration_seconds_bucket", (("le", "1.0"), ("model", "m1")))] == 0


def test_state_metrics_read_at_scrape_time_and_a_failing_read_is_left_out() -> None:
    metrics = Metrics()
    value = {"live": 3}
    metrics.gauge("agentflow_live_turns", "doc", lambda: value["live"])
    metrics.counter("agentflow_provider_errors", "doc", lambda: 1 / 0)
    assert scrape(metrics.render().decode())[("agentflow_live_turns", ())] == 3
    value["live"] = 0
    samples = scrape(metrics.render().decode())
    assert samples[("agentflow_live_turns", ())] == 0
    assert ("agentflow_provider_errors_total", ()) not in samples


async def test_metrics_in_process_match_the_streams(
    aiohttp_client: ClientFactory, tmp_path: Path,
) -> None:
    settings = Settings(db_path=tmp_path / "events.duckdb", offline_token_delay_ms=1,
                        flush_interval_ms=20, models=["offline", "ghost"])
    client = await aiohttp_client(server.create_app(settings))
    seen: collections.Counter[str] = collections.Counter()
    for body in ({"messages": [user("one")], "trace": True, "max_tokens": 4},
                 {"messages": [user("two")], "trace": True, "model": "ghost"}):
        async with client.post("/v1/orchestrate", json=body) as resp:
            seen.update(frame.json["type"] for frame in await read_frames(resp) if frame.data)
    async with client.post("/v1/chat/completions", json={
            "model": "offline", "messages": [user("three")], "max_tokens": 2}) as resp:
        assert resp.status == 200
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = scrape(await resp.text())
    turns = {labels: v for (name, labels), v in samples.items() if name == "agentflow_turns_total"}
    assert turns == {(("kind", "orchestrate"), ("status", "completed")): 1,
                     (("kind", "orchestrate"), ("status", "error")): 1,
                     (("kind", "chat.completions"), ("status", "completed")): 1}
    events = {dict(labels)["type"]: v for (name, labels), v in samples.items()
              if name == "agentflow_events_total"}
    # the two native streams (trace on: every event) plus the chat turn's events
    chat_turn = {t: events[t] - seen[t] for t in events}
    assert {t for t, n in chat_turn.items() if n} == {
        "request_received", "route", "memory", "llm_call", "stream_start", "text",
        "token_usage", "stream_end", "done"}
    assert chat_turn["text"] == 2 and chat_turn["done"] == 1
    assert samples[("agentflow_time_to_first_token_seconds_count", (("model", "offline"),))] == 2
    assert samples[("agentflow_turn_duration_seconds_count", (("model", "offline"),))] == 2
    assert samples[("agentflow_turn_duration_seconds_count", (("model", "ghost"),))] == 1
    assert samples[("agentflow_provider_errors_total", ())] == 1
    assert samples[("agentflow_live_turns", ())] == 0
    assert samples[("agentflow_open_streams", ())] == 0
    assert samples[("agentflow_store_flush_failures_total", ())] == 0
    assert samples[("agentflow_client_cutoffs_total", ())] == 0
    assert client.app[METRICS] is not server.create_app(settings)[METRICS]  # one registry per app


async def test_live_turns_and_open_streams_while_a_turn_streams(
    aiohttp_client: ClientFactory, tmp_path: Path,
) -> None:
    settings = Settings(db_path=tmp_path / "events.duckdb", offline_token_delay_ms=5,
                        flush_interval_ms=20)
    client = await aiohttp_client(server.create_app(settings))
    async with client.post("/v1/orchestrate", json={"messages": [user("long")],
                                                    "max_tokens": 400}) as resp:
        await resp.content.readuntil(b"event: text")
        async with client.get("/metrics") as scraped:
            during = scrape(await scraped.text())
        resp.close()
    assert during[("agentflow_live_turns", ())] == 1
    assert during[("agentflow_open_streams", ())] == 1
    assert ("agentflow_turns_total", (("kind", "orchestrate"), ("status", "completed"))) \
        not in during


async def test_metrics_scrape_a_real_server(tmp_path: Path) -> None:
    running = start(tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{running.base}/v1/orchestrate", json={
                    "messages": [user("hello")], "max_tokens": 3}) as resp:
                frames = await read_frames(resp)
            async with session.get(f"{running.base}/metrics") as resp:
                assert resp.status == 200
                samples = scrape(await resp.text())
    finally:
        assert running.stop() == 0
    public: dict[str, Any] = collections.Counter(f.json["type"] for f in frames if f.data)
    assert samples[("agentflow_turns_total", (("kind", "orchestrate"), ("status", "completed")))] == 1
    for event_type, count in public.items():
        assert samples[("agentflow_events_total", (("type", event_type),))] == count
    assert samples[("agentflow_events_total", (("type", "llm_call"),))] == 1  # trace ones counted
    assert samples[("agentflow_time_to_first_token_seconds_count", (("model", "offline"),))] == 1
    assert samples[("agentflow_live_turns", ())] == 0

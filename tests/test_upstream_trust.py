"""The model upstream is not trusted (issue 10): a stream cut short, a 200 that is not an
event stream, an upstream that ignores ``max_tokens`` or never stops.

A misbehaving OpenAI-compatible stand-in runs on loopback inside the test (one model per
misbehaviour); the provider, the orchestrator in-process and a real ``python server.py``
process (``OPENAI_BASE_URL`` pointing at the stand-in) are each tried against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from reactivex.testing import ReactiveTest, TestScheduler

import server
from core.config import Settings
from core.errors import ProviderError, TurnDeadlineError
from operators import turn_deadline
from pipeline.providers import Delta, Finish, OpenAIProvider, Piece
from tests.sse_client import assert_wire_rules, read_frames
from tests.test_durable_e2e import running_server
from tests.upstream_standin import MODELS, StandIn

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    async with StandIn() as running:
        yield running


async def poll(check: Callable[[], bool], what: str, *, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not within {within_s}s: {what}"
        await asyncio.sleep(0.01)


# -- the provider alone --------------------------------------------------------------------------
async def pieces_of(provider: OpenAIProvider, model: str, **options: Any) -> list[Piece]:
    return [p async for p in provider.stream_chat(
        model=model, messages=[{"role": "user", "content": "hi"}], **options)]


async def test_a_good_stream_is_whole(standin: StandIn) -> None:
    provider = OpenAIProvider(base_url=standin.base_url, api_key="x", max_retries=0)
    try:
        pieces = await pieces_of(provider, "good")
    finally:
        await provider.aclose()
    assert [p for p in pieces if not hasattr(p, "prompt_tokens")] == [
        Delta("w0 "), Delta("w1 "), Delta("w2 "), Finish("stop")]


@pytest.mark.parametrize(("model", "message"), [
    ("no-finish", "the stream ended without a finish_reason or [DONE]"),
    ("html", "HTTP 200 answer is not an event stream (content-type 'text/html; charset=utf-8')"),
])
async def test_a_broken_stream_is_a_retryable_provider_error(
    standin: StandIn, model: str, message: str
) -> None:
    provider = OpenAIProvider(base_url=standin.base_url, api_key="x", max_retries=0)
    try:
        with pytest.raises(ProviderError) as caught:
            await pieces_of(provider, model)
    finally:
        await provider.aclose()
    assert caught.value.retryable is True
    assert str(caught.value) == (
        f"model call to {model!r} at {standin.base_url} failed: {message}")


# -- in-process server ---------------------------------------------------------------------------
def settings_for(standin: StandIn, tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "db_path": tmp_path / "events.duckdb", "openai_base_url": standin.base_url,
        "openai_api_key": "x", "models": MODELS, "default_model": "good",
        "flush_interval_ms": 20, "model_max_retries": 0,
    }
    options.update(overrides)
    return Settings(**options)


async def turn(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "hi"}], **body}) as resp:
        assert resp.status == 200, await resp.text()
        frames = await read_frames(resp)
    return assert_wire_rules(frames, trace=False)


def shape(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each event as (type, the fields that matter to these tests)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        match e["type"]:
            case "text":
                out.append(("text", e["delta"]))
            case "stream_end":
                out.append(("stream_end", e["status"], e.get("finish_reason")))
            case "turn_error":
                out.append(("turn_error", e["error"], e["retryable"]))
            case "done":
                out.append(("done", e["ok"], e["reason"]))
            case other:
                out.append((other,))
    return out


async def test_in_process_a_cut_stream_is_an_error_not_completed(
    aiohttp_client: ClientFactory, standin: StandIn, tmp_path: Path
) -> None:
    client = await aiohttp_client(server.create_app(settings_for(standin, tmp_path)))
    events = await turn(client, {"model": "no-finish"})
    assert shape(events) == [
        ("request_received",), ("stream_start",),
        ("text", "w0 "), ("text", "w1 "), ("text", "w2 "),
        ("turn_error", f"model call to 'no-finish' at {standin.base_url} failed: the stream ended "
                  "without a finish_reason or [DONE]", True),
        ("stream_end", "error", None), ("done", False, "error"),
    ]
    status = await (await client.get(f"/v1/requests/{events[0]['request_id']}")).json()
    assert status["status"] == "error"


async def test_in_process_max_tokens_is_enforced_on_our_side(
    aiohttp_client: ClientFactory, standin: StandIn, tmp_path: Path
) -> None:
    client = await aiohttp_client(server.create_app(settings_for(standin, tmp_path)))
    events = await turn(client, {"model": "endless", "max_tokens": 4})
    assert shape(events) == [
        ("request_received",), ("stream_start",),
        *[("text", f"w{i} ") for i in range(4)],
        ("stream_end", "ok", "length"), ("done", True, "completed"),
    ]
    await poll(lambda: standin.closed == 1, "the upstream stream was closed")


async def test_in_process_the_turn_deadline_ends_an_endless_upstream(
    aiohttp_client: ClientFactory, standin: StandIn, tmp_path: Path
) -> None:
    client = await aiohttp_client(server.create_app(
        settings_for(standin, tmp_path, turn_deadline_s=0.5)))
    events = await turn(client, {"model": "endless"})
    kinds = shape(events)
    texts = [k for k in kinds if k[0] == "text"]
    assert texts, "the upstream streamed before the deadline"
    assert [k for k in kinds if k[0] != "text"] == [
        ("request_received",), ("stream_start",),
        ("turn_error", "the turn ran past its deadline of 0.5s (TURN_DEADLINE_S); stopped", False),
        ("stream_end", "error", None), ("done", False, "error"),
    ]
    await poll(lambda: standin.closed == 1, "the upstream stream was closed")


# -- a real server process -----------------------------------------------------------------------
async def test_process_every_misbehaviour_ends_loudly(standin: StandIn, tmp_path: Path) -> None:
    async with running_server(
            tmp_path / "srv", "upstream", OPENAI_BASE_URL=standin.base_url, OPENAI_API_KEY="x",
            DEFAULT_MODEL="good", MODEL_MAX_RETRIES=0, TURN_DEADLINE_S=1,
            FLUSH_INTERVAL_MS=20) as srv, aiohttp.ClientSession() as session:

        async def run(body: dict[str, Any]) -> list[tuple[Any, ...]]:
            async with session.post(srv.url("/v1/orchestrate"), json={
                    "messages": [{"role": "user", "content": "hi"}], **body}) as resp:
                assert resp.status == 200, await resp.text()
                frames = await read_frames(resp)
            return shape(assert_wire_rules(frames, trace=False))

        failed = f"model call to {{!r}} at {standin.base_url} failed: "
        assert await run({"model": "good"}) == [
            ("request_received",), ("stream_start",), ("text", "w0 "), ("text", "w1 "),
            ("text", "w2 "), ("token_usage",), ("stream_end", "ok", "stop"),
            ("done", True, "completed")]
        assert await run({"model": "no-finish"}) == [
            ("request_received",), ("stream_start",), ("text", "w0 "), ("text", "w1 "),
            ("text", "w2 "),
            ("turn_error", failed.format("no-finish")
             + "the stream ended without a finish_reason or [DONE]", True),
            ("stream_end", "error", None), ("done", False, "error")]
        assert await run({"model": "html"}) == [
            ("request_received",), ("stream_start",),
            ("turn_error", failed.format("html") + "HTTP 200 answer is not an event stream "
             "(content-type 'text/html; charset=utf-8')", True),
            ("stream_end", "error", None), ("done", False, "error")]
        assert await run({"model": "endless", "max_tokens": 3}) == [
            ("request_received",), ("stream_start",), ("text", "w0 "), ("text", "w1 "),
            ("text", "w2 "), ("stream_end", "ok", "length"), ("done", True, "completed")]
        await poll(lambda: standin.closed == 1, "max_tokens closed the upstream")
        deadline = await run({"model": "endless"})
        assert [k for k in deadline if k[0] != "text"] == [
            ("request_received",), ("stream_start",),
            ("turn_error", "the turn ran past its deadline of 1s (TURN_DEADLINE_S); stopped", False),
            ("stream_end", "error", None), ("done", False, "error")]
        await poll(lambda: standin.closed == 2, "the deadline closed the upstream")
        # The OpenAI wire says the same: a cut stream is not a completed answer.
        async with session.post(srv.url("/v1/chat/completions"), json={
                "model": "no-finish", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 502, await resp.text()
            assert (await resp.json())["error"]["code"] == "provider_error"


# -- the deadline operator, in virtual time ----------------------------------------------------
def test_turn_deadline_errors_and_disposes_a_source_that_never_ends() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        on_next(10, "a"), on_next(20, "b"), on_next(30, "c"), on_next(60, "d"))
    results = scheduler.start(lambda: source.pipe(turn_deadline(50, scheduler=scheduler)))
    assert [(m.time, m.value.kind) for m in results.messages] == [
        (210, "N"), (220, "N"), (230, "N"), (250, "E")]
    error = results.messages[-1].value.exception
    assert isinstance(error, TurnDeadlineError) and error.seconds == 50
    assert source.subscriptions == [subscribe(200, 250)]


def test_turn_deadline_lets_a_source_that_ends_in_time_through() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(on_next(10, "a"), on_completed(40))
    results = scheduler.start(lambda: source.pipe(turn_deadline(50, scheduler=scheduler)))
    assert results.messages == [on_next(210, "a"), on_completed(240)]
    assert source.subscriptions == [subscribe(200, 240)]


def test_turn_deadline_passes_an_earlier_error() -> None:
    scheduler = TestScheduler()
    boom = ValueError("boom")
    source = scheduler.create_cold_observable(on_next(10, "a"), on_error(20, boom))
    results = scheduler.start(lambda: source.pipe(turn_deadline(50, scheduler=scheduler)))
    assert results.messages == [on_next(210, "a"), on_error(220, boom)]


def test_turn_deadline_disposed_early_cancels_its_timer() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(on_next(10, "a"))
    results = scheduler.start(lambda: source.pipe(turn_deadline(500, scheduler=scheduler)),
                              disposed=300)
    assert results.messages == [on_next(210, "a")]
    assert source.subscriptions == [subscribe(200, 300)]
    with contextlib.suppress(Exception):
        scheduler.advance_to(2000)
    assert results.messages == [on_next(210, "a")]

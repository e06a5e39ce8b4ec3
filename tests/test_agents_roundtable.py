"""The roundtable across offline-a/b/c, routed roundtables, panel memory, cancelled usage
(issue 14), in process."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from tests.sse_client import assert_wire_rules, read_frames

PANEL = ["offline-a/offline", "offline-b/offline", "offline-c/offline"]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 0,
        "flush_interval_ms": 20, "roundtable_panel": PANEL, "roundtable_rounds": 1,
    }
    options.update(overrides)
    return Settings(**options)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(tmp_path)))


def texts(events: list[dict[str, Any]]) -> dict[str, str]:
    agents = {e["stream_id"]: e["agent"] for e in events if e["type"] == "stream_start"}
    said: dict[str, str] = {}
    for e in events:
        if e["type"] == "text":
            said[agents[e["stream_id"]]] = said.get(agents[e["stream_id"]], "") + e["delta"]
    return said


async def test_the_same_prompt_reads_differently_from_each_offline_provider(
        client: TestClient) -> None:
    answers = []
    for model in PANEL:
        async with client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Same words."}]}) as resp:
            assert resp.status == 200
            answers.append((await resp.json())["choices"][0]["message"]["content"])
    assert len(set(answers)) == 3
    assert answers[1].startswith("[offline-b] ") and answers[2].startswith("[offline-c] ")


async def test_post_roundtable_across_three_providers(client: TestClient) -> None:
    panel = [{"name": p.split("/")[0], "model": p} for p in PANEL]
    async with client.post("/v1/roundtable", json={"topic": "Tabs or spaces?",
                                                    "panelists": panel}) as resp:
        assert resp.status == 200
        events = assert_wire_rules(await read_frames(resp), trace=False)
    said = texts(events)
    assert set(said) == {"moderator", "offline-a", "offline-b", "offline-c"}
    assert len({said["offline-a"], said["offline-b"], said["offline-c"]}) == 3
    models = sorted(e["model"] for e in events if e["type"] == "token_usage")
    assert models == sorted(PANEL)


async def test_the_roundtable_model_seats_the_configured_panel(client: TestClient) -> None:
    async with client.post("/v1/chat/completions", json={
            "model": "roundtable", "messages": [{"role": "user", "content": "Tea?"}]}) as resp:
        assert resp.status == 200
        body = await resp.json()
    contents = [c["message"]["content"] for c in body["choices"]]
    assert len(contents) == 4 and contents[0].startswith("Roundtable with offline-a, offline-b, "
                                                          "offline-c")
    assert contents[2].startswith("[offline-b]") and contents[3].startswith("[offline-c]")


async def test_the_router_sends_roundtable_messages_to_the_panel_and_it_remembers(
        client: TestClient) -> None:
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "roundtable: is Rx worth it?"}],
            "trace": True, "conversation_id": "conv-rt"}) as resp:
        events = assert_wire_rules(await read_frames(resp), trace=True)
    assert [e["route"] for e in events if e["type"] == "route"] == ["roundtable"]
    said = texts(events)
    assert set(said) == {"moderator", "offline-a", "offline-b", "offline-c"}
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "and what did they say?"}],
            "trace": True, "conversation_id": "conv-rt"}) as resp:
        follow = assert_wire_rules(await read_frames(resp), trace=True)
    (call,) = [e for e in follow if e["type"] == "llm_call"]
    remembered = [m["content"] for m in call["messages"] if m["role"] == "assistant"]
    assert remembered == [said["moderator"], f"[offline-a] {said['offline-a']}",
                          f"[offline-b] {said['offline-b']}", f"[offline-c] {said['offline-c']}"]


async def test_a_cancelled_request_counts_the_tokens_it_streamed(
        aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, offline_token_delay_ms=5)))
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "go on"}], "max_tokens": 2000,
            "background": True}) as resp:
        request_id = (await resp.json())["request_id"]
    turn = client.app[server.ORCHESTRATOR].live[request_id]
    seen = 0
    async with contextlib.aclosing(turn.events()) as events_so_far:
        async for event in events_so_far:
            seen += event.type == "text"
            if seen >= 5:
                break
    async with client.post(f"/v1/requests/{request_id}/cancel") as resp:
        assert (await resp.json())["status"] == "cancelled"
    async with client.get(f"/v1/requests/{request_id}/events") as resp:
        events = assert_wire_rules(await read_frames(resp), trace=False)
    streamed = sum(1 for e in events if e["type"] == "text")
    assert streamed >= 5
    async with client.get(f"/v1/requests/{request_id}") as resp:
        body = await resp.json()
    assert body["usage"]["completion_tokens"] == streamed
    assert body["usage"]["total_tokens"] == streamed

"""Router, sub-agents, advisor and costs (issue 14), in process against the offline providers."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from pipeline.provider_registry import RegistryConfigError
from tests.sse_client import assert_wire_rules, events_of, read_frames

AGENTS = [
    {"name": "planner", "system": "You plan.", "model": "offline-b/offline"},
    {"name": "writer", "system": "You write."},
]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 0,
        "flush_interval_ms": 20, "agents": AGENTS,
    }
    options.update(overrides)
    return Settings(**options)


async def run(client: TestClient, text: str, *, trace: bool = True, **body: Any
              ) -> list[dict[str, Any]]:
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": text}], "trace": trace, **body}) as resp:
        assert resp.status == 200, await resp.text()
        return assert_wire_rules(await read_frames(resp), trace=trace)


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def text_by_stream(events: list[dict[str, Any]]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in of(events, "text"):
        texts[e["stream_id"]] = texts.get(e["stream_id"], "") + e["delta"]
    return texts


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(tmp_path)))


async def test_delegate_nests_the_sub_agent_and_the_parent_continues(client: TestClient) -> None:
    events = await run(client, "delegate to writer: a haiku about rivers")
    (route,) = of(events, "route")
    assert route["route"] == "delegate" and "writer" in (route["reason"] or "")
    starts = {e["stream_id"]: e for e in of(events, "stream_start")}
    assert [(s["agent"], s["depth"], s["parent_stream_id"]) for s in starts.values()] == [
        ("assistant", 0, None), ("writer", 1, 1)]
    (call,) = of(events, "tool_call")
    (result,) = of(events, "tool_result")
    assert (call["tool"], call["params"], call["stream_id"]) == ("agent.writer",
                                                                 {"task": "a haiku about rivers"}, 1)
    texts = text_by_stream(events)
    assert texts[2].startswith('You said: "a haiku about rivers".')
    assert result["ok"] is True and result["data"] == {"agent": "writer", "text": texts[2]}
    # the parent model got the result and continued with it
    assert texts[1].startswith("The tool agent_writer returned:")
    assert texts[2].split()[0] in texts[1]
    # the child's events sit between the call and the result, in the parent's stream order
    seqs = [e["seq"] for e in events]
    child = [e["seq"] for e in events if e.get("stream_id") == 2]
    assert call["seq"] < min(child) and max(child) < result["seq"] < seqs[-1]


async def test_nested_delegation_is_bounded_and_models_are_the_agents(
        aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path, max_agent_depth=2)))
    events = await run(client, "delegate to planner: delegate to writer: delegate to planner: x")
    starts = of(events, "stream_start")
    assert [(s["agent"], s["depth"], s["parent_stream_id"]) for s in starts] == [
        ("assistant", 0, None), ("planner", 1, 1), ("writer", 2, 2)]
    # the writer at the bound is offered no agents: it answers in words
    assert text_by_stream(events)[3].startswith('You said: "delegate to planner: x".')
    models = {e["stream_id"]: e["model"] for e in of(events, "token_usage")}
    assert models == {1: "offline", 2: "offline-b/offline", 3: "offline"}
    assert all(e["cost_usd"] is None for e in of(events, "token_usage"))


async def test_replay_is_identical_and_a_view_can_hide_sub_agents(client: TestClient) -> None:
    events = await run(client, "delegate to writer: two lines")
    request_id = events[0]["request_id"]
    async with client.get(f"/v1/requests/{request_id}/events?trace=true") as resp:
        replayed = assert_wire_rules(await read_frames(resp), trace=True)
    assert replayed == events
    async with client.get(f"/v1/requests/{request_id}/events?max_depth=0") as resp:
        top = assert_wire_rules(await read_frames(resp), trace=False)
    assert {e.get("stream_id") for e in top} == {None, 1}
    async with client.get(f"/v1/requests/{request_id}/events?agents=writer") as resp:
        writer = events_of(await read_frames(resp))  # its parent is hidden: not a whole tree
    assert {e.get("stream_id") for e in writer} == {None, 2}
    assert [e["type"] for e in writer][:2] == ["request_received", "stream_start"]
    assert writer[-1]["type"] == "done"
    async with client.get(f"/v1/requests/{request_id}/events?max_depth=-1") as resp:
        assert resp.status == 400


async def test_orchestrate_body_options_filter_the_stream(client: TestClient) -> None:
    events = await run(client, "delegate to writer: short", max_depth=0, trace=False)
    assert [s["agent"] for s in of(events, "stream_start")] == ["assistant"]
    assert of(events, "tool_result")[0]["data"]["agent"] == "writer"


async def test_unknown_agent_and_plain_messages_respond(client: TestClient) -> None:
    events = await run(client, "delegate to nobody: x")
    assert of(events, "route")[0]["route"] == "respond"
    assert [s["agent"] for s in of(events, "stream_start")] == ["assistant"]


async def test_tool_requests_route_to_agent(client: TestClient) -> None:
    events = await run(client, "read the file missing.txt")
    (route,) = of(events, "route")
    assert route["route"] == "agent" and "fs_read" in (route["reason"] or "")


async def test_model_router_has_its_own_stream_and_usage(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, router_model="offline-c/offline",
        prices={"offline-c/offline": {"input": 1.0, "output": 2.0}})))
    events = await run(client, "delegate to writer: hi")
    router = of(events, "stream_start")[0]
    assert (router["agent"], router["depth"]) == ("router", 0)
    calls = of(events, "llm_call")
    assert calls[0]["model"] == "offline-c/offline" and calls[0]["stream_id"] == router["stream_id"]
    usage = [e for e in of(events, "token_usage") if e["stream_id"] == router["stream_id"]]
    assert [u["model"] for u in usage] == ["offline-c/offline"]
    expected = (usage[0]["prompt_tokens"] * 1.0 + usage[0]["completion_tokens"] * 2.0) / 1e6
    assert usage[0]["cost_usd"] == pytest.approx(expected)
    assert of(events, "route")[0]["route"] == "delegate"
    assert [s["agent"] for s in of(events, "stream_start")] == ["router", "assistant", "writer"]
    assert events[-1]["ok"] is True


async def test_a_failing_router_falls_back_to_respond(aiohttp_client: Any, tmp_path: Path) -> None:
    dead = {"dead": {"base_url": f"http://127.0.0.1:{closed_port()}/v1", "models": ["m"],
                     "max_retries": 0}}
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, router_model="dead/m", providers=dead, default_provider="offline-a")))
    events = await run(client, "hello there")
    (error,) = of(events, "error")
    assert "falling back to respond" in error["error"] and error["stream_id"] == 1
    assert "unreachable" in error["error"]
    assert [(e["stream_id"], e["status"]) for e in of(events, "stream_end")] == [
        (1, "error"), (2, "ok")]
    assert of(events, "route")[0] == {**of(events, "route")[0], "route": "respond",
                                      "reason": "the router failed"}
    assert text_by_stream(events)[2].startswith('You said: "hello there".')
    assert events[-1]["type"] == "done" and events[-1]["ok"] is False  # loud, not dead


async def test_advisor_redirect_changes_the_answer(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, advisor_model="offline-c/offline")))
    events = await run(client, "please redirect this answer")
    advice = of(events, "advisor")
    assert [(a["kind"], a["stream_id"]) for a in advice] == [("redirect", 1), ("gate_continue", 1)]
    assert advice[0]["note"]
    before = "".join(e["delta"] for e in of(events, "text")
                     if e["stream_id"] == 1 and e["seq"] < advice[0]["seq"])
    after = "".join(e["delta"] for e in of(events, "text")
                    if e["stream_id"] == 1 and e["seq"] > advice[0]["seq"])
    assert before and after and before != after
    assert "Advisor note" in after  # the offline model quotes the note it was given
    advisors = [s for s in of(events, "stream_start") if s["agent"] == "advisor"]
    assert [(s["depth"], s["parent_stream_id"]) for s in advisors] == [(1, 1), (1, 1)]
    advisor_usage = [u for u in of(events, "token_usage")
                     if u["stream_id"] in {s["stream_id"] for s in advisors}]
    assert {u["model"] for u in advisor_usage} == {"offline-c/offline"}
    plain = await run(client, "no trouble here")
    assert [a["kind"] for a in of(plain, "advisor")] == ["gate_continue"]


async def test_costs_in_rows_view_and_messages(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, prices={"offline-a/offline": {"input": 3.0, "output": 6.0},
                          "offline-b/offline": {"input": 10.0, "output": 20.0}})))
    events = await run(client, "delegate to planner: plan a trip")
    usage = of(events, "token_usage")
    assert all(u["cost_usd"] is not None for u in usage)
    total = sum(u["cost_usd"] for u in usage)
    request_id = events[0]["request_id"]
    store = client.app[server.STORE]
    await store.flush()
    ((row_cost,),) = store.query("SELECT cost_usd FROM requests WHERE request_id = ?", [request_id])
    assert row_cost == pytest.approx(total)
    ((message_cost,),) = store.query(
        "SELECT cost_usd FROM messages WHERE request_id = ? AND role = 'assistant'", [request_id])
    assert message_cost == pytest.approx(total)
    rows = store.query("SELECT provider, model, requests, prompt_tokens, completion_tokens, cost_usd"
                       " FROM costs_by_model_day ORDER BY provider")
    by_model = {(p, m): (n, pt, ct, c) for p, m, n, pt, ct, c in rows}
    b = [u for u in usage if u["model"] == "offline-b/offline"]
    assert by_model[("offline-b", "offline")] == (
        1, sum(u["prompt_tokens"] for u in b), sum(u["completion_tokens"] for u in b),
        pytest.approx(sum(u["cost_usd"] for u in b)))
    async with client.get(f"/v1/requests/{request_id}") as resp:
        body = await resp.json()
    assert body["response"]["cost_usd"] == pytest.approx(total)  # the assistant message
    assert json.dumps(body)  # the round is JSON


async def test_unknown_models_in_the_settings_are_refused_at_start(tmp_path: Path) -> None:
    for options in ({"router_model": "offline-a/nope"}, {"advisor_model": "nowhere/x"},
                    {"agents": [{"name": "a", "model": "offline-b/gpt-9"}]},
                    {"roundtable_panel": ["offline-c/missing"]}):
        app = server.create_app(make_settings(tmp_path, **options))
        with pytest.raises(RegistryConfigError, match="does not exist"):
            async with contextlib.AsyncExitStack() as stack:
                for ctx in app.cleanup_ctx:  # start the resources as the server would
                    await stack.enter_async_context(contextlib.asynccontextmanager(ctx)(app))


async def test_a_sub_agent_uses_only_its_allowed_tools(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path, agents=[
        {"name": "reader", "system": "You read.", "tools": ["fs.read"]},
        {"name": "plain", "system": "You talk."}])))
    workspace = client.app[server.SETTINGS].fs_base
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "note.txt").write_text("seven blue herons")
    events = await run(client, "delegate to reader: read the file note.txt")
    calls = [(e["stream_id"], e["tool"]) for e in of(events, "tool_call")]
    assert calls == [(1, "agent.reader"), (2, "fs.read")]
    assert 'returned: "seven blue herons"' in text_by_stream(events)[2]
    events = await run(client, "delegate to plain: read the file note.txt")
    assert [e["tool"] for e in of(events, "tool_call")] == ["agent.plain"]  # offered no tools
    assert text_by_stream(events)[2].startswith('You said: "read the file note.txt".')


async def test_cancelling_inside_a_sub_agent_closes_its_streams_innermost_first(
        aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(make_settings(
        tmp_path, offline_token_delay_ms=5)))
    async with client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "delegate to writer: a long story"}],
            "max_tokens": 2000, "background": True}) as resp:
        request_id = (await resp.json())["request_id"]
    turn = client.app[server.ORCHESTRATOR].live[request_id]
    async with contextlib.aclosing(turn.events()) as live:
        async for event in live:
            if event.type == "text" and getattr(event, "stream_id", 0) == 2:
                break
    async with client.post(f"/v1/requests/{request_id}/cancel") as resp:
        assert (await resp.json())["status"] == "cancelled"
    async with client.get(f"/v1/requests/{request_id}/events") as resp:
        events = assert_wire_rules(await read_frames(resp), trace=False)  # a closed tree
    assert [(e["stream_id"], e["status"]) for e in of(events, "stream_end")] == [
        (2, "cancelled"), (1, "cancelled")]
    assert events[-1]["reason"] == "cancelled"
    async with client.get(f"/v1/requests/{request_id}") as resp:
        body = await resp.json()
    assert body["usage"]["completion_tokens"] == len(of(events, "text")) >= 1

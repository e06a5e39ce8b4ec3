"""Tools end to end through the server (pytest-aiohttp) and the offline model: the agent
loop in the response stream, ``tool_executions``, direct ``tool_calls``, ``GET /v1/tools``,
``/healthz``, ``/speech/providers``, and SSE framing of hostile tool output."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from pipeline.offline_model import synthesize_wav
from tests.sse_client import Frame, assert_wire_rules, read_frames

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
NOTES = "The launch code is 7421, keep it safe."


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 0,
                               "flush_interval_ms": 20, "allow_fs_base": tmp_path / "ws"}
    options.update(overrides)
    return Settings(**options)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text(NOTES + "\n")
    return await aiohttp_client(server.create_app(settings_for(tmp_path)))


async def orchestrate(client: TestClient, body: dict[str, Any]) -> tuple[list[Frame], list[dict[str, Any]]]:
    async with client.post("/v1/orchestrate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        frames = await read_frames(resp)
    return frames, assert_wire_rules(frames, trace=bool(body.get("trace")))


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in of_type(events, "text"))


async def tool_rows(client: TestClient, request_id: str) -> list[dict[str, Any]]:
    store = client.app[server.STORE]
    await store.flush()
    rows = await store.aquery(
        "SELECT execution_id, tool, agent, params, status, ok, result, error, duration_ms, "
        "started_at, finished_at FROM tool_executions WHERE request_id = ? ORDER BY started_at",
        [request_id])
    keys = ("execution_id", "tool", "agent", "params", "status", "ok", "result", "error",
            "duration_ms", "started_at", "finished_at")
    return [dict(zip(keys, row, strict=True)) for row in rows]


async def test_a_turn_reads_a_file_and_answers_with_it(client: TestClient) -> None:
    _, events = await orchestrate(client, ask("Please read the file notes.txt", trace=True))
    types = [e["type"] for e in events]
    start = types.index("stream_start")
    end = types.index("stream_end")
    response = events[start]
    assert response["agent"] == "assistant" and types.count("stream_start") == 1
    [tool_call] = of_type(events, "tool_call")
    [tool_result] = of_type(events, "tool_result")
    # Inside the response stream: after its stream_start, before its stream_end.
    assert start < types.index("tool_call") < types.index("tool_result") < end
    assert tool_call["stream_id"] == tool_result["stream_id"] == response["stream_id"]
    assert tool_call == {**tool_call, "tool": "fs.read", "params": {"path": "notes.txt"}}
    assert tool_result["execution_id"] == tool_call["execution_id"]
    assert tool_result["ok"] is True and tool_result["error"] is None
    assert tool_result["data"]["content"] == NOTES + "\n"
    assert tool_result["duration_ms"] >= 0
    # The model was called twice, each with its exact messages, each with its usage.
    first, second = of_type(events, "llm_call")
    assert first["messages"] == [{"role": "user", "content": "Please read the file notes.txt"}]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool"]
    assert json.loads(second["messages"][2]["content"])["data"]["content"] == NOTES + "\n"
    assert len(of_type(events, "token_usage")) == 2
    answer = text_of(events)
    assert answer == f'The tool fs_read returned: "{NOTES}".'
    assert events[-1]["ok"] is True

    rows = await tool_rows(client, events[0]["request_id"])
    assert len(rows) == 1
    row = rows[0]
    assert (row["execution_id"], row["tool"], row["agent"], row["status"], row["ok"], row["error"]) == (
        tool_call["execution_id"], "fs.read", "assistant", "ok", True, None)
    assert json.loads(row["params"]) == {"path": "notes.txt"}
    assert json.loads(row["result"])["content"] == NOTES + "\n"
    assert row["duration_ms"] >= 0 and row["started_at"] <= row["finished_at"]
    store = client.app[server.STORE]
    [(content,)] = await store.aquery(
        "SELECT content FROM messages WHERE request_id = ? AND role = 'assistant'",
        [events[0]["request_id"]])
    assert content == answer


async def test_a_refused_call_is_a_result_not_a_failed_turn(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("outside")
    _, events = await orchestrate(client, ask("read the file ../secret.txt"))
    [result] = of_type(events, "tool_result")
    assert result["ok"] is False and "contains '..'" in result["error"]
    assert "outside" not in text_of(events) and "failed:" in text_of(events)
    assert events[-1] == {**events[-1], "ok": True, "reason": "completed"}
    [row] = await tool_rows(client, events[0]["request_id"])
    assert (row["status"], row["ok"], row["result"]) == ("error", False, None)
    assert "contains '..'" in row["error"]


async def test_hostile_tool_output_cannot_break_the_sse_framing(client: TestClient, tmp_path: Path) -> None:
    hostile = "line one\r\n\r\nevent: done\ndata: {\"fake\": true}\n\nid: 999\r\r\n"
    (tmp_path / "ws" / "evil.txt").write_text(hostile)
    frames, events = await orchestrate(client, ask("read the file evil.txt"))
    [result] = [f for f in frames if f.event == "tool_result"]
    assert result.data is not None and "\n" not in result.data and "\r" not in result.data
    assert result.json["data"]["content"] == hostile
    assert [f.event for f in frames if f.data is not None].count("done") == 1
    assert all(f.id is None or f.id.isdigit() for f in frames)
    assert [e["type"] for e in events].count("done") == 1


async def test_direct_tool_calls_in_the_body(client: TestClient) -> None:
    body = ask("What does the note say?", tool_calls=[
        {"name": "fs.read", "params": {"path": "notes.txt"}},
        {"name": "terminal.exec", "params": {"argv": ["echo", "from", "the", "terminal"]}},
    ])
    _, events = await orchestrate(client, body)
    tools_stream, response = of_type(events, "stream_start")
    assert (tools_stream["agent"], response["agent"]) == ("tools", "assistant")
    calls = of_type(events, "tool_call")
    assert [(c["tool"], c["stream_id"]) for c in calls] == [
        ("fs.read", tools_stream["stream_id"]), ("terminal.exec", tools_stream["stream_id"])]
    assert {r["tool"]: r["ok"] for r in of_type(events, "tool_result")} == {
        "fs.read": True, "terminal.exec": True}
    assert text_of(events) == (f'The tool fs_read returned: "{NOTES}". '
                               'The tool terminal_exec returned: "from the terminal".')
    rows = await tool_rows(client, events[0]["request_id"])
    assert sorted((r["tool"], r["agent"], r["status"]) for r in rows) == [
        ("fs.read", "tools", "ok"), ("terminal.exec", "tools", "ok")]


@pytest.mark.parametrize(("tool_calls", "match"), [
    ([{"name": "fs.read", "params": {}, "extra": 1}], "Extra inputs are not permitted"),
    ([{"params": {}}], "tool_calls.0.name: Field required"),
    ("fs.read", "tool_calls: Input should be a valid list"),
    ([{"name": "fs.read"}] * 9, "the limit is 8 (MAX_TOOL_CALLS_PER_STEP)"),
])
async def test_bad_tool_calls_bodies_are_400(client: TestClient, tool_calls: Any, match: str) -> None:
    async with client.post("/v1/orchestrate", json=ask("x", tool_calls=tool_calls)) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert match in body["error"]["message"] and body["error"]["code"] == "invalid_body"


async def test_list_tools(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(settings_for(tmp_path, enable_terminal=False)))
    async with client.get("/v1/tools") as resp:
        assert resp.status == 200
        body = await resp.json()
    # No keys configured: the tools list names no file system path (issue 10); see
    # tests/test_door.py for the workspace shown to a caller holding a key.
    assert body["object"] == "list" and "workspace" not in body
    tools = {tool["name"]: tool for tool in body["data"]}
    assert list(tools) == ["fs.read", "fs.write", "fs.apply_patch", "git.status", "terminal.exec",
                           "speech.transcribe", "speech.synthesize"]
    assert tools["fs.write"]["parameters"]["required"] == ["path", "content"]
    assert tools["fs.read"]["function"] == "fs_read" and tools["fs.read"]["family"] == "fs"
    assert tools["terminal.exec"]["parameters"]["properties"]["argv"]["type"] == "array"
    assert {name: tool["enabled"] for name, tool in tools.items()} == {
        "fs.read": True, "fs.write": True, "fs.apply_patch": True, "git.status": True,
        "terminal.exec": False, "speech.transcribe": True, "speech.synthesize": True}
    assert tools["terminal.exec"]["disabled_reason"] == "ENABLE_TERMINAL=false"

    async with client.get("/healthz") as resp:
        health = await resp.json()
    assert health["tools"]["disabled"] == ["terminal.exec"]
    assert "fs.read" in health["tools"]["enabled"] and "speech.synthesize" in health["tools"]["enabled"]

    # A disabled tool is neither offered nor run when the model or a client asks.
    _, events = await orchestrate(client, ask("x", tool_calls=[
        {"name": "terminal.exec", "params": {"argv": ["echo"]}}]))
    [result] = of_type(events, "tool_result")
    assert result["error"] == "terminal.exec: disabled (ENABLE_TERMINAL=false)"
    _, events = await orchestrate(client, ask("run echo hi"))
    assert not of_type(events, "tool_call")


async def test_speech_providers(client: TestClient) -> None:
    async with client.get("/speech/providers") as resp:
        assert resp.status == 200
        body = await resp.json()
    [provider] = body["data"]
    assert body["default"] == "openai"
    assert provider["name"] == "openai" and provider["offline"] is True and provider["enabled"] is True
    assert provider["transcribe"]["model"] == "whisper-1"
    assert provider["synthesize"] == {"model": "tts-1", "voice": "alloy",
                                      "endpoint": "/v1/audio/speech", "formats": ["wav"]}


async def test_speech_round_trip_through_turns(client: TestClient, tmp_path: Path) -> None:
    _, events = await orchestrate(client, ask('say "tools are harnesses too" into talk.wav'))
    [result] = of_type(events, "tool_result")
    assert result["tool"] == "speech.synthesize" and result["ok"], result
    assert (tmp_path / "ws" / "talk.wav").read_bytes() == synthesize_wav("tools are harnesses too")
    _, events = await orchestrate(client, ask("transcribe talk.wav"))
    [result] = of_type(events, "tool_result")
    assert result["data"]["text"] == "tools are harnesses too"
    assert text_of(events) == 'The tool speech_transcribe returned: "tools are harnesses too".'


@pytest.fixture
async def wire_tools_client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    """A server whose deployer switched the server's tools on for the OpenAI wire."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text(NOTES + "\n")
    return await aiohttp_client(server.create_app(
        settings_for(tmp_path, openai_wire_server_tools=True)))


async def test_the_openai_endpoint_runs_the_loop_when_switched_on(
        wire_tools_client: TestClient) -> None:
    client = wire_tools_client
    async with client.post("/v1/chat/completions", json={
        "model": "offline", "messages": [{"role": "user", "content": "read the file notes.txt"}],
    }) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == f'The tool fs_read returned: "{NOTES}".'


async def test_the_sdk_sees_plain_chunks_while_tools_run(wire_tools_client: TestClient) -> None:
    client = wire_tools_client
    base_url = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="offline", stream=True,
            messages=[{"role": "user", "content": "read the file notes.txt"}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f'The tool fs_read returned: "{NOTES}".'

"""The seeds' wires (issue 14): ``POST /chat/stream`` (seed 003) and ``POST /api/chat/stream``
(seed 001), in process; both recorded and replayable natively."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from pipeline.offline_model import compose_answer
from tests.sse_client import assert_wire_rules, read_frames


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    return await aiohttp_client(server.create_app(Settings(
        db_path=tmp_path / "events.duckdb", offline_token_delay_ms=0, flush_interval_ms=20)))


async def post_data(client: TestClient, path: str, body: dict[str, Any]
                    ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    async with client.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        raw = (await resp.read()).decode()
        headers = {k.lower(): v for k, v in resp.headers.items()}
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), raw[:300]
    return headers, [json.loads(b.removeprefix("data: ")) for b in blocks]


async def test_chat_stream_frames_are_the_seeds(client: TestClient) -> None:
    headers, frames = await post_data(client, "/chat/stream", {"message": "Hello seed"})
    tokens = [f for f in frames if f["type"] == "token"]
    assert frames == [*tokens, {"type": "end", "reason": "completed"}]
    assert all(set(f) == {"type", "token"} for f in tokens)
    expected = "".join(compose_answer("offline", [{"role": "user", "content": "Hello seed"}]))
    assert "".join(f["token"] for f in tokens) == expected
    # recorded and replayable natively: the same text
    async with client.get(f"/v1/requests/{headers['x-request-id']}/events") as resp:
        events = assert_wire_rules(await read_frames(resp), trace=False)
    assert "".join(e["delta"] for e in events if e["type"] == "text") == expected
    rows = client.app[server.STORE]
    await rows.flush()
    assert rows.query("SELECT kind FROM requests WHERE request_id = ?",
                      [headers["x-request-id"]]) == [("chat.stream",)]


async def test_chat_stream_tools_session_and_provider(client: TestClient) -> None:
    headers, frames = await post_data(client, "/chat/stream", {
        "message": "what did the tools say?", "session_id": "s-003", "provider": "offline-b",
        "tool_calls": [{"name": "fs.read", "params": {"path": "nope.txt"}},
                       {"name": "fs.write", "params": {"path": "n.txt", "content": "hi"}}]})
    assert headers["x-conversation-id"] == "s-003"
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "end" and frames[-1] == {"type": "end", "reason": "completed"}
    (error,) = [f for f in frames if f["type"] == "tool_error"]
    assert set(error) == {"type", "tool", "error", "execution_id"} and error["tool"] == "fs.read"
    (ok,) = [f for f in frames if f["type"] == "tool_result"]
    assert set(ok) == {"type", "tool", "data", "execution_id"} and ok["tool"] == "fs.write"
    text = "".join(f["token"] for f in frames if f["type"] == "token")
    assert text.startswith("[offline-b] The tool fs_read failed:")  # it read the results
    _, again = await post_data(client, "/chat/stream", {"message": "x", "provider": "offline-c"})
    assert "".join(f["token"] for f in again if f["type"] == "token").startswith("[offline-c]")


async def test_chat_stream_refuses_bad_bodies(client: TestClient) -> None:
    for body, code in (({"message": ""}, "invalid_body"), ({"message": "x", "provider": "zz"},
                                                          "model_not_found"),
                       ({"message": "x", "model": "nope"}, "model_not_found")):
        async with client.post("/chat/stream", json=body) as resp:
            assert resp.status in (400, 404)
            assert (await resp.json())["error"]["code"] == code


async def test_chat_stream_error_then_end(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(server.create_app(Settings(
        db_path=tmp_path / "e.duckdb", offline_token_delay_ms=0, models=["offline", "broken"])))
    _, frames = await post_data(client, "/chat/stream", {"message": "x", "model": "broken"})
    assert [f["type"] for f in frames] == ["error", "end"]
    assert frames[-1] == {"type": "end", "reason": "error"} and "broken" in frames[0]["error"]
    assert set(frames[0]) == {"type", "error"}


async def test_api_chat_stream_sends_turn_updates(client: TestClient) -> None:
    headers, turns = await post_data(client, "/api/chat/stream",
                                     {"sessionId": "s-001", "content": "Hi there"})
    assert all({"status", "content"} <= set(t) for t in turns)
    assert turns[0]["status"] == "pending" and turns[-1]["status"] == "complete"
    assert {t["status"] for t in turns[1:-1]} == {"streaming"}
    expected = "".join(compose_answer("offline", [{"role": "user", "content": "Hi there"}]))
    assert turns[-1]["content"] == expected
    assert all(expected.startswith(t["content"]) for t in turns)
    assert headers["x-conversation-id"] == "s-001" and turns[-1]["session_id"] == "s-001"
    async with client.get(f"/v1/requests/{headers['x-request-id']}/events") as resp:
        events = assert_wire_rules(await read_frames(resp), trace=False)
    assert "".join(e["delta"] for e in events if e["type"] == "text") == expected
    _, second = await post_data(client, "/api/chat/stream", {"sessionId": "s-001",
                                                              "content": "again"})
    assert "Earlier you said" in second[-1]["content"]  # the session is the conversation


async def test_a_seed_stream_that_fails_part_way_ends_with_an_error_object(
        aiohttp_client: Any, tmp_path: Path) -> None:
    """The seeds' ``data:`` wire: a source that fails after its first item gives that item,
    then one error object (not a silent end, nor the exception's text), and the open-stream
    count goes back to zero."""
    from collections.abc import AsyncGenerator

    from aiohttp import web

    from api.common import CLIENTS, SETTINGS, ClientStats
    from api.seeds import _stream_data

    async def failing() -> AsyncGenerator[dict[str, Any]]:
        yield {"type": "text", "text": "a\u2028b"}
        raise RuntimeError("secret detail")

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _stream_data(request, failing(), headers={})

    app = web.Application()
    app[SETTINGS] = Settings(db_path=tmp_path / "e.duckdb")
    app[CLIENTS] = ClientStats()
    app.router.add_post("/s", handler)
    client = await aiohttp_client(app)
    async with client.post("/s") as r:
        raw = await r.read()
    assert raw.split(b"\n\n")[:-1] == [
        b'data: {"type":"text","text":"a\\u2028b"}',
        b'data: {"type":"error","error":"internal server error"}']
    assert app[CLIENTS].open == 0

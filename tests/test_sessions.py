"""SessionCoordinator (seed 001) and the WebSocket endpoint /v1/ws."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from pipeline.offline_model import OfflineModelServer, compose_answer
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import OpenAIProvider
from pipeline.sessions import SessionCoordinator, TurnFailedError
from sinks.store import EventStore

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


def expected(*user_texts: str) -> str:
    """The offline answer to the last of ``user_texts`` after the earlier turns."""
    messages: list[dict[str, str]] = []
    text = ""
    for content in user_texts:
        messages.append({"role": "user", "content": content})
        text = "".join(compose_answer("offline", messages))
        messages.append({"role": "assistant", "content": text})
    return text


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[SessionCoordinator]:
    store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=20).open()
    async with OfflineModelServer(token_delay_ms=1) as model:
        provider = OpenAIProvider(base_url=model.base_url, api_key="x", max_retries=0)
        orchestrator = StreamingOrchestrator(provider=provider, store=store,
                                             default_model="offline")
        yield SessionCoordinator(orchestrator, store=store)
        await orchestrator.drain(grace_s=5)
        await provider.aclose()
    store.close()


async def test_handle_request_returns_the_id_at_once_and_completes(
    coordinator: SessionCoordinator,
) -> None:
    handle = await coordinator.handle_request(None, "tell me about streams")
    assert handle.response_id.startswith("req_") and not handle.completion.done()
    result = await handle.completion
    assert result.status == "completed"
    assert result.content == expected("tell me about streams")
    round_ = await coordinator.get_round(handle.response_id)
    assert round_ is not None and round_.status == "completed" and not round_.live
    assert [m["content"] for m in round_.request] == ["tell me about streams"]
    assert round_.response is not None and round_.response["content"] == result.content
    assert round_.usage["completion_tokens"] == result.usage.completion_tokens


async def test_stream_request_updates_end_complete_and_session_continues(
    coordinator: SessionCoordinator,
) -> None:
    first = await coordinator.handle_request(None, "first")
    await first.completion
    handle = await coordinator.stream_request(first.session_id, "second")
    async with contextlib.aclosing(handle.updates) as updates:
        seen = [update async for update in updates]
    assert seen[0].status == "pending" and seen[-1].status == "complete"
    assert {u.status for u in seen[1:-1]} == {"streaming"}
    assert "".join(u.delta for u in seen) == seen[-1].content == expected("first", "second")
    assert [u.seq for u in seen] == sorted({u.seq for u in seen})
    assert (await handle.completion).content == seen[-1].content


async def test_abandoning_the_updates_does_not_stop_the_turn(
    coordinator: SessionCoordinator,
) -> None:
    handle = await coordinator.stream_request(None, "walk away")
    async with contextlib.aclosing(handle.updates) as updates:
        async for update in updates:
            if update.status == "streaming":
                break
    turn = coordinator.orchestrator.live[handle.response_id]
    assert turn.subscribers == 1  # only the recorder follows it now
    result = await handle.completion
    assert result.status == "completed" and result.content == expected("walk away")


async def test_errors_reach_the_completion(coordinator: SessionCoordinator) -> None:
    handle = await coordinator.handle_request(None, "x", model="no-such-model")
    with pytest.raises(TurnFailedError) as caught:
        await handle.completion
    assert caught.value.result.status == "error" and "404" in (caught.value.result.error or "")


async def test_get_round_of_unknown_id_is_none(coordinator: SessionCoordinator) -> None:
    assert await coordinator.get_round("req_nope") is None


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    settings = Settings(db_path=tmp_path / "events.duckdb", offline_token_delay_ms=1,
                        flush_interval_ms=20)
    return await aiohttp_client(server.create_app(settings))


async def receive_until_complete(ws: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while True:
        frame = await asyncio.wait_for(ws.receive_json(), timeout=10)
        frames.append(frame)
        if frame["type"] == "complete":
            return frames


async def test_websocket_chat_gets_id_updates_and_completion(client: TestClient) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_json({"type": "chat", "content": "hello socket"})
        frames = await receive_until_complete(ws)
        kinds = [f["type"] for f in frames]
        assert kinds[0] == "response_id" and kinds[-1] == "complete"
        assert set(kinds[1:-1]) == {"update"}
        response_id = frames[0]["response_id"]
        assert frames[-1] == {"type": "complete", "response_id": response_id,
                              "status": "completed", "error": None}
        final = frames[-2]["turn"]
        assert final["status"] == "complete" and final["content"] == expected("hello socket")
        # The same socket continues the session.
        await ws.send_json({"type": "chat", "content": "again",
                            "session_id": frames[0]["session_id"]})
        again = await receive_until_complete(ws)
        assert again[-2]["turn"]["content"] == expected("hello socket", "again")


async def test_websocket_bad_messages_get_errors_and_the_socket_stays(client: TestClient) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        for bad in ("not json", '{"type": "dance"}', '{"type": "chat", "content": ""}'):
            await ws.send_str(bad)
            frame = await asyncio.wait_for(ws.receive_json(), timeout=5)
            assert frame["type"] == "error" and frame["error"]["code"] == "invalid_message"
        await ws.send_json({"type": "chat", "content": "x", "model": "nope"})
        frame = await asyncio.wait_for(ws.receive_json(), timeout=5)
        assert frame["error"]["code"] == "model_not_found"
        await ws.send_json({"type": "chat", "content": "still here"})
        frames = await receive_until_complete(ws)
        assert frames[-1]["status"] == "completed"


async def test_websocket_cancel_and_close_leave_nothing_behind(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    settings = Settings(db_path=tmp_path / "events.duckdb", offline_token_delay_ms=20,
                        flush_interval_ms=20)
    client = await aiohttp_client(server.create_app(settings))
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_json({"type": "chat", "content": "long one"})
        response_id = (await ws.receive_json())["response_id"]
        await ws.receive_json()  # the pending update
        await ws.send_json({"type": "cancel", "response_id": response_id})
        frames = await receive_until_complete(ws)
        assert frames[-1]["status"] == "cancelled"
        assert frames[-2]["turn"]["status"] == "cancelled"
        # A second chat, then the socket closes mid-turn: the turn runs on, alone.
        await ws.send_json({"type": "chat", "content": "left behind"})
        left = (await ws.receive_json())["response_id"]
    turn = client.app[server.ORCHESTRATOR].live.get(left)
    if turn is not None:
        result = await asyncio.wait_for(turn.result, timeout=10)
        assert result.status == "completed"
    async with client.get(f"/v1/requests/{left}") as resp:
        body = await resp.json()
    assert body["status"] == "completed" and body["live"] is False

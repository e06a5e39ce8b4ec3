"""The HTTP server in-process (pytest-aiohttp), with the offline model or a failing one."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import server
from api.openai import completion_of
from api.wire import ApiError
from core.config import Settings
from pipeline.offline_model import compose_answer, count_prompt_tokens
from tests.sse_client import (
    TRACE_TYPES,
    Frame,
    SSEParser,
    assert_wire_rules,
    iter_frames,
    parse_sse,
    read_frames,
)

MODEL = "offline"
ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def answer(messages: list[dict[str, str]], *, max_tokens: int | None = None) -> str:
    return "".join(compose_answer(MODEL, messages, max_tokens=max_tokens))


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 1,
        "flush_interval_ms": 20,
    }
    options.update(overrides)
    return Settings(**options)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(tmp_path)))


async def orchestrate(
    client: TestClient, body: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, list[Frame]]:
    async with client.post("/v1/orchestrate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return resp, await read_frames(resp)


async def query(client: TestClient, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    store = client.app[server.STORE]
    await store.flush()
    return await store.aquery(sql, params)


async def request_row(client: TestClient, request_id: str) -> dict[str, Any]:
    rows = await query(
        client,
        "SELECT status, prompt_tokens, completion_tokens, total_tokens, last_seq, model, error,"
        " kind, conversation_id FROM requests WHERE request_id = ?",
        request_id,
    )
    assert len(rows) == 1, rows
    keys = ("status", "prompt_tokens", "completion_tokens", "total_tokens", "last_seq", "model",
            "error", "kind", "conversation_id")
    return dict(zip(keys, rows[0], strict=True))


async def message_rows(client: TestClient, request_id: str) -> list[tuple[str, str, str]]:
    return [
        (role, content, status)
        for role, content, status in await query(
            client,
            "SELECT role, content, status FROM messages WHERE request_id = ? ORDER BY ordinal",
            request_id,
        )
    ]


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in of_type(events, "text"))


def assert_json_error(body: Any, *, code: str | None = None) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert "code" in error, error
    if code is not None:
        assert error["code"] == code, error
    return error


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- health and models ---------------------------------------------------------------------
async def test_healthz(client: TestClient) -> None:
    async with client.get("/healthz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ok"
    assert body["model"]["offline"] is True and body["model"]["default"] == MODEL
    assert body["live_turns"] == 0
    assert body["store"]["failed_flushes"] == 0


async def test_models(client: TestClient) -> None:
    async with client.get("/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    # issue 14: the default provider's models bare, every model as provider/model, roundtable
    assert [m["id"] for m in body["data"]] == [
        MODEL, "offline-a/offline", "offline-b/offline", "offline-c/offline", "roundtable"]
    assert all(m["object"] == "model" for m in body["data"])


# -- native stream -------------------------------------------------------------------------
async def test_orchestrate_without_trace(client: TestClient) -> None:
    messages = [user("How do rivers form?")]
    resp, frames = await orchestrate(client, {"messages": messages})
    events = assert_wire_rules(frames, trace=False)
    assert not TRACE_TYPES.intersection(e["type"] for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs != list(range(1, len(seqs) + 1)), "hidden trace events leave seq gaps"
    request_id = events[0]["request_id"]
    assert resp.headers["X-Request-Id"] == request_id
    assert resp.headers["X-Conversation-Id"] == events[0]["conversation_id"]
    assert [e["type"] for e in events if e["type"] != "text"] == [
        "request_received", "stream_start", "token_usage", "stream_end", "done",
    ]
    assert text_of(events) == answer(messages)
    assert of_type(events, "stream_end")[0]["status"] == "ok"
    done = events[-1]
    assert done["ok"] is True and done["reason"] == "completed"


async def test_orchestrate_with_trace(client: TestClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("Name a colour.")]
    resp, frames = await orchestrate(client, {"messages": messages, "trace": True})
    events = assert_wire_rules(frames, trace=True)
    assert resp.headers["X-Request-Id"] == events[0]["request_id"]
    types = [e["type"] for e in events]
    assert TRACE_TYPES <= set(types)
    assert of_type(events, "route")[0]["route"]
    assert of_type(events, "memory")[0]["messages_loaded"] == 0
    (llm_call,) = of_type(events, "llm_call")
    assert llm_call["messages"] == messages
    assert llm_call["model"] == MODEL
    assert llm_call["stream_id"] == of_type(events, "stream_start")[0]["stream_id"]
    assert text_of(events) == answer(messages)


async def test_second_turn_sees_the_first(client: TestClient) -> None:
    conversation = "conv-history-test"
    first = [user("My cat is called Saffron.")]
    _, frames = await orchestrate(client, {"messages": first, "conversation_id": conversation})
    first_events = assert_wire_rules(frames, trace=False)
    first_text = text_of(first_events)
    assert first_events[0]["conversation_id"] == conversation

    second = [user("What is my cat called?")]
    resp, frames = await orchestrate(
        client, {"messages": second, "conversation_id": conversation, "trace": True}
    )
    events = assert_wire_rules(frames, trace=True)
    assert resp.headers["X-Conversation-Id"] == conversation
    sent = [*first, {"role": "assistant", "content": first_text}, *second]
    assert of_type(events, "memory")[0]["messages_loaded"] == 2
    assert of_type(events, "llm_call")[0]["messages"] == sent
    text = text_of(events)
    assert text == answer(sent)
    assert 'Earlier you said: "My cat is called Saffron.".' in text


async def test_store_holds_the_turn(client: TestClient) -> None:
    messages = [user("Store me, please.")]
    _, frames = await orchestrate(client, {"messages": messages})
    events = assert_wire_rules(frames, trace=False)
    request_id = events[0]["request_id"]
    last_seq = events[-1]["seq"]

    stored = await query(
        client,
        "SELECT seq, type, visibility, data FROM events WHERE request_id = ? ORDER BY seq",
        request_id,
    )
    assert [row[0] for row in stored] == list(range(1, last_seq + 1))
    by_seq = {seq: (kind, vis, json.loads(data)) for seq, kind, vis, data in stored}
    for event in events:  # what the client saw is stored exactly
        assert by_seq[event["seq"]][2] == event
    trace_rows = {kind for kind, vis, _ in by_seq.values() if vis == "trace"}
    assert trace_rows == TRACE_TYPES

    (usage,) = of_type(events, "token_usage")
    row = await request_row(client, request_id)
    assert row["status"] == "completed"
    assert row["kind"] == "orchestrate"
    assert row["last_seq"] == last_seq
    assert row["model"] == MODEL
    assert row["prompt_tokens"] == usage["prompt_tokens"] == count_prompt_tokens(messages)
    assert row["completion_tokens"] == usage["completion_tokens"] == len(of_type(events, "text"))
    assert row["total_tokens"] == usage["total_tokens"]
    assert row["error"] is None

    assert await message_rows(client, request_id) == [
        ("user", "Store me, please.", "complete"),
        ("assistant", text_of(events), "complete"),
    ]


# -- request validation and errors ---------------------------------------------------------
GOOD = [user("hello")]
BAD_ORCHESTRATE_BODIES: dict[str, bytes] = {
    "invalid JSON": b'{"messages": [',
    "not an object": b'[{"role": "user", "content": "hi"}]',
    "empty messages": json.dumps({"messages": []}).encode(),
    "unknown field": json.dumps({"messages": GOOD, "colour": "red"}).encode(),
    "wrong role": json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(),
    "max_tokens 0": json.dumps({"messages": GOOD, "max_tokens": 0}).encode(),
    "trace yes": json.dumps({"messages": GOOD, "trace": "yes"}).encode(),
    "max_tokens true": json.dumps({"messages": GOOD, "max_tokens": True}).encode(),
    "max_tokens string": json.dumps({"messages": GOOD, "max_tokens": "7"}).encode(),
    "message without content": json.dumps({"messages": [{"role": "user"}]}).encode(),
    "content an image part": json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    ).encode(),
}


@pytest.mark.parametrize("path", ["/v1/orchestrate", "/v1/chat/completions"])
async def test_bad_bodies_are_400_and_the_server_goes_on(client: TestClient, path: str) -> None:
    for name, raw in BAD_ORCHESTRATE_BODIES.items():
        if path == "/v1/chat/completions":
            if name in ("unknown field", "trace yes"):
                continue  # OpenAI clients send many extra fields; they are ignored there
            if raw.startswith(b"{") and name != "invalid JSON":
                raw = json.dumps({"model": MODEL, **json.loads(raw)}).encode()
        async with client.post(
            path, data=raw, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400, (name, await resp.text())
            assert resp.content_type == "application/json", name
            error = assert_json_error(await resp.json())
            assert error["type"] == "invalid_request_error", (name, error)
            expected_code = "invalid_json" if name == "invalid JSON" else "invalid_body"
            assert error["code"] == expected_code, (name, error)
    _, frames = await orchestrate(client, {"messages": GOOD})
    assert_wire_rules(frames, trace=False)
    async with client.get("/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["live_turns"] == 0


@pytest.mark.parametrize("path", ["/v1/orchestrate", "/v1/chat/completions"])
async def test_unknown_model_is_404(client: TestClient, path: str) -> None:
    async with client.post(path, json={"model": "no-such-model", "messages": GOOD}) as resp:
        assert resp.status == 404
        error = assert_json_error(await resp.json(), code="model_not_found")
        assert "no-such-model" in error["message"]


async def test_body_over_the_limit_is_413(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await aiohttp_client(server.create_app(make_settings(tmp_path, max_body_bytes=2048)))
    big = {"messages": [user("x" * 4096)]}
    async with client.post("/v1/orchestrate", json=big) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/json"
        error = assert_json_error(await resp.json(), code="body_too_large")
        assert "2048" in error["message"]
    _, frames = await orchestrate(client, {"messages": GOOD})  # still serving
    assert_wire_rules(frames, trace=False)


async def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    async with client.get("/v1/nothing-here") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert_json_error(await resp.json(), code="not_found")
    async with client.get("/v1/orchestrate") as resp:
        assert resp.status == 405
        assert resp.content_type == "application/json"
        assert_json_error(await resp.json(), code="method_not_allowed")
        assert "POST" in resp.headers.get("Allow", "")


# -- OpenAI-compatible ---------------------------------------------------------------------
async def test_chat_completions_not_streamed(client: TestClient) -> None:
    messages = [user("Tell me about tides.")]
    async with client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
        request_id = resp.headers["X-Request-Id"]
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": answer(messages),
                                 "refusal": None}
    assert choice["finish_reason"] == "stop"
    tokens = len(compose_answer(MODEL, messages))
    assert body["usage"] == {
        "prompt_tokens": count_prompt_tokens(messages), "completion_tokens": tokens,
        "total_tokens": count_prompt_tokens(messages) + tokens,
    }
    row = await request_row(client, request_id)
    assert row["status"] == "completed" and row["kind"] == "chat.completions"


def chat_chunks(raw: bytes) -> list[Any]:
    """The data of an OpenAI-compatible stream, after checking it holds only data frames."""
    text = raw.decode()
    for line in text.split("\n"):
        assert line == "" or line.startswith("data: "), f"not a data line: {line!r}"
    frames = parse_sse(raw)
    for frame in frames:
        assert frame.id is None and frame.event is None and frame.retry is None, frame
        assert not frame.comments, frame
        assert [name for name, _ in frame.fields] == ["data"], frame
    assert frames and frames[-1].data == "[DONE]"
    assert [f.data for f in frames].count("[DONE]") == 1
    return [json.loads(f.data) for f in frames[:-1] if f.data is not None]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_completions_streamed(client: TestClient, include_usage: bool) -> None:
    messages = [user("Stream a reply.")]
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with client.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Request-Id"].startswith("req_")
        chunks = chat_chunks(await resp.read())
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in with_choices[1:])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    assert content == answer(messages)
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    if include_usage:
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        tokens = len(compose_answer(MODEL, messages))
        assert usage_chunk["usage"] == {
            "prompt_tokens": count_prompt_tokens(messages), "completion_tokens": tokens,
            "total_tokens": count_prompt_tokens(messages) + tokens,
        }
        assert all(c["usage"] is None for c in with_choices)
    else:
        assert chunks == with_choices
        assert all("usage" not in c or c["usage"] is None for c in chunks)


async def test_max_tokens_is_exact(client: TestClient) -> None:
    messages = [user("Count to seven.")]
    expected = compose_answer(MODEL, messages, max_tokens=7)
    body = {"model": MODEL, "messages": messages, "max_tokens": 7}

    async with client.post("/v1/chat/completions", json=body) as resp:
        full = await resp.json()
    assert full["choices"][0]["message"]["content"] == "".join(expected)
    assert full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["completion_tokens"] == 7

    async with client.post("/v1/chat/completions", json={**body, "stream": True}) as resp:
        chunks = chat_chunks(await resp.read())
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [d for d in deltas if d] == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    _, frames = await orchestrate(client, {"messages": messages, "max_tokens": 7})
    events = assert_wire_rules(frames, trace=False)
    assert [e["delta"] for e in of_type(events, "text")] == expected
    assert of_type(events, "stream_end")[0]["finish_reason"] == "length"
    assert of_type(events, "token_usage")[0]["completion_tokens"] == 7


# -- a failing provider ----------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def failing_provider_app(kind: str) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "m", "object": "model", "created": 0, "owned_by": "test"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        if kind == "http500":
            return web.json_response(
                {"error": {"message": "the model crashed", "type": "server_error"}}, status=500
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {not json}\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    return app


@pytest.mark.parametrize("kind", ["unreachable", "http500", "malformed"])
async def test_provider_failure_ends_the_turn_cleanly(
    aiohttp_client: ClientFactory, aiohttp_server: ServerFactory, tmp_path: Path, kind: str
) -> None:
    if kind == "unreachable":
        base_url = f"http://127.0.0.1:{closed_port()}/v1"
    else:
        upstream = await aiohttp_server(failing_provider_app(kind))
        base_url = str(upstream.make_url("/v1"))
    settings = make_settings(
        tmp_path, openai_base_url=base_url, openai_api_key="x", models=["m"], default_model="m",
        model_max_retries=0, model_timeout_s=2,
    )
    client = await aiohttp_client(server.create_app(settings))
    messages = [user("Will this work?")]

    resp, frames = await orchestrate(client, {"messages": messages, "trace": True})
    events = assert_wire_rules(frames, trace=True)
    request_id = resp.headers["X-Request-Id"]
    (error,) = of_type(events, "turn_error")
    assert error["error"]
    if kind == "http500":
        assert "500" in error["error"] and error["retryable"] is True
    (end,) = of_type(events, "stream_end")
    assert end["status"] == "error"
    assert error["seq"] < end["seq"]
    done = events[-1]
    assert done["ok"] is False and done["reason"] == "error"

    row = await request_row(client, request_id)
    assert row["status"] == "error"
    assert row["error"] == error["error"]
    assert await message_rows(client, request_id) == [
        ("user", "Will this work?", "complete"), ("assistant", "", "error"),
    ]

    async with client.get("/healthz") as health:
        assert health.status == 200
        body = await health.json()
        assert body["status"] == "ok" and body["live_turns"] == 0

    async with client.post("/v1/chat/completions", json={"model": "m", "messages": messages}) as r:
        assert r.status == 502
        assert r.content_type == "application/json"
        assert_json_error(await r.json(), code="provider_error")

    async with client.post(
        "/v1/chat/completions", json={"model": "m", "messages": messages, "stream": True}
    ) as r:
        assert r.status == 200
        chunks = chat_chunks(await r.read())
    assert any("error" in c for c in chunks), chunks


# -- client disconnects ------------------------------------------------------------------------
async def read_some_text(resp: aiohttp.ClientResponse, count: int) -> list[Frame]:
    frames: list[Frame] = []
    texts = 0
    async for frame in iter_frames(resp):
        frames.append(frame)
        texts += frame.event == "text"
        if texts >= count:
            break
    assert texts >= count, [f.event for f in frames]
    return frames


async def test_disconnect_with_cancel_stops_the_model(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await aiohttp_client(
        server.create_app(make_settings(tmp_path, offline_token_delay_ms=5))
    )
    app = client.app
    messages = [user("Write at length.")]
    body = {"messages": messages, "max_tokens": 2000, "on_disconnect": "cancel"}
    resp = await client.post("/v1/orchestrate", json=body)
    request_id = resp.headers["X-Request-Id"]
    await read_some_text(resp, 3)
    resp.close()

    offline_stats = app[server.OFFLINE].stats

    async def cancelled() -> bool:
        if offline_stats.disconnected != 1:
            return False
        rows = await query(client, "SELECT status FROM requests WHERE request_id = ?", request_id)
        return rows == [("cancelled",)]

    await eventually(cancelled)
    assert offline_stats.completed == 0
    assert request_id not in app[server.ORCHESTRATOR].live
    (_, (role, content, status)) = await message_rows(client, request_id)
    assert (role, status) == ("assistant", "cancelled")
    full = answer(messages, max_tokens=2000)
    assert content and full.startswith(content) and len(content) < len(full)
    stored = await query(
        client, "SELECT type, data FROM events WHERE request_id = ? ORDER BY seq", request_id
    )
    assert stored[-1][0] == "done"
    done = json.loads(stored[-1][1])
    assert done["reason"] == "cancelled" and done["ok"] is False
    assert json.loads(stored[-2][1])["status"] == "cancelled"  # the stream_end


async def test_disconnect_with_continue_finishes_the_turn(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await aiohttp_client(
        server.create_app(make_settings(tmp_path, offline_token_delay_ms=5))
    )
    app = client.app
    messages = [user("Keep going without me.")]
    resp = await client.post("/v1/orchestrate", json={"messages": messages, "max_tokens": 60})
    request_id = resp.headers["X-Request-Id"]
    await read_some_text(resp, 3)
    resp.close()

    async def completed() -> bool:
        rows = await query(client, "SELECT status FROM requests WHERE request_id = ?", request_id)
        return rows == [("completed",)]

    await eventually(completed)
    assert not app[server.ORCHESTRATOR].live
    assert app[server.OFFLINE].stats.disconnected == 0
    assert await message_rows(client, request_id) == [
        ("user", "Keep going without me.", "complete"),
        ("assistant", answer(messages, max_tokens=60), "complete"),
    ]


# -- the SSE helper itself -------------------------------------------------------------------
def test_sse_parser_follows_the_spec() -> None:
    raw = (
        b": hello\r\n\r\n"
        b"id: 1\r\nevent: a\r\ndata: one\r\ndata:two\r\n\r\n"
        b"retry: 1500\n\n"
        b"id: 2\revent: b\rdata: {\"x\": 1}\r\r"
        b"data\n\n"
        b"data: unfinished"
    )
    frames = parse_sse(raw)
    assert [(f.id, f.event, f.data, f.retry, f.comments) for f in frames] == [
        (None, None, None, None, ["hello"]),
        ("1", "a", "one\ntwo", None, []),
        (None, None, None, 1500, []),
        ("2", "b", '{"x": 1}', None, []),
        (None, None, "", None, []),
    ]
    # Bytes split anywhere, even inside \r\n or a UTF-8 character, parse the same.
    whole = "data: héllo\r\n\r\nid: 3\r\ndata: x\r\n\r\n".encode()
    parser = SSEParser()
    split = [frame for i in range(len(whole)) for frame in parser.feed(whole[i:i + 1])]
    assert split + parser.close() == parse_sse(whole)
    assert [f.data for f in split] == ["héllo", "x"]


def _frame(seq: int, kind: str, **fields: Any) -> Frame:
    data = {"request_id": "req_1", "seq": seq, "type": kind, **fields}
    return Frame(id=str(seq), event=kind, data=json.dumps(data))


def test_wire_rules_checker_rejects_broken_streams() -> None:
    good = [
        _frame(1, "request_received"), _frame(2, "route", route="respond"),
        _frame(3, "stream_start", stream_id=1), _frame(4, "text", stream_id=1, delta="hi"),
        _frame(5, "stream_end", stream_id=1), _frame(6, "done", ok=True),
    ]
    assert len(assert_wire_rules(good, trace=True)) == 6
    no_trace = [f for f in good if f.event != "route"]
    assert len(assert_wire_rules(no_trace, trace=False)) == 5
    broken = {
        "trace without trace": (good, False),
        "gap with trace": (no_trace, True),
        "unclosed stream": ([*no_trace[:3], no_trace[-1]], False),
        "done not last": ([*no_trace, _frame(7, "text", stream_id=1, delta="x")], False),
        "ids decrease": ([no_trace[0], no_trace[2], no_trace[1], *no_trace[3:]], False),
        "id differs from seq": ([Frame(id="9", event="request_received",
                                       data=no_trace[0].data), *no_trace[1:]], False),
        "other request": ([*no_trace[:-1], Frame(id="6", event="done", data=json.dumps(
            {"request_id": "req_2", "seq": 6, "type": "done"}))], False),
        "crossed streams": ([
            no_trace[0], _frame(2, "stream_start", stream_id=1),
            _frame(3, "stream_start", stream_id=2), _frame(4, "stream_end", stream_id=1),
            _frame(5, "stream_end", stream_id=2), _frame(6, "done"),
        ], False),
    }
    for name, (frames, trace) in broken.items():
        with pytest.raises(AssertionError):
            assert_wire_rules(frames, trace=trace)
            pytest.fail(f"accepted: {name}")


def test_a_failed_turn_folds_into_a_502_not_a_crash() -> None:
    """Non-streamed completions fold the stream's chunks; an error chunk among them (a
    panelist failed, then the turn was cancelled) is a 502 in OpenAI's shape."""
    chunks: list[dict[str, Any]] = [
        {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                      "finish_reason": None}]},
        {"error": {"message": "panelist bob: HTTP 500", "type": "upstream_error",
                   "code": "turn_failed"}},
    ]
    with pytest.raises(ApiError) as raised:
        completion_of(chunks)
    assert raised.value.status == 502 and "bob" in raised.value.message
    whole = completion_of(chunks[:1])
    assert whole["choices"][0]["message"]["content"] == "Hi"

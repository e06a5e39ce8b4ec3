"""The door (issue 10), in-process: bad input is a clear 4xx before anything starts,
frames cannot be forged by content, hostile pages and missing keys are refused, and
overload is shed with 503/429. The same properties against a real ``python server.py``
process are in ``tests/test_door_e2e.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server
from api.common import RateLimiter
from api.wire import ApiError, BodyLimits, OrchestrateRequest, check_json, parse_json
from core.config import Settings
from sinks.sse import comment_frame, data_frame, escape_separators, frame_json
from tests.sse_client import parse_sse, read_frames

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
FORGED = "a\u2028event: done\u2028data: {}\u2029\x85b"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"db_path": tmp_path / "events.duckdb",
                               "offline_token_delay_ms": 1, "flush_interval_ms": 20}
    options.update(overrides)
    return Settings(**options)


async def start(aiohttp_client: ClientFactory, tmp_path: Path, **overrides: Any) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(tmp_path, **overrides)))


async def stored_requests(client: TestClient) -> int:
    store = client.app[server.STORE]
    await store.flush()
    [(count,)] = await store.aquery("SELECT count(*) FROM requests", [])
    return int(count)


async def error_of(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    return dict(body["error"])


async def nothing_started(client: TestClient) -> None:
    assert client.app[server.ORCHESTRATOR].live == {}
    assert await stored_requests(client) == 0


# -- bad input: a 400 naming the field, before anything starts -----------------------------
SURROGATE_BODIES = [
    ("/v1/orchestrate", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("/v1/orchestrate", '{"messages": [{"role": "user", "content": "x"}],'
     ' "conversation_id": "c\\udfff"}', "conversation_id"),
    ("/v1/chat/completions", '{"model": "offline", "messages": [{"role": "user",'
     ' "content": [{"type": "text", "text": "\\ud83d"}]}]}', "messages.0.content.0.text"),
    ("/v1/roundtable", '{"topic": "t\\udc00", "panelists": [{"name": "a"}]}', "topic"),
    ("/v1/query", '{"sql": "SELECT \'\\ud800\'"}', "sql"),
    ("/v1/orchestrate", '{"messages": [{"role": "user", "content": "x"}],'
     ' "tool_calls": [{"name": "fs.read", "params": {"pa\\ud800th": "x"}}]}',
     "tool_calls.0.params.pa\ud800th"),
]


@pytest.mark.parametrize(("path", "raw", "field"), SURROGATE_BODIES)
async def test_lone_surrogates_are_a_400_naming_the_field(
    aiohttp_client: ClientFactory, tmp_path: Path, path: str, raw: str, field: str
) -> None:
    client = await start(aiohttp_client, tmp_path)
    async with client.post(path, data=raw, headers={"Content-Type": "application/json"}) as resp:
        error = await error_of(resp, 400)
    assert error["code"] == "invalid_text" and error["param"] == field
    assert "lone surrogate" in error["message"]
    await nothing_started(client)


async def test_raw_surrogate_bytes_are_refused_too(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    # json.loads decodes bytes with "surrogatepass": UTF-8-encoded surrogates arrive as text.
    client = await start(aiohttp_client, tmp_path)
    raw = b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}'
    async with client.post("/v1/orchestrate", data=raw) as resp:
        error = await error_of(resp, 400)
    assert error["param"] == "messages.0.content"
    await nothing_started(client)


async def test_surrogates_in_query_strings_and_headers_are_a_400(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, api_key="k")
    async with client.get("/v1/requests/req_x/events?since_seq=%ED%A0%80",
                          headers={"Authorization": "Bearer k"}) as resp:
        assert (await error_of(resp, 400))["param"] == "since_seq"
    async with client.get("/v1/requests/req_x/events?trace=%ED%A0%80",
                          headers={"Authorization": "Bearer k"}) as resp:
        assert (await error_of(resp, 400))["param"] == "trace"
    async with client.get("/v1/requests/req_x/events", headers={
            "Authorization": "Bearer k", "Last-Event-ID": "1\udc80".encode(
                "utf-8", "surrogateescape").decode("latin-1")}) as resp:
        assert (await error_of(resp, 400))["param"] == "Last-Event-ID"
    # A key that is not even UTF-8 is a wrong key (401), not a 500.
    async with client.get("/v1/models", headers={
            "Authorization": b"Bearer k\xff".decode("latin-1")}) as resp:
        assert (await error_of(resp, 401))["code"] == "invalid_api_key"
    # Percent-escapes that are not UTF-8 stay escaped in the path: a plain unknown id.
    async with client.get("/v1/requests/req%ED%A0%80", headers={"Authorization": "Bearer k"}
                          ) as resp:
        assert (await error_of(resp, 404))["code"] == "request_not_found"


POST_ROUTES = ["/v1/orchestrate", "/v1/chat/completions", "/v1/roundtable", "/v1/query",
               "/v1/export", "/v1/requests/req_x/cancel"]
READS_BODY = {"/v1/orchestrate", "/v1/chat/completions", "/v1/roundtable", "/v1/query"}


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("depth", [100_000, 65])
async def test_deep_json_is_a_400_on_every_endpoint(
    aiohttp_client: ClientFactory, tmp_path: Path, path: str, depth: int
) -> None:
    client = await start(aiohttp_client, tmp_path)
    nested = "[" * depth + "]" * depth
    raw = nested if depth > 1000 else '{"messages": ' + nested + "}"
    async with client.post(path, data=raw, headers={"Content-Type": "application/json"}) as resp:
        if path in READS_BODY:
            error = await error_of(resp, 400)
            assert error["code"] == "invalid_json" and "MAX_JSON_DEPTH" in error["message"]
        else:  # routes without a body ignore it: never a 500
            assert resp.status < 500, await resp.text()
    await nothing_started(client)


CONTROL_IDS = [
    ("/v1/orchestrate", {"messages": [user("x")], "conversation_id": "a\r\nX-Evil: 1"},
     "conversation_id"),
    ("/v1/orchestrate", {"messages": [user("x")], "conversation_id": "a\x00b"}, "conversation_id"),
    ("/v1/orchestrate", {"messages": [user("x")], "model": "offline\x1b[2J"}, "model"),
    ("/v1/orchestrate", {"messages": [user("x")], "tool_calls": [
        {"name": "fs.write\n", "params": {"path": "pwned.txt", "content": "x"}}]},
     "tool_calls.0.name"),
    ("/v1/chat/completions", {"model": "offline", "messages": [user("x")],
                              "conversation_id": "c\rd"}, "conversation_id"),
    ("/v1/roundtable", {"topic": "t", "panelists": [{"name": "a", "model": "offline\x7f"}]},
     "panelists.0.model"),
    ("/api/chat/stream", {"sessionId": "s\n1", "content": "x"}, "sessionId"),
    ("/chat/stream", {"message": "x", "session_id": "s\x1b"}, "session_id"),
]


@pytest.mark.parametrize(("path", "body", "field"), CONTROL_IDS)
async def test_control_characters_in_ids_are_a_400_before_the_turn_starts(
    aiohttp_client: ClientFactory, tmp_path: Path, path: str, body: dict[str, Any], field: str
) -> None:
    client = await start(aiohttp_client, tmp_path, allow_fs_base=tmp_path / "ws")
    async with client.post(path, json=body) as resp:
        error = await error_of(resp, 400)
    assert error == {"message": f"{field}: control characters are not allowed in an identifier",
                     "type": "invalid_request_error", "code": "invalid_identifier",
                     "param": field}
    await nothing_started(client)
    assert not (tmp_path / "ws" / "pwned.txt").exists()  # no tool ran


@pytest.mark.parametrize("request_id", ["r" * 201, "req%00x", "req%0D%0Ax", "req%1B"])
async def test_bad_path_ids_get_the_json_error_shape(
    aiohttp_client: ClientFactory, tmp_path: Path, request_id: str
) -> None:
    client = await start(aiohttp_client, tmp_path)
    for method, suffix in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        async with client.request(method, f"/v1/requests/{request_id}{suffix}") as resp:
            error = await error_of(resp, 400)
        assert error["param"] == "request_id" and error["code"] in ("invalid_id",
                                                                     "invalid_identifier")


@pytest.mark.parametrize("name", ["a%00b.parquet", "events/%00.parquet", "x%ED%A0%80.parquet"])
async def test_nul_in_an_export_path_is_a_404(
    aiohttp_client: ClientFactory, tmp_path: Path, name: str
) -> None:
    client = await start(aiohttp_client, tmp_path)
    async with client.get(f"/v1/export/files/{name}") as resp:
        assert (await error_of(resp, 404))["code"] == "not_found"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", {"model": "offline", "messages": [user("x")], "stream": True,
                              "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"model": "offline", "messages": [user("x")], "stream": "true"},
     "stream"),
    ("/v1/orchestrate", {"messages": [user("x")], "trace": 1}, "trace"),
    ("/v1/orchestrate", {"messages": [user("x")], "background": "false"}, "background"),
    ("/v1/roundtable", {"topic": "t", "panelists": [{"name": "a"}], "trace": "yes"}, "trace"),
])
async def test_every_boolean_is_strict(
    aiohttp_client: ClientFactory, tmp_path: Path, path: str, body: dict[str, Any], field: str
) -> None:
    client = await start(aiohttp_client, tmp_path)
    async with client.post(path, json=body) as resp:
        error = await error_of(resp, 400)
    assert error["param"] == field and "valid boolean" in error["message"]
    await nothing_started(client)


async def test_too_many_messages_is_a_400(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, max_messages=100)
    async with client.post("/v1/orchestrate", json={"messages": [user("x")] * 101}) as resp:
        error = await error_of(resp, 400)
    assert error == {"message": "messages: 101 messages; the limit is 100 (MAX_MESSAGES)",
                     "type": "invalid_request_error", "code": "too_many_messages",
                     "param": "messages"}
    async with client.post("/v1/orchestrate", json={"messages": [user("x")] * 100}) as resp:
        assert resp.status == 200
        await resp.read()
    assert await stored_requests(client) == 1


async def test_a_large_body_is_parsed_while_the_loop_serves_others(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """35,000 tiny messages (about 1 MB): parsed and checked on a worker thread, so other
    requests are answered meanwhile; then refused by MAX_MESSAGES."""
    client = await start(aiohttp_client, tmp_path, max_body_bytes=4_000_000)
    raw = json.dumps({"messages": [user("x")] * 35_000}).encode()
    assert len(raw) > 1_000_000
    order: list[str] = []

    async def big() -> None:
        async with client.post("/v1/orchestrate", data=io.BytesIO(raw)) as resp:
            assert (await error_of(resp, 400))["code"] == "too_many_messages"
        order.append("big")

    async def small() -> None:
        await asyncio.sleep(0)  # the big request goes first
        while "big" not in order:
            async with client.get("/v1/models") as resp:
                assert resp.status == 200
            order.append("small")

    await asyncio.gather(big(), small())
    assert order.index("big") > 0, order  # a small request finished while the big one was parsed


async def test_content_length_over_the_limit_is_refused_before_the_body(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    port = client.server.port
    assert port is not None
    head = (f"POST /v1/orchestrate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n").encode()

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)  # and not one byte of the body
            return sock.recv(65536)

    answer = await asyncio.to_thread(exchange)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "body_too_large" and "MAX_BODY_BYTES" in body["error"]["message"]
    await nothing_started(client)


async def test_a_body_that_trickles_is_a_408(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, body_timeout_s=0.3)
    port = client.server.port
    assert port is not None
    head = (f"POST /v1/orchestrate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mess").encode()

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            return sock.recv(65536)

    answer = await asyncio.to_thread(exchange)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"
    await nothing_started(client)


def test_check_json_walks_without_recursion() -> None:
    limits = BodyLimits(max_json_depth=500)
    deep = {"messages": [user("x")], "tool_calls": [{"name": "fs.read", "params": {}}]}
    node: Any = deep["tool_calls"][0]["params"]  # type: ignore[index]
    for _ in range(490):
        node["a"] = {}
        node = node["a"]
    assert parse_json(json.dumps(deep), OrchestrateRequest.model_validate, limits=limits)
    with pytest.raises(ApiError) as caught:
        check_json({"a": [[[["x"]]]]}, max_depth=4)
    assert caught.value.param == "a.0.0.0" and caught.value.code == "invalid_json"


# -- WebSocket: every bad message gets an error frame ---------------------------------------
async def test_websocket_bad_messages_get_error_frames(
    aiohttp_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    base_url = await fake_upstream(aiohttp_server, FORGED)  # the model answers FORGED
    client = await start(aiohttp_client, tmp_path, openai_base_url=base_url, openai_api_key="x",
                         default_model="fake", models=["fake"])
    async with client.ws_connect("/v1/ws") as ws:
        bad: list[tuple[str | bytes, str, str | None]] = [
            (b"\x00\x01binary", "invalid_message", None),
            ("[" * 100_000, "invalid_message", None),
            ('{"type": "chat", "content": "a\\ud800"}', "invalid_message", "content"),
            ('{"type": "chat", "content": "x", "session_id": "s\\r\\n"}', "invalid_message",
             "session_id"),
            ('{"type": "chat", "content": "x", "model": "m\\u001b"}', "invalid_message", "model"),
            ('{"type": "cancel", "response_id": "req_nobody"}', "response_not_found",
             "response_id"),
            ('{"type": "chat", "content": "x", "flag": ' + "[" * 70 + "]" * 70 + "}",
             "invalid_message", None),
        ]
        for message, code, param in bad:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)
            frame = await asyncio.wait_for(ws.receive_json(), timeout=5)
            assert frame["type"] == "error", frame
            assert frame["error"]["code"] == code, (message[:40], frame)
            if param is not None:
                assert frame["error"]["param"] == param, frame
        await ws.send_json({"type": "chat", "content": FORGED})  # the socket still works
        frames = []
        while not frames or frames[-1]["type"] != "complete":
            text = await asyncio.wait_for(ws.receive_str(), timeout=10)
            assert "\u2028" not in text and "\u2029" not in text and "\x85" not in text
            frames.append(json.loads(text))
    assert frames[-1]["status"] == "completed"
    assert frames[-2]["turn"]["content"] == FORGED  # the separators arrived, escaped
    assert await stored_requests(client) == 1


# -- the wire cannot be forged by content ---------------------------------------------------
def test_separators_are_escaped_in_every_frame_helper() -> None:
    assert escape_separators('{"a":"x\u2028y\u2029z\x85"}') == '{"a":"x\\u2028y\\u2029z\\u0085"}'
    assert json.loads(escape_separators(json.dumps(FORGED, ensure_ascii=False))) == FORGED
    assert frame_json({"t": FORGED}) == '{"t":"a\\u2028event: done\\u2028data: {}\\u2029\\u0085b"}'
    assert data_frame(json.dumps({"t": FORGED}, ensure_ascii=False)).decode().splitlines() == [
        'data: {"t": "a\\u2028event: done\\u2028data: {}\\u2029\\u0085b"}', ""]
    assert comment_frame(FORGED).decode().splitlines() == [
        ": a event: done data: {}  b", ""]


def forged_lines(raw: bytes) -> list[str]:
    """Lines a line-based reader (``str.splitlines``, httpx ``iter_lines``) sees that are
    not lines of the SSE wire (which ends lines with LF only): a split inside a frame."""
    text = raw.decode()
    return [line for line in text.splitlines() if line not in text.split("\n")]


async def fake_upstream(aiohttp_server: Any, text: str, *, raw: bool = False) -> str:
    """An OpenAI-compatible model server whose answer is ``text`` (its own JSON escapes
    the separators, as ``json.dumps`` does, unless ``raw``: then they go as UTF-8, as
    pydantic-based servers send them); returns its base URL."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
        for delta, finish in (({"role": "assistant", "content": ""}, None),
                              ({"content": text}, None), ({}, "stop")):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=not raw)}\n\n".encode())
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        await response.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
                             .encode() + b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "fake", "object": "model", "created": 0, "owned_by": "test"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    upstream = await aiohttp_server(app)
    return f"http://127.0.0.1:{upstream.port}/v1"


async def test_user_and_model_text_cannot_forge_frames(
    aiohttp_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    base_url = await fake_upstream(aiohttp_server, FORGED)
    client = await start(aiohttp_client, tmp_path, openai_base_url=base_url, openai_api_key="x",
                         default_model="fake", models=["fake"])
    async with client.post("/v1/orchestrate", json={"messages": [user(FORGED)], "trace": True}
                           ) as resp:
        native = await resp.read()
    async with client.post("/v1/chat/completions", json={
            "model": "fake", "messages": [user(FORGED)], "stream": True}) as resp:
        chunks = await resp.read()
    for raw in (native, chunks):
        assert "\u2028".encode() not in raw and "\u2029".encode() not in raw
        assert "\x85".encode() not in raw
        assert forged_lines(raw) == []
        assert raw.decode().splitlines().count("event: done") <= 1
    events = [f.json for f in parse_sse(native) if f.data]
    assert [e["type"] for e in events].count("done") == 1 and events[-1]["ok"] is True
    assert "".join(e.get("delta", "") for e in events if e["type"] == "text") == FORGED
    [llm_call] = [e for e in events if e["type"] == "llm_call"]
    assert llm_call["messages"][-1]["content"] == FORGED  # the user's text, whole
    pieces = [json.loads(f.data) for f in parse_sse(chunks) if f.data and f.data != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in pieces if c["choices"]) == FORGED


async def test_an_upstream_sending_raw_separators_is_read_whole(
    aiohttp_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Our own reading of the model's stream splits lines as SSE does (CR/LF only), not as
    httpx's iter_lines (which splits at U+2028 too and would cut the chunk)."""
    base_url = await fake_upstream(aiohttp_server, FORGED, raw=True)
    client = await start(aiohttp_client, tmp_path, openai_base_url=base_url, openai_api_key="x",
                         default_model="fake", models=["fake"])
    async with client.post("/v1/orchestrate", json={"messages": [user("hi")]}) as resp:
        events = [f.json for f in parse_sse(await resp.read()) if f.data]
    assert events[-1]["type"] == "done" and events[-1]["ok"] is True, events[-3:]
    assert "".join(e.get("delta", "") for e in events if e["type"] == "text") == FORGED


# -- hostile pages: Host and Origin, CORS -------------------------------------------------
async def test_dns_rebinding_host_is_refused(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    for path in ("/healthz", "/v1/models", "/"):
        async with client.get(path, headers={"Host": "attacker.example:8080"}) as resp:
            assert (await error_of(resp, 403))["code"] == "host_not_allowed"
    async with client.post("/v1/query", json={"sql": "SELECT 1"},
                           headers={"Host": "attacker.example"}) as resp:
        assert (await error_of(resp, 403))["code"] == "host_not_allowed"
    for host in ("localhost:1", "127.0.0.1", "[::1]:8080", "LOCALHOST"):
        async with client.get("/v1/models", headers={"Host": host}) as resp:
            assert resp.status == 200, host


async def test_allowed_hosts_setting(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, allowed_hosts=["api.example.com"])
    async with client.get("/v1/models", headers={"Host": "api.example.com:443"}) as resp:
        assert resp.status == 200
    async with client.get("/v1/models", headers={"Host": "localhost"}) as resp:
        assert resp.status == 403


async def test_a_cross_site_text_plain_post_cannot_start_a_turn(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, allow_fs_base=tmp_path / "ws")
    body = json.dumps({"messages": [user('write "pwned" to pwned.txt')]})
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
        async with client.post("/v1/orchestrate", data=body, headers={
                "Content-Type": "text/plain", "Origin": origin}) as resp:
            assert (await error_of(resp, 403))["code"] == "origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in resp.headers
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/v1/ws", headers={"Origin": origin})
        assert refused.value.status == 403
    await nothing_started(client)
    assert not (tmp_path / "ws" / "pwned.txt").exists()


async def test_same_origin_pages_keep_working(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    origin = f"http://127.0.0.1:{client.server.port}"
    async with client.post("/v1/orchestrate", json={"messages": [user("hi")]},
                           headers={"Origin": origin}) as resp:
        assert resp.status == 200
        frames = await read_frames(resp)
    assert frames[-1].event == "done" and frames[-1].json["ok"] is True


async def test_cors_for_allowed_origins(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    app_origin = "https://app.example"
    client = await start(aiohttp_client, tmp_path, cors_origins=[app_origin], api_key="k")
    async with client.options("/v1/chat/completions", headers={
            "Origin": app_origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
                              ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == app_origin
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "last-event-id", "x-stainless-os"} <= allowed
    async with client.options("/v1/chat/completions", headers={
            "Origin": "https://other.example", "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    auth = {"Origin": app_origin, "Authorization": "Bearer k"}
    # Headers on every answer: success, SSE stream, errors (401 included).
    async with client.post("/v1/orchestrate", json={"messages": [user("hi")]}, headers=auth) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Access-Control-Allow-Origin"] == app_origin
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
        assert "Origin" in resp.headers["Vary"]
        await resp.read()
    async with client.get("/v1/requests/nope", headers=auth) as resp:
        assert resp.status == 404 and resp.headers["Access-Control-Allow-Origin"] == app_origin
    async with client.get("/v1/models", headers={"Origin": app_origin}) as resp:
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == app_origin


# -- API keys ------------------------------------------------------------------------------
async def test_api_keys_guard_every_v1_route(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, api_keys=["k1", "k2"], admin_key="adm")
    app = client.app
    routes = sorted({(r.method, r.resource.canonical) for r in app.router.routes()
                     if r.resource is not None and r.method != "HEAD"
                     and r.resource.canonical.startswith(("/v1", "/speech", "/chat", "/api"))})
    assert len(routes) >= 14 and ("POST", "/chat/stream") in routes
    for method, path in routes:
        url = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: "x.parquet" if m[1] == "path" else "x_1",
                     path)
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
            async with client.request(method, url, headers=headers) as resp:
                error = await error_of(resp, 401)
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    for key in ("k1", "k2", "adm"):
        async with client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
    # ADMIN_KEY still guards the analysts' routes: an API key is not enough there.
    async with client.post("/v1/query", json={"sql": "SELECT 1"},
                           headers={"Authorization": "Bearer k1"}) as resp:
        assert resp.status == 401
    async with client.post("/v1/query", json={"sql": "SELECT 1"},
                           headers={"Authorization": "Bearer adm"}) as resp:
        assert resp.status == 200
    async with client.get("/v1/tools", headers={"Authorization": "Bearer k2"}) as resp:
        assert (await resp.json())["workspace"] == str(app[server.SETTINGS].fs_base.resolve())


async def test_healthz_is_open_and_names_no_paths(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    for keys in ([], ["k"]):
        folder = tmp_path / f"keys{len(keys)}"
        client = await start(aiohttp_client, folder, api_keys=keys)
        async with client.get("/healthz") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert str(folder) not in text and "workspace" not in text and '"path"' not in text
        if not keys:
            async with client.get("/v1/tools") as resp:
                assert str(folder) not in await resp.text()


def test_binding_beyond_loopback_without_keys_is_refused() -> None:
    why = server.refuse_exposure(Settings(host="0.0.0.0"))
    assert why is not None and "without API keys" in why and "--allow-no-auth" in why
    assert "\n" not in why
    assert server.refuse_exposure(Settings(host="0.0.0.0", api_key="k")) is None
    assert server.refuse_exposure(Settings(host="0.0.0.0", allow_no_auth=True)) is None
    assert server.refuse_exposure(Settings(host="::1")) is None
    assert server.refuse_exposure(Settings(host="127.0.0.2")) is None
    assert server.refuse_exposure(Settings(host="localhost")) is None
    assert server.refuse_exposure(Settings(host="0.0.0.0", admin_key="a")) is not None


# -- overload: 503 and 429 with Retry-After -------------------------------------------------
async def test_live_turn_limit_sheds_with_503(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, max_live_turns=2, offline_token_delay_ms=20)
    turns = []
    for n in range(2):
        async with client.post("/v1/orchestrate", json={"messages": [user(f"q{n}")],
                                                        "background": True}) as resp:
            assert resp.status == 202
            turns.append(client.app[server.ORCHESTRATOR].live[(await resp.json())["request_id"]])
    for path, body in (("/v1/orchestrate", {"messages": [user("x")]}),
                       ("/v1/chat/completions", {"model": "offline", "messages": [user("x")]}),
                       ("/v1/roundtable", {"topic": "t", "panelists": [{"name": "a"}]})):
        async with client.post(path, json=body) as resp:
            error = await error_of(resp, 503)
        assert error["code"] == "overloaded" and "MAX_LIVE_TURNS" in error["message"]
        assert resp.headers["Retry-After"] == "1"
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_json({"type": "chat", "content": "x"})
        frame = await asyncio.wait_for(ws.receive_json(), timeout=5)
        assert frame["type"] == "error" and frame["error"]["code"] == "overloaded"
    for turn in turns:  # the admitted ones finish normally
        assert (await turn.result).status == "completed"
    assert await stored_requests(client) == 2


async def test_the_live_turn_limit_is_exact_under_concurrent_requests(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, max_live_turns=5, offline_token_delay_ms=50)

    async def post() -> int:
        async with client.post("/v1/orchestrate", json={"messages": [user("x")],
                                                        "background": True}) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(post() for _ in range(20)))
    assert sorted(statuses) == [202] * 5 + [503] * 15
    await client.app[server.ORCHESTRATOR].drain(grace_s=30)
    assert await stored_requests(client) == 5


async def test_open_stream_limit_sheds_with_503(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, max_open_streams=1, offline_token_delay_ms=20)
    async with client.post("/v1/orchestrate", json={"messages": [user("q")]}) as first:
        assert first.status == 200
        await first.content.readline()  # the stream is open
        async with client.post("/v1/orchestrate", json={"messages": [user("x")]}) as resp:
            error = await error_of(resp, 503)
        assert "MAX_OPEN_STREAMS" in error["message"] and resp.headers["Retry-After"] == "1"
        request_id = first.headers["X-Request-Id"]
        async with client.get(f"/v1/requests/{request_id}/events") as resp:  # a follower too
            assert "MAX_OPEN_STREAMS" in (await error_of(resp, 503))["message"]
        frames = parse_sse(await first.read())
    assert frames[-1].event == "done" and frames[-1].json["ok"] is True


async def test_rate_limit_per_key_is_a_429_in_openai_shape(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, rate_limit_rpm=2, api_keys=["a", "b"])
    body = {"messages": [user("x")], "background": True}
    for _ in range(2):
        async with client.post("/v1/orchestrate", json=body,
                               headers={"Authorization": "Bearer a"}) as resp:
            assert resp.status == 202
    async with client.post("/v1/orchestrate", json=body,
                           headers={"Authorization": "Bearer a"}) as resp:
        error = await error_of(resp, 429)
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "RATE_LIMIT_RPM" in error["message"]
    assert resp.headers["Retry-After"] == "30"  # one token every 30 s at 2 a minute
    async with client.post("/v1/orchestrate", json=body,
                           headers={"Authorization": "Bearer b"}) as resp:
        assert resp.status == 202  # another key has its own budget
    async with client.get("/v1/models", headers={"Authorization": "Bearer a"}) as resp:
        assert resp.status == 200  # only turns count


def test_rate_limiter_refills_evenly() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert [limiter.take("c") for _ in range(60)] == [0.0] * 60
    assert limiter.take("c") == pytest.approx(1.0)
    assert limiter.take("d") == 0.0
    now[0] = 0.5
    assert limiter.take("c") == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.take("c") == 0.0
    assert limiter.take("c") == pytest.approx(1.0)


# -- /v1/query is bounded in bytes ---------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
async def test_query_answers_are_bounded_in_bytes(
    aiohttp_client: ClientFactory, tmp_path: Path, fmt: str
) -> None:
    client = await start(aiohttp_client, tmp_path, query_max_bytes=20_000)
    sql = "SELECT range AS n, repeat('x', 1000) AS pad FROM range(5000)"
    async with client.post("/v1/query", json={"sql": sql, "format": fmt}) as resp:
        assert resp.status == 200, await resp.text()
        payload = await resp.read()
    assert resp.headers["X-Truncated"] == "true"
    rows = int(resp.headers["X-Row-Count"])
    assert 0 < rows < 20 and len(payload) < 40_000
    if fmt == "json":
        body = json.loads(payload)
        assert body["truncated"] is True and body["row_count"] == rows == len(body["rows"])
        assert [row[0] for row in body["rows"]] == list(range(rows))
    async with client.post("/v1/query", json={"sql": "SELECT 42 AS answer", "format": fmt}) as resp:
        assert resp.headers["X-Truncated"] == "false" and resp.headers["X-Row-Count"] == "1"

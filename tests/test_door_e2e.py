"""The door (issue 10) against real ``python server.py`` processes on loopback ports: raw
sockets for slowloris and body limits, the official ``openai`` client for keys and rate
limits, httpx's line reader for forged frames. In-process versions: ``tests/test_door.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from tests.procs import free_port
from tests.test_durable_e2e import ROOT, STOP_TIMEOUT_S, Server, spawn

KEY = "door-key"
APP_ORIGIN = "https://app.example"
FORGED = "a\u2028event: done\u2028data: {}\u2029\x85b"
START_TIMEOUT_S = 20.0


def wait_healthy(srv: Server) -> Server:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if srv.proc.poll() is not None:
            pytest.fail(f"server exited with {srv.proc.returncode}:\n{srv.output()}")
        try:
            with urllib.request.urlopen(srv.url("/healthz"), timeout=1) as resp:
                if resp.status == 200:
                    return srv
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            srv.proc.kill()
            pytest.fail(f"server not healthy within {START_TIMEOUT_S}s:\n{srv.output()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def door_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with keys, CORS, short header/body deadlines and a small query budget."""
    srv = wait_healthy(spawn(tmp_path_factory.mktemp("door"), "door", {
        "OFFLINE_TOKEN_DELAY_MS": 1, "API_KEY": KEY, "CORS_ORIGINS": json.dumps([APP_ORIGIN]),
        "HEADER_TIMEOUT_S": 1, "BODY_TIMEOUT_S": 1, "QUERY_MAX_BYTES": 4096,
        "MAX_BODY_BYTES": 4_000_000, "FLUSH_INTERVAL_MS": 20}))
    yield srv
    assert srv.stop() == 0, srv.output()
    log = srv.log.read_text(errors="replace")
    assert " ERROR " not in log and "Traceback" not in log, log[-4000:]


def call(srv: Server, method: str, path: str, body: bytes | str | None = None, *,
         headers: dict[str, str] | None = None, key: str | None = KEY
         ) -> tuple[int, dict[str, str], bytes]:
    """One request; the status, headers and body whatever the status."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(srv.url(path), data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def error(answer: tuple[int, dict[str, str], bytes], status: int) -> dict[str, Any]:
    code, _headers, body = answer
    assert code == status, body[:500]
    parsed = json.loads(body)
    assert set(parsed["error"]) == {"message", "type", "code", "param"}
    return dict(parsed["error"])


def stored(srv: Server, sql: str) -> Any:
    code, _h, body = call(srv, "POST", "/v1/query", json.dumps({"sql": sql}))
    assert code == 200, body
    return json.loads(body)["rows"]


def raw_exchange(srv: Server, payload: bytes, *, timeout: float = 10) -> bytes:
    port = int(srv.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
        return b"".join(chunks)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# -- bad input ------------------------------------------------------------------------------
BAD_BODIES = [
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "invalid_text",
     "messages.0.content"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid_json", None),
    (json.dumps({"messages": [user("x")], "conversation_id": "a\r\nb"}), "invalid_identifier",
     "conversation_id"),
    (json.dumps({"messages": [user("x")], "tool_calls": [
        {"name": "fs.write\x00", "params": {"path": "pwned.txt", "content": "x"}}]}),
     "invalid_identifier", "tool_calls.0.name"),
    (json.dumps({"messages": [user("x")], "trace": "yes"}), "invalid_body", "trace"),
]


@pytest.mark.parametrize(("raw", "code", "param"), BAD_BODIES)
def test_bad_bodies_are_a_400_before_anything_starts(
    door_server: Server, raw: str, code: str, param: str | None
) -> None:
    found = error(call(door_server, "POST", "/v1/orchestrate", raw), 400)
    assert found["code"] == code and found["param"] == param
    assert stored(door_server, "SELECT count(*) FROM requests WHERE kind = 'orchestrate'"
                  " AND request_id IN (SELECT request_id FROM messages WHERE content = 'x')"
                  ) == [[0]]
    assert not (door_server.db.parent / "workspace" / "pwned.txt").exists()


def test_strict_include_usage(door_server: Server) -> None:
    found = error(call(door_server, "POST", "/v1/chat/completions", json.dumps({
        "model": "offline", "messages": [user("x")], "stream": True,
        "stream_options": {"include_usage": "yes"}})), 400)
    assert found["param"] == "stream_options.include_usage"


def test_over_long_and_control_path_ids_get_the_json_shape(door_server: Server) -> None:
    head = f"Host: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    for path in ("/v1/requests/" + "r" * 9000, "/v1/requests/" + "r" * 300,
                 "/v1/requests/a%00b/events", "/v1/requests/a%0d%0ab"):
        answer = raw_exchange(door_server, f"GET {path} HTTP/1.1\r\n{head}".encode())
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:300]
        assert b"application/json" in rest.partition(b"\r\n\r\n")[0]
        assert set(json.loads(rest.partition(b"\r\n\r\n")[2])["error"]) == {
            "message", "type", "code", "param"}
    found = error(call(door_server, "GET", "/v1/export/files/a%00b.parquet"), 404)
    assert found["code"] == "not_found"


def test_content_length_over_the_limit_is_refused_without_reading_the_body(
    door_server: Server
) -> None:
    answer = raw_exchange(door_server, (
        "POST /v1/orchestrate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        "Content-Length: 4000001\r\n\r\n").encode())  # and no body at all
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"


def test_a_trickling_body_is_a_408(door_server: Server) -> None:
    answer = raw_exchange(door_server, (
        "POST /v1/orchestrate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        'Content-Length: 1000\r\n\r\n{"messages": [').encode())
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]


def slow_headers(srv: Server, prefix: bytes, *, byte_every_s: float, total: int) -> tuple[int, bool]:
    """Send ``prefix`` at once, then one byte of a never-ending header every
    ``byte_every_s``; returns (bytes sent, whether the server closed the connection)."""
    port = int(srv.base.rsplit(":", 1)[1])
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(prefix)
        slow = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * total
        sock.setblocking(False)
        for byte in slow:
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return sent, True
            sent += 1
            time.sleep(byte_every_s)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return sent, True
            if prefix and data.startswith(b"HTTP/1.1 200"):
                continue  # the answer to the quick first request
            if data == b"":
                return sent, True
    return sent, False


def test_slowloris_headers_are_timed_out(door_server: Server) -> None:
    """HEADER_TIMEOUT_S=1: a head sent one byte per 0.1 s is cut long before its end,
    on a new connection and on a kept-alive one whose next head trickles."""
    total = 200  # 20 s of trickling if nobody stopped it
    sent, closed = slow_headers(door_server, b"", byte_every_s=0.1, total=total)
    assert closed and sent < total, (sent, closed)
    quick = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sent, closed = slow_headers(door_server, quick, byte_every_s=0.1, total=total)
    assert closed and sent < total, (sent, closed)
    assert "HEADER_TIMEOUT_S" in door_server.log.read_text()
    assert call(door_server, "GET", "/healthz", key=None)[0] == 200  # the server is fine


def test_a_large_body_does_not_stall_the_server(door_server: Server) -> None:
    """One 1 MB body of 35,000 tiny messages: parsed on a worker thread and refused by
    MAX_MESSAGES, while other requests are answered meanwhile."""
    raw = json.dumps({"messages": [user("x")] * 35_000})

    async def run() -> list[str]:
        order: list[str] = []
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=door_server.base, headers=headers,
                                     timeout=30) as client:
            async def big() -> None:
                resp = await client.post("/v1/orchestrate", content=raw,
                                         headers={"Content-Type": "application/json"})
                assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_messages"
                order.append("big")

            async def small() -> None:
                await asyncio.sleep(0)
                while "big" not in order:
                    assert (await client.get("/v1/models")).status_code == 200
                    order.append("small")

            await asyncio.gather(big(), small())
        return order

    order = asyncio.run(run())
    assert order.index("big") > 0, order


# -- the wire cannot be forged -----------------------------------------------------------------
def test_line_readers_see_no_forged_frame(door_server: Server, tmp_path: Path) -> None:
    """User text (in the trace's llm_call) and tool output (echo) carrying U+2028 …
    ``event: done``, read by httpx ``iter_lines``, which splits at U+2028/U+2029/U+0085."""
    body = {"messages": [user(FORGED)], "trace": True,
            "tool_calls": [{"name": "terminal.exec", "params": {"argv": ["echo", FORGED]}}]}
    with httpx.Client(base_url=door_server.base, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        with client.stream("POST", "/v1/orchestrate", json=body) as resp:
            assert resp.status_code == 200
            lines = list(resp.iter_lines())
    fields = [line.partition(":")[0] for line in lines if line and not line.startswith(":")]
    assert set(fields) <= {"id", "event", "data", "retry"}, fields
    data = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert len(data) == sum(1 for line in lines if line.startswith("event: "))
    assert [d["type"] for d in data].count("done") == 1 and data[-1]["type"] == "done"
    [result] = [d for d in data if d["type"] == "tool_result"]
    assert result["ok"] and result["data"]["stdout"] == FORGED + "\n"
    [llm_call] = [d for d in data if d["type"] == "llm_call"][:1]
    assert any(m["content"] == FORGED for m in llm_call["messages"])


# -- hostile pages -------------------------------------------------------------------------
def test_rebinding_and_cross_site_posts_are_refused(door_server: Server) -> None:
    found = error(call(door_server, "POST", "/v1/query", json.dumps({"sql": "SELECT 1"}),
                       headers={"Host": "attacker.example"}), 403)
    assert found["code"] == "host_not_allowed"
    before = stored(door_server, "SELECT count(*) FROM requests")
    found = error(call(door_server, "POST", "/v1/orchestrate",
                       json.dumps({"messages": [user('write "x" to pwned.txt')]}),
                       headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}),
                  403)
    assert found["code"] == "origin_not_allowed"
    assert stored(door_server, "SELECT count(*) FROM requests") == before


def test_cors_preflight_and_headers_on_streams(door_server: Server) -> None:
    code, headers, _ = call(door_server, "OPTIONS", "/v1/orchestrate", key=None, headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,last-event-id"})
    assert code == 204 and headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "Last-Event-ID" in headers["Access-Control-Allow-Headers"]
    with httpx.Client(base_url=door_server.base, timeout=30) as client:
        with client.stream("POST", "/v1/orchestrate", json={"messages": [user("hi")]}, headers={
                "Origin": APP_ORIGIN, "Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["access-control-allow-origin"] == APP_ORIGIN
            assert "event: done" in resp.read().decode()
        refused = client.get("/v1/models", headers={"Origin": APP_ORIGIN})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == APP_ORIGIN


# -- keys ------------------------------------------------------------------------------------
def test_keys_with_the_openai_sdk(door_server: Server) -> None:
    with openai.OpenAI(base_url=door_server.url("/v1"), api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with openai.OpenAI(base_url=door_server.url("/v1"), api_key=KEY, max_retries=0) as good:
        answer = good.chat.completions.create(model="offline", messages=[user("hi")])
    assert answer.choices[0].message.content
    code, _h, body = call(door_server, "GET", "/healthz", key=None)
    assert code == 200 and str(door_server.db.parent) not in body.decode()
    assert '"path"' not in body.decode() and "workspace" not in body.decode()


def test_query_answers_are_bounded_in_bytes(door_server: Server) -> None:
    code, headers, body = call(door_server, "POST", "/v1/query", json.dumps(
        {"sql": "SELECT range, repeat('x', 500) FROM range(100000)"}))
    assert code == 200 and headers["X-Truncated"] == "true"
    parsed = json.loads(body)
    assert parsed["truncated"] is True and 0 < parsed["row_count"] < 10 and len(body) < 8192


def test_non_loopback_without_keys_is_refused_at_startup(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "server.py", "--host", "0.0.0.0", "--port", str(free_port()),
         "--db", str(tmp_path / "e.duckdb")],
        cwd=ROOT, capture_output=True, text=True, timeout=STOP_TIMEOUT_S,
        env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert "refusing to listen on 0.0.0.0 without API keys" in line and "--allow-no-auth" in line
    assert not (tmp_path / "e.duckdb").exists()  # nothing started


# -- overload ------------------------------------------------------------------------------
def test_rate_limit_and_overload_with_the_openai_sdk(tmp_path: Path) -> None:
    """RATE_LIMIT_RPM=20: after 20 turns the next gets a 429 with Retry-After (about 3 s);
    the SDK's own retry waits for it and succeeds. Its backoff without the header (0.5 s,
    then 1 s, for max_retries=2) would have given up before a token came back."""
    srv = wait_healthy(spawn(tmp_path, "limits", {
        "OFFLINE_TOKEN_DELAY_MS": 200, "RATE_LIMIT_RPM": 20, "MAX_LIVE_TURNS": 30}))
    try:
        statuses: list[int] = []
        for _ in range(20):
            status, _h, _b = call(srv, "POST", "/v1/orchestrate", json.dumps(
                {"messages": [user("x")], "background": True}), key=None)
            statuses.append(status)
        assert statuses == [202] * 20
        found = error(call(srv, "POST", "/v1/orchestrate", json.dumps(
            {"messages": [user("x")]}), key=None), 429)
        assert found["code"] == "rate_limit_exceeded" and found["type"] == "requests"
        seen: list[tuple[int, str | None]] = []
        hooks = {"response": [lambda r: seen.append((r.status_code, r.headers.get("retry-after")))]}
        with httpx.Client(event_hooks=hooks) as http, openai.OpenAI(
                base_url=srv.url("/v1"), api_key="x", max_retries=2, http_client=http) as client:
            answer = client.chat.completions.create(model="offline", messages=[user("hi")],
                                                    max_tokens=2)
        assert answer.choices[0].message.content
        assert [status for status, _ in seen] == [429, 200], seen
        assert seen[0][1] is not None and int(seen[0][1]) >= 2
        with openai.OpenAI(base_url=srv.url("/v1"), api_key="x", max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as limited:  # the SDK parses the shape
                client.chat.completions.create(model="offline", messages=[user("hi")])
        assert limited.value.status_code == 429 and limited.value.code == "rate_limit_exceeded"
        assert limited.value.response.headers["retry-after"].isdigit()
    finally:
        assert srv.stop() == 0, srv.output()


def test_live_turn_limit_503_with_retry_after(tmp_path: Path) -> None:
    srv = wait_healthy(spawn(tmp_path, "shed", {"OFFLINE_TOKEN_DELAY_MS": 50, "MAX_LIVE_TURNS": 3}))
    try:
        ids = []
        for _ in range(3):
            status, _h, body = call(srv, "POST", "/v1/orchestrate", json.dumps(
                {"messages": [user("x")], "background": True}), key=None)
            assert status == 202
            ids.append(json.loads(body)["request_id"])
        answer = call(srv, "POST", "/v1/chat/completions", json.dumps(
            {"model": "offline", "messages": [user("x")]}), key=None)
        assert error(answer, 503)["code"] == "overloaded" and answer[1]["Retry-After"] == "1"
        for request_id in ids:  # the admitted turns run to their end
            deadline = time.monotonic() + 30
            while True:
                _s, _h, body = call(srv, "GET", f"/v1/requests/{request_id}", key=None)
                if json.loads(body)["status"] != "running":
                    break
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert json.loads(body)["status"] == "completed"
    finally:
        assert srv.stop() == 0, srv.output()


def test_websocket_errors_and_escaped_frames(door_server: Server) -> None:
    async def run() -> tuple[list[dict[str, Any]], list[str]]:
        errors: list[dict[str, Any]] = []
        texts: list[str] = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            async with session.ws_connect(door_server.url("/v1/ws")) as ws:
                await ws.send_bytes(b"\x00binary")
                errors.append(await ws.receive_json(timeout=10))
                await ws.send_str('{"type": "cancel", "response_id": "req_nobody"}')
                errors.append(await ws.receive_json(timeout=10))
                await ws.send_str('{"type": "chat", "content": "x", "session_id": "a\\u0000"}')
                errors.append(await ws.receive_json(timeout=10))
                await ws.send_json({"type": "chat", "content": FORGED})
                while not texts or json.loads(texts[-1])["type"] != "complete":
                    texts.append(await ws.receive_str(timeout=30))
        return errors, texts

    errors, texts = asyncio.run(run())
    assert [(e["type"], e["error"]["code"], e["error"]["param"]) for e in errors] == [
        ("error", "invalid_message", None), ("error", "response_not_found", "response_id"),
        ("error", "invalid_message", "session_id")]
    assert all("\u2028" not in t and "\u2029" not in t and "\x85" not in t for t in texts)
    assert json.loads(texts[-1])["status"] == "completed"

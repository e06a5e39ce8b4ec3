"""The recorder's internal API and its key (``RECORDER_TOKEN``), in process, on the real
recorder app (its store on a DuckDB file, its log on the machine's Redis, db 11).

The API reads the whole store and writes ``responses``; its port is loopback only, which
every process on the machine can reach: with a token, every route but the health needs it.
The same properties against real supervised processes: ``tests/test_workers_e2e_more.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from core.config import Settings
from sinks.recorder_api import create_recorder_app
from sinks.remote_store import KEY_REFUSED, RecorderUnavailableError, RemoteStore
from tests.redis_helpers import REDIS_HOST, REDIS_PORT, delete_prefix, new_prefix, require_redis

URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"
TOKEN = "k" * 12 + "-recorder-key"


@pytest_asyncio.fixture
async def recorder(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[TestClient]:
    require_redis()
    prefix = new_prefix()
    settings = Settings(event_log=URL, redis_prefix=prefix, db_path=tmp_path / "e.duckdb",
                        recorder_token=TOKEN, export_interval_s=0)
    client: TestClient = await aiohttp_client(create_recorder_app(settings))
    try:
        yield client
    finally:
        await client.close()
        await delete_prefix(URL, prefix)


def _keyed_routes() -> list[tuple[str, str]]:
    """Every route of the recorder app but the health, with its path parameters filled."""
    app = create_recorder_app(Settings())
    routes = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        if route.method == "HEAD" or path in ("/internal/health", "/healthz"):
            continue
        routes.append((route.method, path.replace("{request_id}", "req_x")
                       .replace("{response_id}", "resp_x")))
    assert len(routes) >= 11, routes  # (a route table that changed shape fails here)
    return routes


@pytest.mark.parametrize(("method", "path"), _keyed_routes())
async def test_every_route_but_the_health_refuses_a_call_without_the_key(
        recorder: TestClient, method: str, path: str) -> None:
    body = {"sql": "SELECT 1", "params": [], "conversation_id": "c", "limit": 5,
            "response_id": "resp_x"}
    for headers in ({}, {"Authorization": "Bearer wrong-key-of-the-same-shape"},
                    {"Authorization": TOKEN},  # (the key without its scheme is not the key)
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer " + TOKEN[:-1]}):
        resp = await recorder.request(method, path, json=body, headers=headers)
        assert resp.status == 401, (headers, await resp.text())
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_api_key" and "RECORDER_TOKEN" in error["message"]


async def test_a_key_of_bytes_that_are_not_utf8_is_refused_not_a_server_error(
        recorder: TestClient) -> None:
    reader, writer = await asyncio.open_connection(recorder.host, recorder.port)
    try:
        writer.write(b"GET /internal/requests/req_x HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer \xff\xfe" + TOKEN.encode() + b"\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"invalid_api_key" in answer


async def test_the_scheme_is_case_insensitive(recorder: TestClient) -> None:
    resp = await recorder.get("/internal/requests/req_x", headers={"Authorization": f"bearer {TOKEN}"})
    assert resp.status == 200 and await resp.json() is None


async def test_the_health_is_open_and_the_key_opens_the_rest(recorder: TestClient) -> None:
    for path in ("/internal/health", "/healthz"):
        resp = await recorder.get(path)
        assert resp.status == 200 and (await resp.json())["role"] == "recorder"
    resp = await recorder.post("/internal/query", json={"sql": "SELECT count(*) FROM events",
                                                         "params": []},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == [[0]]


@pytest_asyncio.fixture
async def stores(recorder: TestClient) -> AsyncIterator[tuple[RemoteStore, RemoteStore]]:
    """Two workers' stores of the recorder: one with its key, one without."""
    url = str(recorder.make_url("")).rstrip("/")
    keyed = RemoteStore(url, timeout_s=2, poll_s=5, token=TOKEN)
    keyless = RemoteStore(url, timeout_s=2, poll_s=5)
    await keyed.start()
    await keyless.start()
    try:
        yield keyed, keyless
    finally:
        await keyed.aclose()
        await keyless.aclose()


async def test_a_remote_store_sends_its_key_and_one_without_it_is_refused(
        stores: tuple[RemoteStore, RemoteStore]) -> None:
    keyed, keyless = stores
    assert await keyed.request_row("req_nobody") is None
    assert await keyed.load_history("conv_nobody", limit=5) == []
    assert keyless.health().writable  # its health poll needs no key: it answers
    with pytest.raises(RecorderUnavailableError) as refused:
        await keyless.request_row("req_nobody")
    assert refused.value.status == 401
    assert "RECORDER_TOKEN" in str(refused.value)
    # refused once, its health says so (not ok), though the recorder answers its polls
    await keyless._poll_once()
    health = keyless.health()
    assert not health.writable and health.last_error == KEY_REFUSED
    with pytest.raises(RecorderUnavailableError):
        await keyless.check_key()
    await keyed.check_key()  # the right key: no error
    assert keyed.health().writable and keyed.health().last_error is None


async def test_a_refused_key_on_the_analysts_query_degrades_the_health_too(
        stores: tuple[RemoteStore, RemoteStore]) -> None:
    keyed, keyless = stores
    limits = {"timeout_s": 5, "max_rows": 10}
    answer = await keyed.answer_query("SELECT 42 AS x", "json", limits)
    assert b"42" in answer.body and answer.rows == 1
    with pytest.raises(RecorderUnavailableError) as refused:
        await keyless.answer_query("SELECT 42 AS x", "json", limits)
    assert refused.value.status == 401
    health = keyless.health()  # (no other call of this store was refused)
    assert not health.writable and health.last_error == KEY_REFUSED
    assert keyed.health().writable


def test_a_short_recorder_token_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="recorder_token"):
        Settings(recorder_token="short")

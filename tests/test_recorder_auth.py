"""The recorder's internal API and its key (``RECORDER_TOKEN``), in process, on the real
recorder app (its store on a DuckDB file, its log on the machine's Redis, db 11).

The API reads the whole store and writes ``responses``; its port is loopback only, which
every process on the machine can reach: with a token, every route but the health needs it.
The same properties against real supervised processes: ``tests/test_workers_e2e_more.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from core.config import Settings
from sinks.recorder_api import create_recorder_app
from sinks.remote_store import RecorderUnavailableError, RemoteStore
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


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/internal/query", {"sql": "SELECT count(*) FROM events", "params": []}),
    ("POST", "/internal/v1/query", {"sql": "SELECT 1"}),
    ("POST", "/internal/history", {"conversation_id": "c", "limit": 5}),
    ("GET", "/internal/requests/req_x", None),
    ("GET", "/internal/requests/req_x/events", None),
    ("PUT", "/internal/responses/resp_x", {"response_id": "resp_x"}),
    ("DELETE", "/internal/responses/resp_x", None),
    ("POST", "/internal/sync", {}),
    ("POST", "/internal/export", {}),
])
async def test_every_route_but_the_health_refuses_a_call_without_the_key(
        recorder: TestClient, method: str, path: str, body: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key-of-the-same-shape"},
                    {"Authorization": TOKEN}):  # (the key without "Bearer" is not the key)
        resp = await recorder.request(method, path, json=body, headers=headers)
        assert resp.status == 401, (headers, await resp.text())
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_api_key" and "RECORDER_TOKEN" in error["message"]


async def test_the_health_is_open_and_the_key_opens_the_rest(recorder: TestClient) -> None:
    for path in ("/internal/health", "/healthz"):
        resp = await recorder.get(path)
        assert resp.status == 200 and (await resp.json())["role"] == "recorder"
    resp = await recorder.post("/internal/query", json={"sql": "SELECT count(*) FROM events",
                                                         "params": []},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == [[0]]


async def test_a_remote_store_sends_its_key_and_one_without_it_is_refused(
        recorder: TestClient) -> None:
    url = str(recorder.make_url("")).rstrip("/")
    keyed = RemoteStore(url, timeout_s=2, poll_s=5, token=TOKEN)
    keyless = RemoteStore(url, timeout_s=2, poll_s=5)
    await keyed.start()
    await keyless.start()
    try:
        assert await keyed.request_row("req_nobody") is None
        assert await keyed.load_history("conv_nobody", limit=5) == []
        with pytest.raises(RecorderUnavailableError) as refused:
            await keyless.request_row("req_nobody")
        assert refused.value.status == 401
        assert "RECORDER_TOKEN" in str(refused.value)
    finally:
        await keyed.aclose()
        await keyless.aclose()


def test_a_short_recorder_token_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="recorder_token"):
        Settings(recorder_token="short")

"""The worker role's RemoteStore without a recorder: failures are reported, never success."""

from __future__ import annotations

import datetime
import json

import pytest

from core.errors import StoreError
from sinks.remote_store import RecorderUnavailableError, RemoteStore, decode, encode
from tests.procs import free_port


def test_datetimes_come_back_as_datetimes() -> None:
    row = {"started_at": datetime.datetime(2026, 12, 1, 16, 0, 0, 123456), "n": 1,
           "nested": [{"at": datetime.datetime(2026, 1, 1)}], "text": "x"}
    assert decode(json.dumps(encode(row))) == row


async def test_an_unreachable_recorder_raises_a_store_error_and_degrades_health() -> None:
    store = RemoteStore(f"http://127.0.0.1:{free_port()}", timeout_s=1, poll_s=0.05)
    await store.start()
    try:
        health = store.health()
        assert health.writable is False and health.accepting is True
        assert health.last_error is not None and "recorder unreachable" in health.last_error
        with pytest.raises(RecorderUnavailableError) as caught:
            await store.flush(request_id="req_x", seq=3)
        assert isinstance(caught.value, StoreError)
        with pytest.raises(RecorderUnavailableError):
            await store.load_history("conv", limit=10)
        with pytest.raises(RecorderUnavailableError):
            await store.request_row("req_x")
        with pytest.raises(StoreError):
            store.cursor()
    finally:
        await store.aclose()

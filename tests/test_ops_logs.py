"""Structured logs (issue 15): the access log, the request id on a turn's lines,
``LOG_LEVEL`` / ``LOG_FORMAT``, and startup failures in a few lines without a traceback."""

from __future__ import annotations

import io
import json
import logging
import socket
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server
from core.config import Settings
from core.logs import JsonFormatter, RequestIdFilter, bind_request_id, configure, request_scope
from tests.ops_server import Proc, launch, start
from tests.sse_client import read_frames

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hook = __import__("threading").excepthook
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    __import__("threading").excepthook = hook


def test_json_lines_carry_request_id_extras_and_tracebacks(restore_logging: None) -> None:
    out = io.StringIO()
    configure(level="DEBUG", fmt="json", stream=out)
    log = logging.getLogger("t")
    with request_scope():
        log.info("before any turn")
        bind_request_id("req_1")
        log.info("in the turn %s", "one", extra={"status": 200})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("failed")
    log.info("after the scope")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library complains", DeprecationWarning, stacklevel=1)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # each line is JSON
    assert [(e["logger"], e["message"], e.get("request_id")) for e in lines[:4]] == [
        ("t", "before any turn", None), ("t", "in the turn one", "req_1"),
        ("t", "failed", "req_1"), ("t", "after the scope", None)]
    assert lines[1]["status"] == 200 and lines[1]["level"] == "INFO"
    assert "ValueError: boom" in lines[2]["exc"] and lines[2]["level"] == "ERROR"
    assert lines[4]["logger"] == "py.warnings" and "a library complains" in lines[4]["message"]
    assert len(lines) == 5


def test_text_format_and_level(restore_logging: None) -> None:
    out = io.StringIO()
    configure(level="WARNING", fmt="text", stream=out)
    log = logging.getLogger("t")
    with request_scope():
        bind_request_id("req_2")
        log.info("hidden below WARNING")
        log.warning("shown", extra={"status": 503})
    assert out.getvalue().count("\n") == 1
    assert out.getvalue().rstrip().endswith("WARNING t [req_2]: shown status=503")


def test_a_record_keeps_an_explicit_request_id() -> None:
    record = logging.LogRecord("t", logging.INFO, "", 0, "m", None, None)
    record.request_id = "req_given"
    with request_scope():
        bind_request_id("req_context")
        assert RequestIdFilter().filter(record)
    assert record.request_id == "req_given"
    assert json.loads(JsonFormatter().format(record))["request_id"] == "req_given"


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(db_path=tmp_path / "events.duckdb", offline_token_delay_ms=1,
                    flush_interval_ms=20, models=["offline", "ghost"], **overrides)


async def test_access_log_and_the_turns_request_id_in_process(
    aiohttp_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    client = await aiohttp_client(server.create_app(_settings(tmp_path)))
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    async with client.post("/v1/orchestrate", json={"messages": [user("hi")],
                                                    "model": "ghost"}) as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
        await read_frames(resp)
    async with client.get("/no/such/route") as resp:
        assert resp.status == 404
    access = [(r.method, r.path, r.status, r.request_id)  # type: ignore[attr-defined]
              for r in caplog.records if r.name == "access"]
    assert access == [("POST", "/v1/orchestrate", 200, request_id),
                      ("GET", "/no/such/route", 404, None)]
    turn_lines = [r for r in caplog.records if r.name.startswith("pipeline.")]
    # the turn's start and end, and the failed model call's warning, all with its id
    assert {r.name for r in turn_lines} == {"pipeline.orchestrator", "pipeline.providers"}
    assert {r.request_id for r in turn_lines} == {request_id}  # type: ignore[attr-defined]
    assert [r.getMessage() for r in turn_lines if r.name == "pipeline.orchestrator"] == [
        "turn started", "turn error"]


async def test_access_log_can_be_switched_off(
    aiohttp_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    client = await aiohttp_client(server.create_app(_settings(tmp_path, access_log=False)))
    caplog.set_level(logging.INFO)
    async with client.get("/healthz") as resp:
        assert resp.status == 200
    assert [r for r in caplog.records if r.name == "access"] == []


# -- against a real server process ------------------------------------------------------
def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n{text[-3000:]}")
    return parsed


async def test_json_logs_of_a_real_server(tmp_path: Path) -> None:
    running = start(tmp_path, LOG_FORMAT="json", MODELS='["offline","ghost"]')
    try:
        async with aiohttp.ClientSession() as session:
            ids = []
            for model in ("offline", "ghost"):
                async with session.post(f"{running.base}/v1/orchestrate", json={
                        "messages": [user("hello")], "model": model, "max_tokens": 3}) as resp:
                    ids.append(resp.headers["X-Request-Id"])
                    await read_frames(resp)
            async with session.get(f"{running.base}/metrics") as resp:
                assert resp.status == 200
    finally:
        code = running.stop()
    assert code == 0
    lines = _json_lines(running.output())
    messages = [line["message"] for line in lines if line["logger"] == "server"]
    assert messages[-3].startswith(f"serving on {running.base} ")
    assert messages[-2:] == ["stopping: no new requests; draining running turns", "stopped cleanly"]
    access = [(a["method"], a["path"], a["status"], a.get("request_id"))
              for a in lines if a["logger"] == "access"]
    assert access[-3:] == [("POST", "/v1/orchestrate", 200, ids[0]),
                           ("POST", "/v1/orchestrate", 200, ids[1]),
                           ("GET", "/metrics", 200, None)]
    assert all(isinstance(a["duration_ms"], int) for a in lines if a["logger"] == "access")
    turn_lines = [line for line in lines if line["logger"].startswith("pipeline.")]
    assert [(t["logger"], t["message"], t["request_id"]) for t in turn_lines] == [
        ("pipeline.orchestrator", "turn started", ids[0]),
        ("pipeline.orchestrator", "turn completed", ids[0]),
        ("pipeline.orchestrator", "turn started", ids[1]),
        ("pipeline.providers", turn_lines[3]["message"], ids[1]),
        ("pipeline.orchestrator", "turn error", ids[1]),
    ]
    assert turn_lines[3]["level"] == "WARNING" and "ghost" in turn_lines[3]["message"]


def test_log_level_warning_hides_info_lines(tmp_path: Path) -> None:
    running = start(tmp_path, LOG_LEVEL="warning")
    code = running.stop()
    assert code == 0
    assert running.output() == ""


def _failed_start(running: Proc) -> tuple[int, list[str]]:
    code = running.proc.wait(timeout=30)
    return code, running.output().strip().splitlines()


def test_port_in_use_is_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = _failed_start(launch(tmp_path, port=port))
    assert code == 1
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines), lines
    assert f"cannot start: port {port} on 127.0.0.1 is already in use" in lines[-1]
    assert "PORT=" in lines[-1]


def test_store_locked_by_another_server_is_one_line(tmp_path: Path) -> None:
    first = start(tmp_path)
    try:
        code, lines = _failed_start(launch(tmp_path))  # same DB_PATH, another port
    finally:
        assert first.stop() == 0
    assert code == 1
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines), lines
    assert f"is held by process {first.proc.pid}" in lines[-1]
    assert "DB_PATH=" in lines[-1]


def test_invalid_settings_are_one_json_line_with_log_format_json(tmp_path: Path) -> None:
    code, lines = _failed_start(launch(tmp_path, LOG_FORMAT="json", LOG_LEVEL="loud"))
    assert code == 2
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["level"] == "ERROR" and line["message"].startswith("invalid settings: LOG_LEVEL: ")
    assert "'loud'" in line["message"]

"""The recorder and a worker as real processes (issue 13), against the machine's Redis (db 11).

``python server.py --role recorder`` is the only process that opens the DuckDB file;
``python server.py --role worker`` serves the API with the recorder's store over its
internal API. Turns run through the worker (the official ``openai`` client, and native SSE
with a conversation id); the file, read after the recorder stopped, has every event exactly
once, the request and message rows, and the second turn of a conversation remembered the
first through the recorder. ``kill -9`` of the recorder mid-turn, then a restart: nothing
lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import openai
import pytest

from core.config import Settings
from tests.procs import free_port
from tests.redis_helpers import REDIS_HOST, REDIS_PORT, delete_prefix, require_redis
from tests.sse_client import Frame, assert_wire_rules, event_frames, read_frames

ROOT = Path(__file__).resolve().parents[1]
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"
START_S = 30.0
STOP_S = 20.0


@dataclasses.dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_S)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name} did not stop:\n{self.output()}")


def spawn(folder: Path, name: str, args: list[str], health: str,
          env: dict[str, str | float]) -> Proc:
    """``python server.py ARGS`` with only ``env``'s settings, its output in ``name.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    variables = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    variables.update({k: str(v) for k, v in env.items()}, PYTHONUNBUFFERED="1",
                     PYTHONPATH=str(ROOT))
    log = folder / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "server.py", *args], cwd=ROOT, env=variables,
                                stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, proc, health.rsplit("/", 1)[0], log)


async def launch(folder: Path, name: str, args: list[str], health: str,
                 env: dict[str, str | float]) -> Proc:
    """:func:`spawn`, then wait until ``health`` answers 200."""
    running = spawn(folder, name, args, health, env)
    proc = running.proc
    deadline = time.monotonic() + START_S
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{running.output()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(health, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return running
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"{name} not healthy in {START_S}s:\n{running.output()}")
            await asyncio.sleep(0.05)


@dataclasses.dataclass
class Stack:
    folder: Path
    prefix: str
    recorder_port: int
    env: dict[str, str | float]
    recorder: Proc | None = None
    worker: Proc | None = None

    @property
    def db(self) -> Path:
        return self.folder / "events.duckdb"

    async def start_recorder(self) -> Proc:
        self.recorder = await launch(
            self.folder, "recorder",
            ["--role", "recorder", "--db", str(self.db), "--event-log", URL,
             "--recorder-port", str(self.recorder_port)],
            f"http://127.0.0.1:{self.recorder_port}/healthz", self.env)
        return self.recorder

    async def start_worker(self) -> Proc:
        port = free_port()
        self.worker = await launch(
            self.folder, "worker",
            ["--role", "worker", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(self.folder / "worker-never-opens-this.duckdb"), "--event-log", URL,
             "--recorder-url", f"http://127.0.0.1:{self.recorder_port}"],
            f"http://127.0.0.1:{port}/healthz", self.env)
        return self.worker


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, **env: str | float) -> AsyncIterator[Stack]:
    require_redis()
    prefix = f"rec-{uuid.uuid4().hex[:12]}"
    s = Stack(tmp_path, prefix, free_port(), {
        "REDIS_PREFIX": prefix, "FLUSH_INTERVAL_MS": 50, "EVENT_LOG_PING_S": 0.2,
        "EVENT_LOG_RETRY_MAX_S": 0.2, **env})
    try:
        yield s
    finally:
        for proc in (s.worker, s.recorder):
            if proc is not None and proc.proc.poll() is None:
                assert proc.stop() == 0, proc.output()
        await delete_prefix(URL, prefix)


def stored(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


async def orchestrate(session: aiohttp.ClientSession, worker: Proc, body: dict[str, Any]
                      ) -> list[Frame]:
    async with session.post(f"{worker.base}/v1/orchestrate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return event_frames(await read_frames(resp))


def assert_stored_exactly(db: Path, request_id: str, frames: list[Frame]) -> None:
    """The file holds exactly the events the client saw (a trace stream: all of them)."""
    rows = stored(db, "SELECT seq, data FROM events WHERE request_id = ? ORDER BY seq",
                  [request_id])
    assert [seq for seq, _ in rows] == [int(frame.id or 0) for frame in frames]
    assert [json.loads(data) for _, data in rows] == [frame.json for frame in frames]


async def test_turns_through_a_worker_are_recorded_once_by_the_recorder(tmp_path: Path) -> None:
    async with stack(tmp_path, OFFLINE_TOKEN_DELAY_MS=2, EXPORT_INTERVAL_S=0.5) as s:
        await s.start_recorder()
        worker = await s.start_worker()
        async with aiohttp.ClientSession() as session:
            first = await orchestrate(session, worker, {
                "messages": [{"role": "user", "content": "My name is Ada."}],
                "conversation_id": "conv_e2e", "trace": True})
            second = await orchestrate(session, worker, {
                "messages": [{"role": "user", "content": "What is my name?"}],
                "conversation_id": "conv_e2e", "trace": True})
            async with session.get(f"{worker.base}/healthz") as resp:
                health = await resp.json()
            # /v1/query through the worker is answered by the recorder, caught up first
            async with session.post(f"{worker.base}/v1/query", json={
                    "sql": "SELECT count(*) AS n, count(DISTINCT request_id) AS turns "
                           "FROM events"}) as resp:
                assert resp.status == 200, await resp.text()
                counted = await resp.json()
            async with session.post(f"{worker.base}/v1/query",
                                    json={"sql": "DELETE FROM events"}) as resp:
                refused = (resp.status, (await resp.json())["error"]["code"])
            async with session.post(f"{worker.base}/v1/query", json={
                    "sql": "SELECT 1 AS one", "format": "csv"}) as resp:
                csv_answer = (resp.status, resp.content_type, await resp.text())
        client = openai.AsyncOpenAI(base_url=f"{worker.base}/v1", api_key="x", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="offline", messages=[{"role": "user", "content": "hi from the SDK"}],
                stream=True)
            sdk_text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                                if chunk.choices])
        finally:
            await client.close()
        assert sdk_text
        assert counted["rows"] == [[len(first) + len(second), 2]]
        assert refused == (403, "query_refused")
        assert csv_answer == (200, "text/csv", "one\r\n1\r\n")
        assert health["status"] == "ok" and health["store"]["writable"] is True
        for frames in (first, second):
            assert_wire_rules(frames, trace=True)
        # memory through the recorder: the second turn loaded the first turn's two messages
        memory = next(f.json for f in second if f.event == "memory")
        assert memory["messages_loaded"] == 2
        llm_call = next(f.json for f in second if f.event == "llm_call")
        said = [m["content"] for m in llm_call["messages"]]
        assert "My name is Ada." in said
        first_answer = "".join(f.json["delta"] for f in first if f.event == "text")
        assert first_answer in said
        assert s.worker is not None and s.recorder is not None
        # The scheduled export runs in the recorder, which has the file; never on a worker.
        # (the files appear before the recorder logs the run: wait for both)
        deadline = time.monotonic() + 30
        while not list((tmp_path / "lake").glob("events/*/*.parquet")) or (
                "recorder: exported" not in s.recorder.log.read_text(errors="replace")):
            assert time.monotonic() < deadline, s.recorder.output()
            await asyncio.sleep(0.1)
        assert "export failed" not in s.worker.log.read_text(errors="replace")
        assert s.worker.stop() == 0 and s.recorder.stop() == 0
    assert not (tmp_path / "worker-never-opens-this.duckdb").exists()
    ids = [frames[0].json["request_id"] for frames in (first, second)]
    for request_id, frames in zip(ids, (first, second), strict=True):
        assert_stored_exactly(s.db, request_id, frames)
    requests = stored(s.db, "SELECT request_id, status, kind, conversation_id FROM requests "
                            "ORDER BY started_at")
    assert [row[:2] for row in requests[:2]] == [(ids[0], "completed"), (ids[1], "completed")]
    assert requests[2][1:3] == ("completed", "chat.completions")
    assert stored(s.db, "SELECT role, content, status FROM messages WHERE request_id = ? "
                        "ORDER BY ordinal", [ids[0]]) == [
        ("user", "My name is Ada.", "complete"), ("assistant", first_answer, "complete")]
    sdk_request = requests[2][0]
    assert stored(s.db, "SELECT content FROM messages WHERE request_id = ? AND role = "
                        "'assistant'", [sdk_request]) == [(sdk_text,)]
    assert stored(s.db, "SELECT count(*) - count(DISTINCT (request_id, seq)) FROM events") == [(0,)]


async def test_kill_9_of_the_recorder_mid_turn_loses_nothing_and_doubles_nothing(
        tmp_path: Path) -> None:
    async with stack(tmp_path, OFFLINE_TOKEN_DELAY_MS=25, RECORDER_TIMEOUT_S=30,
                     RECORDER_POLL_S=0.1) as s:
        recorder = await s.start_recorder()
        worker = await s.start_worker()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{worker.base}/v1/orchestrate", json={
                    "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 120, "trace": True}) as resp:
                assert resp.status == 200
                frames: list[Frame] = []
                killed = False
                async for frame in _frames(resp):
                    frames.append(frame)
                    if not killed and frame.event == "text" and len(frames) > 20:
                        # some of the turn is recorded (a flush interval is 50 ms), then:
                        await _recorded_some(session, recorder)
                        recorder.kill9()
                        killed = True
                        # the turn goes on without a recorder; the worker says degraded
                        health = await _degraded(session, worker)
                        recorder = await s.start_recorder()
            async with session.get(f"{recorder.base}/internal/health") as resp:
                stats = (await resp.json())["recorder"]
        assert killed
        assert health["status"] == "degraded" and health["store"]["writable"] is False
        assert "recorder unreachable" in health["store"]["last_error"]
        # the restarted recorder read its pending entry again and took the turn up
        assert stats["redelivered"] == 1 and stats["resumed"] == 1, stats
        assert_wire_rules(frames, trace=True)
        done = frames[-1].json
        assert done["type"] == "done" and done["ok"] is True, done
        request_id = frames[0].json["request_id"]
        assert recorder.stop() == 0
        assert s.worker is not None and s.worker.stop() == 0
    assert_stored_exactly(s.db, request_id, frames)
    assert stored(s.db, "SELECT status, last_seq FROM requests WHERE request_id = ?",
                  [request_id]) == [("completed", int(frames[-1].id or 0))]
    text = "".join(f.json["delta"] for f in frames if f.event == "text")
    assert stored(s.db, "SELECT content, status FROM messages WHERE request_id = ? AND "
                        "role = 'assistant'", [request_id]) == [(text, "complete")]


async def _recorded_some(session: aiohttp.ClientSession, recorder: Proc) -> None:
    deadline = time.monotonic() + START_S
    while True:
        async with session.get(f"{recorder.base}/internal/health") as resp:
            body = await resp.json()
        if body["recorder"]["events_recorded"] >= 10 and body["store"]["events_written"] >= 10:
            return
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


async def _degraded(session: aiohttp.ClientSession, worker: Proc) -> Any:
    """The worker's /healthz once it says degraded (503)."""
    deadline = time.monotonic() + START_S
    while True:
        async with session.get(f"{worker.base}/healthz") as resp:
            body = await resp.json()
            if resp.status == 503:
                return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def _frames(resp: aiohttp.ClientResponse) -> AsyncIterator[Frame]:
    from tests.sse_client import iter_frames

    async with contextlib.aclosing(iter_frames(resp)) as stream:
        async for frame in stream:
            if frame.data is not None:
                yield frame


async def test_the_responses_wire_through_a_worker_keeps_its_rows_in_the_recorder(
        tmp_path: Path) -> None:
    """A stored response, a follow-up on ``previous_response_id`` (memory through the
    recorder, the previous response's row read back from it), retrieve, delete."""
    async with stack(tmp_path, OFFLINE_TOKEN_DELAY_MS=1) as s:
        await s.start_recorder()
        worker = await s.start_worker()
        client = openai.AsyncOpenAI(base_url=f"{worker.base}/v1", api_key="x", max_retries=0)
        try:
            first = await client.responses.create(model="offline", input="Remember: blue.")
            second = await client.responses.create(model="offline", input="Which colour?",
                                                   previous_response_id=first.id)
            retrieved = await client.responses.retrieve(first.id)
            deleted = await client.responses.delete(second.id)
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(second.id)
        finally:
            await client.close()
        assert first.status == second.status == retrieved.status == "completed"
        assert retrieved.output_text == first.output_text
        assert deleted is None or getattr(deleted, "deleted", True)
        assert s.worker is not None and s.recorder is not None
        assert s.worker.stop() == 0 and s.recorder.stop() == 0
    rows = stored(s.db, "SELECT response_id FROM responses")
    assert rows == [(first.id,)]
    memory = stored(s.db, "SELECT data->>'messages_loaded' FROM events WHERE type = 'memory' "
                          "AND request_id = ?", ["req_" + second.id.removeprefix("resp_")])
    assert memory == [("2",)]


async def test_a_worker_with_another_key_than_its_recorders_refuses_to_start(
        tmp_path: Path) -> None:
    """Hand-run roles with different ``RECORDER_TOKEN``s: the recorder answers the worker's
    health polls (they need no key) but none of its store calls, so the worker does not
    serve as if all were well: it exits at start naming the setting, and never logs a key."""
    mine, other = "the-recorders-own-key-0123", "a-workers-other-key-4567"
    async with stack(tmp_path, RECORDER_TOKEN=mine) as s:
        recorder = await s.start_recorder()
        port = free_port()
        worker = spawn(s.folder, "worker", [
            "--role", "worker", "--host", "127.0.0.1", "--port", str(port), "--event-log", URL,
            "--recorder-url", f"http://127.0.0.1:{s.recorder_port}"],
            f"http://127.0.0.1:{port}/healthz", {**s.env, "RECORDER_TOKEN": other})
        assert worker.proc.wait(timeout=START_S) == 1, worker.output()
        output = worker.output()
        assert "refuses this worker's key" in output and "RECORDER_TOKEN" in output, output
        assert mine not in output and other not in output
        assert mine not in recorder.output() and other not in recorder.output()
        # the same worker with the recorder's key starts and serves
        s.env["RECORDER_TOKEN"] = mine
        started = await s.start_worker()
        async with aiohttp.ClientSession() as session:
            frames = await orchestrate(session, started, {
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert frames[-1].event == "done" and frames[-1].json["ok"] is True, frames[-1]


def test_an_invalid_recorder_token_is_refused_at_start_without_being_logged(
        tmp_path: Path) -> None:
    secret = "shortSECRET"
    variables = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    done = subprocess.run(
        [sys.executable, "server.py", "--db", str(tmp_path / "e.duckdb")], cwd=ROOT,
        env={**variables, "RECORDER_TOKEN": secret, "PYTHONPATH": str(ROOT)},
        capture_output=True, timeout=60)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 2, output
    assert "RECORDER_TOKEN" in output and "<redacted>" in output, output
    assert secret not in output

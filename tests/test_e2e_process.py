"""End to end against a real ``python server.py`` process on a loopback port.

aiohttp's test server forces ``handler_cancellation`` on; only a real process shows what
production does with disconnects and SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import openai
import pytest

from core.config import Settings
from pipeline.offline_model import compose_answer
from tests.procs import free_port
from tests.sse_client import Frame, assert_wire_rules, iter_frames, read_frames

ROOT = Path(__file__).resolve().parents[1]
MODEL = "offline"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    base: str
    db: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed and failed if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server did not stop within {STOP_TIMEOUT_S}s:\n{self.output()}")


def server_env(token_delay_ms: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in Settings.model_fields}  # no OPENAI_*, no stray settings
    env["OFFLINE_TOKEN_DELAY_MS"] = str(token_delay_ms)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_server(folder: Path, *, token_delay_ms: float) -> ServerProcess:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db = folder / "events.duckdb"
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(db)],
            cwd=ROOT, env=server_env(token_delay_ms), stdout=out, stderr=subprocess.STDOUT,
        )
    running = ServerProcess(proc=proc, base=f"http://127.0.0.1:{port}", db=db, log=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{running.output()}")
        try:
            if get_json(f"{running.base}/healthz", timeout=1)["status"] == "ok":
                return running
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"server not healthy within {START_TIMEOUT_S}s:\n{running.output()}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = start_server(tmp_path_factory.mktemp("e2e"), token_delay_ms=2)
    yield running.base
    code = running.stop()
    assert code == 0, f"exit code {code}:\n{running.output()}"
    # Clients that left mid-stream (the disconnect tests) are normal: no error is logged.
    log = running.log.read_text(errors="replace")
    assert " ERROR " not in log and "Traceback" not in log, log[-4000:]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def test_openai_sdk_streamed_and_not(live_server: str) -> None:
    messages: list[Any] = [user("What is the speed of light?")]
    async with openai.AsyncOpenAI(
        base_url=f"{live_server}/v1", api_key="x", max_retries=0
    ) as client:
        models = [m.id async for m in client.models.list()]
        assert MODEL in models

        completion = await client.chat.completions.create(model=MODEL, messages=messages)
        whole = completion.choices[0].message.content

        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        deltas: list[str] = []
        finish: list[str] = []
        usage = None
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        deltas.append(choice.delta.content)
                    if choice.finish_reason:
                        finish.append(choice.finish_reason)
                if chunk.usage is not None:
                    usage = chunk.usage
    assert whole == "".join(deltas) == "".join(compose_answer(MODEL, messages))
    assert completion.choices[0].finish_reason == "stop" and finish == ["stop"]
    assert usage is not None and usage.completion_tokens == len(deltas)
    assert completion.usage is not None and completion.usage == usage


async def test_orchestrate_wire_rules(live_server: str) -> None:
    messages = [user("Describe a lighthouse.")]
    async with aiohttp.ClientSession() as session:
        for trace in (False, True):
            async with session.post(
                f"{live_server}/v1/orchestrate", json={"messages": messages, "trace": trace}
            ) as resp:
                assert resp.status == 200
                frames = await read_frames(resp)
            events = assert_wire_rules(frames, trace=trace)
            assert resp.headers["X-Request-Id"] == events[0]["request_id"]
            text = "".join(e["delta"] for e in events if e["type"] == "text")
            assert text == "".join(compose_answer(MODEL, messages))
            assert events[-1]["ok"] is True


async def test_disconnect_then_live_turns_return_to_zero(live_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{live_server}/v1/orchestrate",
            json={"messages": [user("Talk to the empty room.")], "max_tokens": 100},
        )
        texts = 0
        async for frame in iter_frames(resp):
            texts += frame.event == "text"
            if texts >= 3:
                break
        async with session.get(f"{live_server}/healthz") as health:
            assert (await health.json())["live_turns"] == 1
        resp.close()

        deadline = time.monotonic() + 5
        while True:
            async with session.get(f"{live_server}/healthz") as health:
                if (await health.json())["live_turns"] == 0:
                    break
            assert time.monotonic() < deadline, "the abandoned turn never finished"
            await asyncio.sleep(0.05)


async def test_disconnect_with_cancel_stops_the_turn_at_once(live_server: str) -> None:
    # 2000 tokens at 2 ms take over 4 s; a cancelled turn leaves far sooner. This is the
    # production path (handler_cancellation set by serve()), not the test server's.
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{live_server}/v1/orchestrate",
            json={"messages": [user("Go on forever.")], "max_tokens": 2000,
                  "on_disconnect": "cancel"},
        )
        texts = 0
        async for frame in iter_frames(resp):
            texts += frame.event == "text"
            if texts >= 3:
                break
        resp.close()
        left = time.monotonic()
        while True:
            async with session.get(f"{live_server}/healthz") as health:
                if (await health.json())["live_turns"] == 0:
                    break
            assert time.monotonic() - left < 2, "the turn was not cancelled on disconnect"
            await asyncio.sleep(0.05)


async def test_sigterm_lets_the_running_turn_finish(tmp_path: Path) -> None:
    running = start_server(tmp_path / "sigterm", token_delay_ms=5)
    messages = [user("A long answer, please.")]
    frames: list[Frame] = []
    try:
        async with aiohttp.ClientSession() as session, session.post(
            f"{running.base}/v1/orchestrate", json={"messages": messages, "max_tokens": 200}
        ) as resp:
            assert resp.status == 200
            texts = 0
            signalled = False
            async for frame in iter_frames(resp):
                frames.append(frame)
                texts += frame.event == "text"
                if texts >= 3 and not signalled:
                    running.proc.send_signal(signal.SIGTERM)
                    signalled = True
            assert signalled
    finally:
        code = await asyncio.to_thread(running.stop)
    assert code == 0, f"exit code {code}:\n{running.output()}"

    events = assert_wire_rules(frames, trace=False)
    done = events[-1]
    assert done["type"] == "done" and done["ok"] is True and done["reason"] == "completed"
    text = "".join(e["delta"] for e in events if e["type"] == "text")
    assert text == "".join(compose_answer(MODEL, messages, max_tokens=200))
    request_id = events[0]["request_id"]

    with duckdb.connect(str(running.db), read_only=True) as con:
        count, max_seq = con.execute(
            "SELECT count(*), max(seq) FROM events WHERE request_id = ?", [request_id]
        ).fetchall()[0]
        assert count == max_seq == done["seq"]
        status, last_seq, completion_tokens = con.execute(
            "SELECT status, last_seq, completion_tokens FROM requests WHERE request_id = ?",
            [request_id],
        ).fetchall()[0]
        assert (status, last_seq, completion_tokens) == ("completed", done["seq"], 200)
        messages_rows = con.execute(
            "SELECT role, content, status FROM messages WHERE request_id = ? ORDER BY ordinal",
            [request_id],
        ).fetchall()
    assert messages_rows == [
        ("user", "A long answer, please.", "complete"),
        ("assistant", text, "complete"),
    ]

"""Nothing lost, nothing pretended (issue 10, the store's part).

- One bad row (a lone surrogate) costs no other row anything: it is kept in
  ``dead_letters``, its turn says it is not durable, every other turn's events are stored.
- A store that cannot write (an injected I/O error; a full tmpfs under a real server
  process) keeps the rows and retries; ``/healthz`` is 503, new turns get a 503
  ``store_unavailable`` once the backlog is full, each turn's ``done`` says its events are
  not durable; when the store writes again everything kept is written.
- No store error sent to a client names a file system path.
- ``durable_done`` (marble tests): ``done`` waits for the barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from reactivex import Observable
from reactivex.testing import ReactiveTest, TestScheduler

import server
import sinks.store as store_module
from core.config import Settings
from core.errors import StoreError
from core.events import Done, ErrorEvent, Event, Text
from core.turn import ChatMessage, TurnInput
from operators import durable_done
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import Delta, Finish, Piece, Usage
from sinks.store import EventStore, MessageRow, RequestRow, scrub_paths
from tests.procs import free_port
from tests.sse_client import Frame, assert_wire_rules, read_frames
from tests.test_durable_e2e import running_server
from tests.upstream_standin import StandIn

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
POISON = "a\ud800b"
ROOT = Path(__file__).resolve().parents[1]


async def poll(check: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, *,
               within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {within_s}s: {what}"
        await asyncio.sleep(0.02)


# -- durable_done, in virtual time -----------------------------------------------------------
TEXT = Text(stream_id=1, delta="hi")
DONE = Done(ok=True, duration_ms=1.0, reason="completed")


def kinds(messages: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for m in messages:
        value = m.value
        if value.kind == "N":
            event = value.value
            out.append((m.time, event.type, *(
                (event.ok, event.reason) if isinstance(event, Done) else
                (event.error, event.retryable) if isinstance(event, ErrorEvent) else ())))
        else:
            out.append((m.time, value.kind))
    return out


def test_durable_done_holds_done_until_the_barrier_completes() -> None:
    scheduler = TestScheduler()
    barrier = scheduler.create_cold_observable(on_completed(30))
    source = scheduler.create_cold_observable(
        on_next(10, TEXT), on_next(20, DONE), on_completed(20))
    results = scheduler.start(lambda: source.pipe(durable_done(lambda: barrier)))
    assert kinds(results.messages) == [
        (210, "text"), (250, "done", True, "completed"), (250, "C")]
    assert barrier.subscriptions == [subscribe(220, 250)]


def test_durable_done_a_failed_barrier_makes_done_say_not_ok() -> None:
    scheduler = TestScheduler()
    barrier: Observable[Any] = scheduler.create_cold_observable(on_error(5, StoreError("disk full")))
    source = scheduler.create_cold_observable(
        on_next(10, TEXT), on_next(20, DONE), on_completed(20))
    results = scheduler.start(lambda: source.pipe(durable_done(lambda: barrier)))
    assert kinds(results.messages) == [
        (210, "text"),
        (225, "turn_error", "the turn's events are not durable: disk full", True),
        (225, "done", False, "error"), (225, "C")]


def test_durable_done_keeps_the_reason_of_a_turn_that_did_not_complete() -> None:
    scheduler = TestScheduler()
    cancelled = Done(ok=False, duration_ms=1.0, reason="cancelled")
    source = scheduler.create_cold_observable(on_next(10, cancelled), on_completed(10))

    def failing() -> Observable[Any]:
        raise StoreError("closed")

    results = scheduler.start(lambda: source.pipe(durable_done(failing)))
    assert kinds(results.messages) == [
        (210, "turn_error", "the turn's events are not durable: closed", True),
        (210, "done", False, "cancelled"), (210, "C")]


def test_durable_done_passes_errors_and_a_first_item_releases() -> None:
    scheduler = TestScheduler()
    barrier = scheduler.create_cold_observable(on_next(3, None))  # never completes
    source = scheduler.create_cold_observable(on_next(10, DONE), on_completed(10))
    results = scheduler.start(lambda: source.pipe(durable_done(lambda: barrier)))
    assert kinds(results.messages) == [(213, "done", True, "completed"), (213, "C")]
    assert barrier.subscriptions == [subscribe(210, 213)]

    scheduler = TestScheduler()
    boom = ValueError("boom")
    failing = scheduler.create_cold_observable(on_next(10, TEXT), on_error(20, boom))
    results = scheduler.start(lambda: failing.pipe(durable_done(lambda: barrier)))
    assert results.messages[-1] == on_error(220, boom)


# -- one bad row -----------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "e.duckdb", flush_interval_ms=60_000, flush_max_rows=10_000).open()
    try:
        yield s
    finally:
        s.close()


def text(request_id: str, seq: int, delta: str = "x") -> Text:
    return Text(request_id=request_id, seq=seq, stream_id=1, delta=delta)


async def test_one_bad_row_costs_no_other_row_anything(store: EventStore) -> None:
    # Three turns' events in one batch; one event of turn B holds a lone surrogate.
    for seq in range(1, 6):
        for request_id in ("A", "B", "C"):
            store.append_event(text(request_id, seq, POISON if (request_id, seq) == ("B", 3)
                                    else f"{request_id}{seq}"), agent="assistant", depth=0)
    for request_id in ("A", "B", "C"):
        store.put_request(RequestRow(request_id=request_id, conversation_id="c",
                                     kind="orchestrate", status="completed", started_at=1.0))
    store.put_message(MessageRow(message_id="B:assistant", conversation_id="c", request_id="B",
                                 ordinal=1, role="assistant", content=f"x{POISON}",
                                 status="complete", created_at=1.0, updated_at=1.0))
    await store.flush(request_id="A")  # A lost nothing
    with pytest.raises(StoreError) as caught:
        await store.flush(request_id="B")
    assert str(caught.value).startswith("flush failed: 2 rows could not be written")
    await store.flush(request_id="B")  # reported once

    rows = store.query("SELECT request_id, seq FROM events ORDER BY request_id, seq")
    assert rows == [(r, s) for r in "ABC" for s in range(1, 6) if (r, s) != ("B", 3)]
    assert store.query("SELECT request_id FROM requests ORDER BY 1") == [("A",), ("B",), ("C",)]
    dead = store.query("SELECT request_id, row_key, target, error, content FROM dead_letters "
                       "ORDER BY target")
    assert [row[:3] for row in dead] == [("B", "3", "events"), ("B", "B:assistant", "messages")]
    for _, _, _, error, content in dead:
        assert "surrogate" in error and "not allowed" in error  # pydantic or DuckDB says so
        assert "\\ud800" in content and content.isascii()  # the content, made safe
    assert store.stats.dead_letters == 2 and store.health().writable


# -- the orchestrator: a poisoned turn among healthy ones --------------------------------------
class Held:
    """A provider whose streams wait at one gate, so every turn's events share a batch."""

    name = "held"

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.waiting = 0

    async def stream_chat(self, *, model: str, messages: Sequence[dict[str, Any]],
                          max_tokens: int | None = None) -> AsyncIterator[Piece]:
        content = messages[-1]["content"]
        yield Delta("w0 ")
        yield Delta(POISON if content == "poison" else "w1 ")
        self.waiting += 1
        await self.gate.wait()
        yield Finish("stop")
        yield Usage(model=model, prompt_tokens=1, completion_tokens=2, total_tokens=3)

    async def list_models(self) -> list[str]:
        return ["m"]


def shape(events: Sequence[Event]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        match e:
            case Text(delta=delta):
                out.append(("text", delta))
            case ErrorEvent(error=error, retryable=retryable):
                out.append(("error", error, retryable))
            case Done(ok=ok, reason=reason):
                out.append(("done", ok, reason))
            case _:
                out.append((e.type,))
    return out


async def test_a_poisoned_turn_says_so_and_healthy_turns_lose_nothing(tmp_path: Path) -> None:
    gate = asyncio.Event()
    provider = Held(gate)
    store = EventStore(tmp_path / "e.duckdb", flush_interval_ms=60_000).open()
    try:
        orchestrator = StreamingOrchestrator(provider=provider, store=store, default_model="m")
        turns = [orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content=c)]))
                 for c in ("fine", "poison", "also fine")]
        await poll(lambda: provider.waiting == 3, "every turn is streaming")
        gate.set()
        results = [await asyncio.wait_for(t.result, 10) for t in turns]
        events = [[] for _ in turns]  # type: list[list[Event]]
        for turn, seen in zip(turns, events, strict=True):
            turn.stream.subscribe(seen.append).dispose()
        body = [("request_received",), ("route",), ("memory",), ("llm_call",),
                ("stream_start",), ("text", "w0 ")]
        tail = [("token_usage",), ("stream_end",)]
        assert shape(events[0]) == [*body, ("text", "w1 "), *tail, ("done", True, "completed")]
        assert shape(events[2]) == shape(events[0])
        poisoned = shape(events[1])
        assert poisoned[:-2] == [*body, ("text", POISON), *tail]
        assert poisoned[-1] == ("done", False, "error")
        assert poisoned[-2][0] == "error" and poisoned[-2][2] is True
        assert poisoned[-2][1].startswith(
            "the turn's events are not durable: flush failed: 1 rows could not be written")
        assert [r.status for r in results] == ["completed", "error", "completed"]

        await store.flush()
        for turn, seen in zip(turns, events, strict=True):
            stored = store.query("SELECT seq, type FROM events WHERE request_id = ? ORDER BY seq",
                                 [turn.request_id])
            lost = [(e.seq, e.type) for e in seen if isinstance(e, Text) and e.delta == POISON]
            assert stored == [(e.seq, e.type) for e in seen if (e.seq, e.type) not in lost]
        status = store.query("SELECT request_id, status, error FROM requests")
        by_id = {r: (s, e) for r, s, e in status}
        assert by_id[turns[1].request_id][0] == "error"
        assert "not durable" in by_id[turns[1].request_id][1]
        assert by_id[turns[0].request_id] == ("completed", None)
        # The poisoned text and the assistant message that holds it are the dead letters.
        assert store.query("SELECT request_id, target FROM dead_letters ORDER BY target") == [
            (turns[1].request_id, "events"), (turns[1].request_id, "messages")]
    finally:
        store.close()


async def test_process_a_poisoned_model_answer_costs_other_turns_nothing(tmp_path: Path) -> None:
    async with StandIn() as standin, running_server(
            tmp_path / "srv", "poison", OPENAI_BASE_URL=standin.base_url, OPENAI_API_KEY="x",
            DEFAULT_MODEL="good", MODEL_MAX_RETRIES=0, FLUSH_INTERVAL_MS=200,
    ) as srv, aiohttp.ClientSession() as session:
        ids: dict[str, str] = {}
        for name in ("good", "poison", "good2"):
            async with session.post(srv.url("/v1/orchestrate"), json={
                    "model": name.rstrip("2"), "background": True,
                    "messages": [{"role": "user", "content": "hi"}]}) as resp:
                assert resp.status == 202, await resp.text()
                ids[name] = (await resp.json())["request_id"]

        async def status(name: str) -> Any:
            async with session.get(srv.url(f"/v1/requests/{ids[name]}")) as resp:
                return await resp.json()

        async def all_done() -> bool:
            return all([(await status(n))["status"] != "running" for n in ids])

        await poll(all_done, "every turn finished")
        assert [(await status(n))["status"] for n in ids] == ["completed", "error", "completed"]

        async def replay(name: str) -> list[dict[str, Any]]:
            async with session.get(srv.url(f"/v1/requests/{ids[name]}/events")) as resp:
                assert resp.status == 200
                return assert_wire_rules(await read_frames(resp), trace=False)

        good = [(e["type"], e.get("delta")) for e in await replay("good")]
        assert good == [("request_received", None), ("stream_start", None),
                        ("text", "w0 "), ("text", "w1 "), ("text", "w2 "),
                        ("token_usage", None), ("stream_end", None), ("done", None)]
        assert [(e["type"], e.get("delta")) for e in await replay("good2")] == good
        poisoned = await replay("poison")  # stored without its poisoned text
        assert [(e["type"], e.get("delta")) for e in poisoned] == [
            ("request_received", None), ("stream_start", None), ("text", "w0 "),
            ("text", "w2 "), ("token_usage", None), ("stream_end", None), ("turn_error", None),
            ("done", None)]
        assert poisoned[-1]["ok"] is False and "not durable" in poisoned[-2]["error"]
        async with session.get(srv.url("/healthz")) as resp:
            health = await resp.json()
        assert resp.status == 200 and health["store"]["dead_letters"] == 2
    assert "kept in dead_letters" in srv.log.read_text(errors="replace")
    assert "its events are not durable" in srv.log.read_text(errors="replace")  # the log line


# -- a store that cannot write, in-process (an injected I/O error) ----------------------------
SECRET = "/srv/secret-folder/events.duckdb.wal"


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """While ``state["on"]``, every write fails as DuckDB fails on a full disk."""
    state = {"on": False}
    apply = store_module._apply

    def failing(con: duckdb.DuckDBPyConnection, batches: dict[str, Any], *, strict: bool,
                by_position: bool = True) -> None:
        if state["on"]:
            raise duckdb.IOException(f'Could not write file "{SECRET}": No space left on device')
        apply(con, batches, strict=strict, by_position=by_position)

    monkeypatch.setattr(store_module, "_apply", failing)
    return state


async def test_store_health_backoff_and_barrier_while_it_cannot_write(
    tmp_path: Path, broken: dict[str, bool]
) -> None:
    store = EventStore(tmp_path / "e.duckdb", flush_interval_ms=10, backlog_max_rows=3,
                       retry_min_ms=10, retry_max_ms=40).open()
    try:
        broken["on"] = True
        for seq in (1, 2, 3):
            store.append_event(text("r", seq), agent=None, depth=None)
        with pytest.raises(StoreError) as caught:
            await store.flush(timeout_s=0.3)
        message = str(caught.value)
        assert message.startswith("the event store has not written within 0.3s (3 rows wait")
        assert "/srv" not in message and 'Could not write file "<path>"' in message
        health = store.health()
        assert (health.writable, health.backlog_rows, health.accepting) == (False, 3, False)
        assert health.last_error == (
            'IOException: Could not write file "<path>": No space left on device')
        await poll(lambda: store.stats.retries >= 3, "retried with backoff")
        assert store.query("SELECT count(*) FROM events") == [(0,)]

        broken["on"] = False
        await store.flush()
        assert store.query("SELECT seq FROM events ORDER BY seq") == [(1,), (2,), (3,)]
        health = store.health()
        assert (health.writable, health.backlog_rows, health.accepting) == (True, 0, True)
        assert store.stats.dead_letters == 0
    finally:
        store.close()


def test_scrub_paths() -> None:
    assert scrub_paths('Could not write file "/a/b c/x.wal": No space') == (
        'Could not write file "<path>": No space')
    assert scrub_paths("cannot open '/srv/my data/e.duckdb'") == "cannot open '<path>'"
    assert scrub_paths("IO Error: /tmp/x.duckdb.wal: full; at ./rel and x/y") == (
        "IO Error: <path>: full; at ./rel and x/y")


def outage_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 1,
        "flush_interval_ms": 20, "store_backlog_max_rows": 40, "store_retry_min_ms": 20,
        "store_retry_max_ms": 100, "store_barrier_timeout_s": 0.5,
    }
    options.update(overrides)
    return Settings(**options)


async def test_in_process_outage_refuses_turns_then_writes_everything_kept(
    aiohttp_client: ClientFactory, tmp_path: Path, broken: dict[str, bool]
) -> None:
    client = await aiohttp_client(server.create_app(outage_settings(tmp_path)))
    base = str(tmp_path)
    seen: dict[str, list[Frame]] = {}

    async def turn() -> aiohttp.ClientResponse:
        return await client.post("/v1/orchestrate", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})

    broken["on"] = True
    refused: aiohttp.ClientResponse | None = None
    for _ in range(6):
        resp = await turn()
        if resp.status == 503:
            refused = resp
            break
        assert resp.status == 200
        frames = await read_frames(resp)
        events = assert_wire_rules(frames, trace=False)
        seen[events[0]["request_id"]] = [f for f in frames if f.data is not None]
        assert [e["type"] for e in events][-3:] == ["stream_end", "turn_error", "done"]
        assert events[-1]["ok"] is False and events[-1]["reason"] == "error"
        error = events[-2]["error"]
        assert error.startswith("the turn's events are not durable: the event store has not "
                                "written within 0.5s")
        assert "<path>" in error and base not in error and "/srv" not in error
        async with client.get("/healthz") as health:
            assert health.status == 503
            body = await health.json()
        assert body["status"] == "degraded" and body["store"]["writable"] is False
        assert body["store"]["backlog_rows"] > 0 and "path" not in body["store"]
        assert "/srv" not in await health.text() and base not in body["store"]["last_error"]
    assert refused is not None, "new turns were never refused"
    assert len(seen) >= 1
    error = (await refused.json())["error"]
    assert error["code"] == "store_unavailable" and error["type"] == "server_error"
    assert int(refused.headers["Retry-After"]) >= 1 and "/srv" not in error["message"]
    async with client.post("/v1/chat/completions", json={
            "model": "offline", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "store_unavailable"

    broken["on"] = False  # space returns

    async def healthy() -> bool:
        async with client.get("/healthz") as resp:
            body = await resp.json()
            return resp.status == 200 and body["store"]["backlog_rows"] == 0

    await poll(healthy, "the backlog is written")
    for request_id, frames in seen.items():
        async with client.get(f"/v1/requests/{request_id}/events") as resp:
            stored = [f for f in await read_frames(resp) if f.data is not None]
        assert [(f.id, f.event, f.data) for f in stored] == [
            (f.id, f.event, f.data) for f in frames], "the store holds what the client saw"
        async with client.get(f"/v1/requests/{request_id}") as resp:
            row = await resp.json()
        assert row["status"] == "error"
    resp = await turn()
    assert resp.status == 200
    events = assert_wire_rules(await read_frames(resp), trace=False)
    assert events[-1]["ok"] is True


# -- a full disk under a real server process (tmpfs) -----------------------------------------
@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the disk: write a file until there is no space left."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def spawn_on(db: Path, logs: Path, env: dict[str, str | float]) -> tuple[
        subprocess.Popen[bytes], int, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    variables = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    variables.update({k: str(v) for k, v in env.items()}, PYTHONUNBUFFERED="1",
                     ALLOW_FS_BASE=str(logs / "workspace"), EXPORT_DIR=str(logs / "lake"))
    log = logs / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(db)], cwd=ROOT, env=variables, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


@contextlib.asynccontextmanager
async def process_on(db: Path, logs: Path, **env: str | float) -> AsyncIterator[str]:
    """``python server.py`` with its store at ``db`` and its log in ``logs`` (not on ``db``'s
    disk, which fills up)."""
    proc, port, log = spawn_on(db, logs, env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def up() -> bool:
                assert proc.poll() is None, log.read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/healthz") as resp:
                        return resp.status == 200
                return False

            await poll(up, "the server started", within_s=20)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, log.read_text()[-3000:]


async def test_process_full_disk_keeps_refuses_degrades_then_writes_everything(
    tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        async with process_on(
                disk / "events.duckdb", tmp_path / "logs", OFFLINE_TOKEN_DELAY_MS=1,
                FLUSH_INTERVAL_MS=20, STORE_BACKLOG_MAX_ROWS=40, STORE_RETRY_MIN_MS=50,
                STORE_RETRY_MAX_MS=200, STORE_BARRIER_TIMEOUT_S=1,
        ) as base, aiohttp.ClientSession() as session:

            async def turn() -> aiohttp.ClientResponse:
                return await session.post(f"{base}/v1/orchestrate", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})

            async def health() -> tuple[int, Any]:
                async with session.get(f"{base}/healthz") as resp:
                    return resp.status, await resp.json()

            before = await turn()  # the disk still has room
            assert assert_wire_rules(await read_frames(before), trace=False)[-1]["ok"] is True
            filler = fill(disk)

            seen: dict[str, list[Frame]] = {}
            refused: aiohttp.ClientResponse | None = None
            for _ in range(6):
                resp = await turn()
                if resp.status == 503:
                    refused = resp
                    break
                assert resp.status == 200, await resp.text()
                frames = [f for f in await read_frames(resp) if f.data is not None]
                events = assert_wire_rules(frames, trace=False)
                seen[events[0]["request_id"]] = frames
                assert events[-1]["ok"] is False, "a turn claimed success on a full disk"
                error = events[-2]["error"]
                assert "not durable" in error and "No space left on device" in error
                assert str(tmp_path) not in error and "<path>" in error
                status, body = await health()
                assert status == 503 and body["status"] == "degraded"
                assert body["store"]["writable"] is False and body["store"]["backlog_rows"] > 0
                assert str(tmp_path) not in str(body["store"])  # (tools: the door's part)
            assert refused is not None and seen, "new turns were never refused"
            assert refused.headers["Retry-After"].isdigit()
            assert (await refused.json())["error"]["code"] == "store_unavailable"
            status, body = await health()
            kept = body["store"]["backlog_rows"]
            assert kept >= 40 and body["live_turns"] == 0  # the refused turn started nothing

            filler.unlink()  # space returns

            async def written() -> bool:
                status, body = await health()
                return status == 200 and body["store"]["backlog_rows"] == 0

            await poll(written, "the backlog is written")
            for request_id, frames in seen.items():
                async with session.get(f"{base}/v1/requests/{request_id}/events") as resp:
                    stored = [f for f in await read_frames(resp) if f.data is not None]
                assert [(f.id, f.event, f.data) for f in stored] == [
                    (f.id, f.event, f.data) for f in frames]
                async with session.get(f"{base}/v1/requests/{request_id}") as resp:
                    assert (await resp.json())["status"] == "error"
            status, body = await health()
            assert body["store"]["dead_letters"] == 0
            total = sum(len(frames) for frames in seen.values())
            assert body["store"]["events_written"] >= total
        # After a clean stop the file holds every turn: the one before, those of the outage.
        with duckdb.connect(str(disk / "events.duckdb"), read_only=True) as con:
            counts = dict(con.execute(
                "SELECT request_id, count(*) FROM events WHERE visibility = 'public' "
                "GROUP BY 1").fetchall())
        assert {r: counts[r] for r in seen} == {r: len(f) for r, f in seen.items()}
        assert len(counts) == len(seen) + 1


async def test_store_reopens_when_duckdb_invalidates_it_on_a_full_disk(tmp_path: Path) -> None:
    """A checkpoint that fails on a full disk is FATAL for DuckDB's instance ("database has
    been invalidated"): the store reopens it and writes what it kept once space returns."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        store = EventStore(disk / "e.duckdb", flush_interval_ms=10, retry_min_ms=20,
                           retry_max_ms=50).open()
        try:
            store.append_event(text("r", 1), agent=None, depth=None)
            await store.flush()
            # Checkpoint at once, so the next commit checkpoints on the full disk.
            store.cursor().execute("SET checkpoint_threshold = '1KB'")
            filler = fill(disk)
            for seq in range(2, 40):
                store.append_event(text("r", seq, "y" * 200), agent=None, depth=None)
            with pytest.raises(StoreError):
                await store.flush(timeout_s=0.5)
            assert store.health().writable is False
            assert store.stats.last_error is not None and str(disk) not in store.stats.last_error
            filler.unlink()
            await store.flush(timeout_s=10)
            assert store.health().writable
            assert store.query("SELECT seq FROM events ORDER BY seq") == [
                (seq,) for seq in range(1, 40)]
        finally:
            store.close()

"""More of issue 13 against real processes: ``python server.py --workers N --event-log
redis://127.0.0.1:6379/14`` (db 14, key prefixes ``e2e-…``), with the helpers of
:mod:`tests.test_workers_e2e`.

* ``kill -9`` of the recorder mid-turn under the supervisor: it is restarted, takes the turn
  up again, and the file has every event once;
* three followers through three workers see the same stream;
* a follower dropped at several points and resumed through another worker misses nothing
  and repeats nothing;
* a finished turn read through the worker that did not run it: its status from the
  recorder, its replay from the store once its Redis stream expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest
import redis.asyncio as aioredis

from tests.redis_helpers import REDIS_HOST, REDIS_PORT
from tests.sse_client import Frame, assert_wire_rules, event_frames, iter_frames
from tests.test_workers_e2e import (
    Workers,
    ids_of,
    on_worker,
    running,
    seqs_of,
    start_turn,
    until,
)

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/14"  # db 14: this work's own
PREFIX = "e2e"


def supervised(folder: Path, *, workers: int = 2, **env: str | float
               ) -> contextlib.AbstractAsyncContextManager[Workers]:
    """:func:`running` on this file's database and prefix."""
    return running(folder, workers=workers, redis_url=REDIS_URL, prefix_head=PREFIX, **env)


def recorder_of(srv: Workers) -> tuple[int, int] | None:
    """The pid and internal port of the supervisor's recorder child (from ``/proc``: the
    child whose command line has ``--role recorder``), or None while there is none."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if ppid != srv.proc.pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                argv = cmd.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if "--role" in argv and argv[argv.index("--role") + 1] == "recorder":
            return int(entry), int(argv[argv.index("--recorder-port") + 1])
    return None


async def recorder_health(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/internal/health",
            timeout=aiohttp.ClientTimeout(total=2)) as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def follow(srv: Workers, request_id: str, *, want: str | None = None,
                 avoid: str | None = None, stop_after: int | None = None,
                 headers: dict[str, str] | None = None) -> tuple[str, list[Frame]]:
    """The event frames of ``GET /v1/requests/{id}/events?trace=true`` through one worker
    (its X-Worker and the frames), read to the end or dropped after ``stop_after``."""
    session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                    want=want, avoid=avoid, params={"trace": "true"},
                                    headers=headers or {})
    frames: list[Frame] = []
    async with session:
        assert resp.status == 200, await resp.text()
        worker = resp.headers["X-Worker"]
        async with contextlib.aclosing(iter_frames(resp)) as stream:
            async for frame in stream:
                if frame.data is None:
                    continue
                frames.append(frame)
                if stop_after is not None and len(frames) >= stop_after:
                    break
        resp.close()
    return worker, frames


def stored(db: Path, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


# -- 1. kill -9 of the recorder under the supervisor ---------------------------------------------
async def test_kill_9_of_the_recorder_mid_turn_under_the_supervisor_loses_and_doubles_nothing(
        tmp_path: Path) -> None:
    async with supervised(tmp_path, OFFLINE_TOKEN_DELAY_MS=20) as srv:
        first = recorder_of(srv)
        assert first is not None, srv.output()
        old_pid, port = first
        request_id, _owner = await start_turn(srv, max_tokens=300)
        session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                        params={"trace": "true"})
        frames: list[Frame] = []
        killed = False
        async with session:
            assert resp.status == 200
            async with contextlib.aclosing(iter_frames(resp)) as stream:
                async for frame in stream:
                    if frame.data is None:
                        continue
                    frames.append(frame)
                    if not killed and sum(f.event == "text" for f in frames) >= 5:
                        # Some of the turn is in the file (so the restarted recorder must
                        # take a half-recorded turn up again; fed to the store is not
                        # enough, its batch may not be written yet), then:
                        async def recorded_some() -> bool:
                            body = await recorder_health(port)
                            return bool(body["recorder"]["events_recorded"] >= 10
                                        and body["store"]["events_written"] >= 10)

                        await until(recorded_some, "the recorder recorded 10 events")
                        os.kill(old_pid, signal.SIGKILL)
                        killed = True
        assert killed
        assert_wire_rules(frames, trace=True)
        done = frames[-1].json
        assert done["type"] == "done" and done["ok"] is True, done

        async def restarted() -> tuple[int, int] | None:
            found = recorder_of(srv)
            return found if found is not None and found[0] != old_pid else None

        _new_pid, port = await until(restarted, "a new recorder")

        async def took_it_up() -> dict[str, Any] | None:
            body = (await recorder_health(port))["recorder"]
            return body if body["turns_recorded"] >= 1 else None

        stats = await until(took_it_up, "the new recorder recorded the turn")
        # It read its pending discovery entry again and resumed the half-recorded turn.
        assert stats["redelivered"] >= 1 and stats["resumed"] == 1, stats
        assert f"recorder (pid {old_pid}) died" in srv.text(), srv.output()
    # Stopped (exit 0, checked by running): the file has every event once, in order.
    db = tmp_path / "events.duckdb"
    rows = stored(db, "SELECT seq, type, data FROM events WHERE request_id = ? ORDER BY seq",
                  [request_id])
    last = int(frames[-1].id or 0)
    assert [seq for seq, _, _ in rows] == list(range(1, last + 1))
    assert [(seq, kind) for seq, kind, _ in rows] == [(f.json["seq"], f.event) for f in frames]
    assert [json.loads(data) for _, _, data in rows] == [f.json for f in frames]
    assert rows[-1][1] == "done" and json.loads(rows[-1][2])["ok"] is True
    assert stored(db, "SELECT status, last_seq FROM requests WHERE request_id = ?",
                  [request_id]) == [("completed", last)]
    text = "".join(f.json["delta"] for f in frames if f.event == "text")
    assert stored(db, "SELECT content, status FROM messages WHERE request_id = ? AND "
                      "role = 'assistant'", [request_id]) == [(text, "complete")]


# -- 2. three followers through three workers ----------------------------------------------------
async def test_three_followers_through_three_workers_see_the_same_stream(tmp_path: Path) -> None:
    async with supervised(tmp_path, workers=3, OFFLINE_TOKEN_DELAY_MS=20) as srv:
        workers = sorted(await ids_of(srv))
        assert len(workers) == 3
        request_id, owner = await start_turn(srv, max_tokens=80)
        results = await asyncio.gather(*(follow(srv, request_id, want=w) for w in workers))
        assert sorted(worker for worker, _ in results) == workers
        assert owner in workers
        streams = [frames for _, frames in results]
        for frames in streams:
            seqs = seqs_of(frames)
            assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
            assert frames[-1].event == "done" and frames[-1].json["ok"] is True
            assert_wire_rules(frames, trace=True)
        assert [f.data for f in streams[0]] == [f.data for f in streams[1]]
        assert [f.data for f in streams[0]] == [f.data for f in streams[2]]
        assert sum(f.event == "text" for f in streams[0]) >= 10


# -- 3. resume through another worker -------------------------------------------------------------
@pytest.mark.parametrize("mode", ["last_event_id", "since_seq"])
async def test_a_follower_dropped_anywhere_resumes_through_another_worker_without_gap(
        tmp_path: Path, mode: str) -> None:
    async with supervised(tmp_path, OFFLINE_TOKEN_DELAY_MS=20) as srv:
        workers = sorted(await ids_of(srv))
        # One live turn per drop point, all running at once; each follower is dropped
        # after k events on one worker and resumed on the other.
        points = [1, 5, 20]
        turns = [(await start_turn(srv, max_tokens=60))[0] for _ in points]
        cuts: list[tuple[str, list[Frame], list[Frame]]] = []
        for index, (request_id, k) in enumerate(zip(turns, points, strict=True)):
            on = workers[index % 2]
            _, head = await follow(srv, request_id, want=on, stop_after=k)
            assert len(head) == k
            cuts.append((request_id, head, await _resume(srv, request_id, head, avoid=on,
                                                         mode=mode)))
        for request_id, head, tail in cuts:
            _, whole = await follow(srv, request_id)  # a fresh replay
            assert len(whole) > 20 + 1
            _assert_joined(head, tail, whole)
        # Right before done (the stream's length known once it ended): only done is left.
        request_id = turns[0]
        _, whole = await follow(srv, request_id, want=workers[0])
        tail = await _resume(srv, request_id, whole[:-1], avoid=workers[0], mode=mode)
        assert [f.event for f in tail] == ["done"]
        _assert_joined(whole[:-1], tail, whole)


async def _resume(srv: Workers, request_id: str, head: list[Frame], *, avoid: str,
                  mode: str) -> list[Frame]:
    """The rest of the stream after ``head``'s last seq, through a worker other than
    ``avoid``, with ``Last-Event-ID`` or ``?since_seq``."""
    last = head[-1].id or "0"
    params = {"trace": "true"}
    headers: dict[str, str] = {}
    if mode == "last_event_id":
        headers["Last-Event-ID"] = last
    else:
        params["since_seq"] = last
    session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}/events",
                                    avoid=avoid, params=params, headers=headers)
    async with session:
        assert resp.status == 200, await resp.text()
        return event_frames([f async for f in iter_frames(resp)])


def _assert_joined(head: list[Frame], tail: list[Frame], whole: list[Frame]) -> None:
    joined = head + tail
    seqs = seqs_of(joined)
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
    assert [f.data for f in joined] == [f.data for f in whole]
    assert whole[-1].event == "done"


# -- 4. a finished turn through the worker that did not run it ----------------------------------
async def test_a_finished_turn_through_the_other_worker_comes_from_the_recorder(
        tmp_path: Path) -> None:
    async with supervised(tmp_path, OFFLINE_TOKEN_DELAY_MS=10, EVENT_LOG_TTL_S=2) as srv:
        request_id, owner = await start_turn(srv, max_tokens=40)
        other, live = await follow(srv, request_id, avoid=owner)
        assert live[-1].event == "done" and live[-1].json["ok"] is True
        last = int(live[-1].id or 0)
        key = f"{srv.prefix}:req:{request_id}:events"
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async def gone() -> bool:
                return not await client.exists(key)

            await until(gone, "the turn's stream expired")
        finally:
            await client.aclose()
        # Status on the non-owner: only the store (the recorder) knows it now.
        session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}", want=other)
        async with session:
            body = await resp.json()
            assert resp.status == 200, body
        assert body["status"] == "completed" and body["last_seq"] == last, body
        assert body["live"] is False and body["worker"] in (owner, None), body
        assert body["usage"]["completion_tokens"], body  # the store's row, not Redis's meta
        assert body["response"] and body["response"]["content"] == "".join(
            f.json["delta"] for f in live if f.event == "text"), body
        # Replay through the non-owner: from the store, through the recorder.
        again_on, replayed = await follow(srv, request_id, want=other)
        assert again_on == other
        assert [f.data for f in replayed] == [f.data for f in live]
        # Cancel through the non-owner: it already ended.
        session, resp = await on_worker(srv, "POST", f"/v1/requests/{request_id}/cancel",
                                        want=other)
        async with session:
            said = await resp.json()
        assert resp.status == 200 and said["cancelled"] is False, said
        assert said["status"] == "completed", said



# -- 6. the recorder's internal API answers the supervisor's children only ------------------------
async def test_the_recorders_internal_api_needs_the_key_its_supervisor_gave_the_workers(
        tmp_path: Path) -> None:
    """Any process on the machine can reach the recorder's loopback port; only a call with
    the key the supervisor made for this start (``RECORDER_TOKEN`` in its children's
    environment) reads the store. The workers have it: a turn through them is recorded and
    read back through the recorder."""
    async with supervised(tmp_path) as srv:
        found = recorder_of(srv)
        assert found is not None, srv.output()
        pid, port = found
        with open(f"/proc/{pid}/environ", "rb") as env:
            entries = dict(item.split(b"=", 1) for item in env.read().split(b"\0") if b"=" in item)
        key = entries[b"RECORDER_TOKEN"].decode()
        assert len(key) >= 32
        request_id, _ = await start_turn(srv, max_tokens=3)
        _, frames = await follow(srv, request_id)
        assert frames[-1].event == "done", frames[-1]
        query = {"sql": "SELECT count(*) FROM events WHERE request_id = ?",
                 "params": [request_id]}
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer " + "x" * len(key)}):
                async with session.post(f"http://127.0.0.1:{port}/internal/query", json=query,
                                        headers=headers) as resp:
                    assert resp.status == 401, await resp.text()
                    assert (await resp.json())["error"]["code"] == "invalid_api_key"

            async def counted() -> bool:
                async with session.post(f"http://127.0.0.1:{port}/internal/query", json=query,
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == 200, await resp.text()
                    # trace on: every event (done lands a moment after it was sent)
                    return bool(await resp.json() == [[len(frames)]])

            await until(counted, "every event of the turn read with the key")
        # and through a worker, which sends the key: the recorder's answer
        session, resp = await on_worker(srv, "GET", f"/v1/requests/{request_id}")
        async with session:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "completed"


# -- 5. POST /v1/export through either worker -----------------------------------------------------
async def test_post_export_through_either_worker_is_the_recorders_export(tmp_path: Path) -> None:
    """A worker has no file: POST /v1/export is run by the recorder, and the answer is the
    single process's report whichever worker the request reaches (one lake, one watermark
    over both); an export that fails in the recorder is a 500 with a JSON error through the
    worker, never a success."""
    lake = tmp_path / "lake"
    async with supervised(tmp_path, EXPORT_INTERVAL_S=0) as srv:  # the lake beside --db
        one, two = sorted(await ids_of(srv))

        async def export_on(worker: str) -> tuple[int, dict[str, Any]]:
            session, resp = await on_worker(srv, "POST", "/v1/export", want=worker)
            async with session:
                return resp.status, await resp.json()

        async def turn() -> list[Frame]:
            request_id, _ = await start_turn(srv, max_tokens=5)
            _, frames = await follow(srv, request_id)
            assert frames[-1].event == "done", frames[-1]
            return frames

        async def exported_on(worker: str) -> dict[str, Any] | None:
            # (a request closed within the last second waits for the next run: sinks.lake)
            status, report = await export_on(worker)
            assert status == 200, report
            return report if report["requests"] else None

        frames = await turn()
        first = await until(lambda: exported_on(one), "the turn exported through one worker")
        status, second = await export_on(two)
        assert status == 200, second
        keys = {"lake", "files", "rows", "requests", "watermark", "previous_watermark",
                "elapsed_ms"}
        assert set(first) == set(second) == keys
        assert first["lake"] == second["lake"] == str(lake.resolve())
        assert first["requests"] == 1 and first["rows"]["events"] == len(frames), first
        assert all((lake / f["path"]).is_file() for f in first["files"]) and first["files"]
        assert second["requests"] == 0 and second["files"] == [], second
        assert second["previous_watermark"] >= first["watermark"], (first, second)
        session, resp = await on_worker(srv, "GET", "/v1/export", want=two)
        async with session:
            manifest = await resp.json()
        assert resp.status == 200 and manifest["lake"] == first["lake"], manifest
        assert {f["path"] for f in first["files"]} <= {f["path"] for f in manifest["files"]}

        await turn()  # closed now: in the next run, through the other worker
        third = await until(lambda: exported_on(two), "the next turn exported through two")
        assert third["requests"] == 1 and third["previous_watermark"] >= first["watermark"]

        shutil.rmtree(lake)
        lake.write_text("no longer a folder")  # the recorder's export fails now
        status, failed = await export_on(one)
        assert status == 500 and failed["error"]["code"] == "export_failed", failed
        assert failed["error"]["type"] == "server_error"

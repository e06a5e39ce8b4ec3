"""Durable streams in-process (issue 4): replay, resume, fan-out, slow clients, heartbeat,
cancel, status and start-up recovery, over pytest-aiohttp's ``aiohttp_client``.

Every comparison is of whole frame lists, ``(id, event, data)`` per frame. Waits are bounded
polls or events set by a reader, never sleeps that a result depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import api.native
import server
from api.cluster import WORKER_ID
from core.config import Settings
from core.errors import BufferOverflowError
from core.events import (
    Done,
    EventBase,
    LlmCall,
    Memory,
    RequestReceived,
    Route,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
)
from core.turn import ChatMessage, TurnInput
from pipeline.offline_model import compose_answer
from sinks.recovery import INTERRUPTED_ERROR
from sinks.recovery import SEQ_GAP as GAP
from sinks.store import EventStore, MessageRow, RequestRow, ToolExecutionRow
from tests.sse_client import (
    Frame,
    after,
    assert_wire_rules,
    cut_off_comments,
    event_frames,
    events_of,
    frame_keys,
    iter_frames,
    parse_sse,
    read_frames,
)

MODEL = "offline"
ClientFactory = Callable[[web.Application], Awaitable[TestClient]]
WAIT_S = 10.0  # upper bound of every wait; never reached when things work


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "db_path": tmp_path / "events.duckdb", "offline_token_delay_ms": 1,
        "flush_interval_ms": 20,
    }
    options.update(overrides)
    return Settings(**options)


async def start(aiohttp_client: ClientFactory, tmp_path: Path, **overrides: Any) -> TestClient:
    return await aiohttp_client(server.create_app(make_settings(tmp_path, **overrides)))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def answer(messages: list[dict[str, str]], *, max_tokens: int | None = None) -> str:
    return "".join(compose_answer(MODEL, messages, max_tokens=max_tokens))


def text_of(frames: list[Frame]) -> str:
    return "".join(e["delta"] for e in events_of(frames) if e["type"] == "text")


def events_url(request_id: str) -> str:
    return f"/v1/requests/{request_id}/events"


async def orchestrate(client: TestClient, body: dict[str, Any]) -> tuple[str, list[Frame]]:
    async with client.post("/v1/orchestrate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Request-Id"], await read_frames(resp)


async def background(client: TestClient, body: dict[str, Any]) -> str:
    async with client.post("/v1/orchestrate", json={**body, "background": True}) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.content_type == "application/json"
        answer_body = await resp.json()
    request_id = answer_body["request_id"]
    assert answer_body["status"] == "running"
    assert answer_body["events_url"] == events_url(request_id)
    assert resp.headers["X-Request-Id"] == request_id
    assert answer_body["conversation_id"] == resp.headers["X-Conversation-Id"]
    return str(request_id)


async def replay(
    client: TestClient, request_id: str, *, params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> list[Frame]:
    """The frames of ``GET /v1/requests/{id}/events``; ``[]`` for ``204 No Content``, the
    answer to a cursor at or past the end of a finished request."""
    async with client.get(events_url(request_id), params=params, headers=headers) as resp:
        assert resp.headers["X-Request-Id"] == request_id
        if resp.status == 204:
            assert await resp.read() == b""
            return []
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await read_frames(resp)


async def get_json(client: TestClient, path: str, *, status: int = 200) -> Any:
    async with client.get(path) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


async def post_json(client: TestClient, path: str, *, status: int = 200) -> Any:
    async with client.post(path) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


def assert_json_error(body: Any, *, code: str, param: str | None = None) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == "invalid_request_error", error
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"not within {WAIT_S}s: {what}"
        await asyncio.sleep(0.01)


async def wait_for(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), WAIT_S)
    except TimeoutError:
        pytest.fail(f"not within {WAIT_S}s: {what}")


async def health(client: TestClient) -> dict[str, Any]:
    body: dict[str, Any] = await get_json(client, "/healthz")
    return body


class Follower:
    """Follows a request from the start without interruption, recording every frame."""

    def __init__(self, client: TestClient, request_id: str, *, trace: bool = False) -> None:
        self.frames: list[Frame] = []
        self.texts = 0
        self.last_seq = 0
        self._marks: list[tuple[Callable[[Follower], bool], asyncio.Event]] = []
        self.task = asyncio.create_task(self._run(client, request_id, trace))

    def mark(self, condition: Callable[[Follower], bool]) -> asyncio.Event:
        """An event set once ``condition(self)`` holds."""
        event = asyncio.Event()
        if condition(self):
            event.set()
        else:
            self._marks.append((condition, event))
        return event

    async def _run(self, client: TestClient, request_id: str, trace: bool) -> list[Frame]:
        params = {"trace": "true"} if trace else None
        async with client.get(events_url(request_id), params=params) as resp:
            assert resp.status == 200, await resp.text()
            async with contextlib.aclosing(iter_frames(resp)) as frames:
                async for frame in frames:
                    self.frames.append(frame)
                    if frame.data is not None:
                        self.last_seq = int(frame.id or 0)
                        self.texts += frame.event == "text"
                    for condition, event in self._marks:
                        if not event.is_set() and condition(self):
                            event.set()
        return self.frames

    async def until(self, condition: Callable[[Follower], bool], what: str) -> None:
        """Wait (bounded) until ``condition(self)``; a follower that fails or ends first
        fails the test with its own error rather than a timeout."""
        reached = asyncio.create_task(self.mark(condition).wait())
        try:
            done, _ = await asyncio.wait({reached, self.task}, timeout=WAIT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            reached.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reached
        if reached in done or (self.task in done and condition(self)):
            return
        if self.task in done:
            self.task.result()  # raises the follower's error, if any
            pytest.fail(f"the stream ended before: {what}")
        pytest.fail(f"not within {WAIT_S}s: {what}")

    async def result(self) -> list[Frame]:
        return await asyncio.wait_for(self.task, WAIT_S * 2)


Cut = int | str  # drop after this many event frames, or right after a frame of this type


async def follow_with_drops(
    client: TestClient, request_id: str, cuts: list[Cut], *, trace: bool = False,
) -> tuple[list[Frame], list[bool]]:
    """Follow a request, dropping the connection at each cut and resuming from the last id.

    Resumes alternate between ``Last-Event-ID`` (as EventSource does) and ``since_seq``.
    Returns the event frames seen, in order, and for each reconnect whether the turn was
    still live then.
    """
    seen: list[Frame] = []
    live_at_reconnect: list[bool] = []
    last: str | None = None
    for segment in itertools.count():
        cut = cuts[segment] if segment < len(cuts) else None
        params = {"trace": "true"} if trace else {}
        headers = {}
        if last is not None:
            live_at_reconnect.append(request_id in client.app[server.ORCHESTRATOR].live)
            if segment % 2:
                headers["Last-Event-ID"] = last
            else:
                params["since_seq"] = last
        resp = await client.get(events_url(request_id), params=params, headers=headers)
        try:
            assert resp.status == 200, await resp.text()
            taken = 0
            if cut == 0:
                continue
            async with contextlib.aclosing(iter_frames(resp)) as frames:
                async for frame in frames:
                    if frame.data is None:
                        continue
                    seen.append(frame)
                    last = frame.id
                    taken += 1
                    if frame.event == "done":
                        return seen, live_at_reconnect
                    if cut == taken or cut == frame.event:
                        break
                else:
                    pytest.fail(f"segment {segment} ended without done and without a cut")
        finally:
            resp.close()
    raise AssertionError("unreachable")


# -- replay of a finished request -----------------------------------------------------------
@pytest.mark.parametrize("trace", [False, True])
async def test_replay_of_a_finished_request_is_the_original_stream(
    aiohttp_client: ClientFactory, tmp_path: Path, trace: bool
) -> None:
    client = await start(aiohttp_client, tmp_path)
    request_id, original = await orchestrate(
        client, {"messages": [user("Replay me exactly.")], "trace": trace}
    )
    events = assert_wire_rules(original, trace=trace)
    last = events[-1]["seq"]
    flag = {"trace": "true" if trace else "false"}

    assert frame_keys(await replay(client, request_id, params=flag)) == frame_keys(original)
    assert frame_keys(
        await replay(client, request_id, params={**flag, "since_seq": "0"})
    ) == frame_keys(original)
    assert frame_keys(
        await replay(client, request_id, params=flag, headers={"Last-Event-ID": "0"})
    ) == frame_keys(original)

    # Every cursor, hidden trace seqs and the end included: exactly the frames with id > N.
    for cursor in range(last + 2):
        expected = frame_keys(after(original, cursor))
        by_query = await replay(client, request_id, params={**flag, "since_seq": str(cursor)})
        assert frame_keys(by_query) == expected, f"since_seq={cursor}"
        by_header = await replay(
            client, request_id, params=flag, headers={"Last-Event-ID": str(cursor)}
        )
        assert frame_keys(by_header) == expected, f"Last-Event-ID: {cursor}"

    if not trace:  # the same request with trace on shows every stored event, seqs 1..N
        traced = assert_wire_rules(await replay(client, request_id, params={"trace": "true"}),
                                   trace=True)
        assert [e for e in traced if e["type"] not in ("llm_call", "route", "memory")] == events


async def test_the_larger_cursor_wins(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Both cursors given: the larger is used. An EventSource built on ``…?since_seq=0``
    keeps that URL and sends its progress as ``Last-Event-ID`` when it reconnects; it must
    not get the whole stream again. An empty value is no cursor."""
    client = await start(aiohttp_client, tmp_path)
    request_id, original = await orchestrate(client, {"messages": [user("Two cursors.")]})
    assert_wire_rules(original, trace=False)
    for query, header in (("5", "10"), ("10", "5"), ("0", "8"), ("", "8"), ("7", "")):
        frames = await replay(
            client, request_id, params={"since_seq": query}, headers={"Last-Event-ID": header}
        )
        cursor = max(int(query or 0), int(header or 0))
        assert frame_keys(frames) == frame_keys(after(original, cursor)), (query, header)
    # An empty header is "no cursor".
    frames = await replay(client, request_id, headers={"Last-Event-ID": ""})
    assert frame_keys(frames) == frame_keys(original)


async def test_replay_errors_are_json(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    request_id, _ = await orchestrate(client, {"messages": [user("Errors, please.")]})

    body = await get_json(client, events_url("req_does_not_exist"), status=404)
    assert_json_error(body, code="request_not_found")
    body = await get_json(client, events_url("req_does_not_exist") + "?since_seq=3", status=404)
    assert_json_error(body, code="request_not_found")

    for bad in ("-1", "abc", "1.5", "+3", "0x10", "1e3", " ", "-0"):
        async with client.get(events_url(request_id), params={"since_seq": bad}) as resp:
            assert resp.status == 400, (bad, await resp.text())
            assert resp.content_type == "application/json"
            assert_json_error(await resp.json(), code="invalid_cursor", param="since_seq")
        if not bad.strip():
            continue  # HTTP trims header values: a blank Last-Event-ID is no cursor
        async with client.get(events_url(request_id), headers={"Last-Event-ID": bad}) as resp:
            assert resp.status == 400, (bad, await resp.text())
            assert resp.content_type == "application/json"
            assert_json_error(await resp.json(), code="invalid_cursor", param="Last-Event-ID")
    for bad in ("maybe", "yes", "2", ""):
        async with client.get(events_url(request_id), params={"trace": bad}) as resp:
            assert resp.status == 400, (bad, await resp.text())
            assert_json_error(await resp.json(), code="invalid_query", param="trace")

    # A cursor at or past the end of a finished request: 204, so EventSource stops.
    done_seq = int(event_frames(await replay(client, request_id))[-1].id or 0)
    for cursor in (done_seq, done_seq + 1, 10**18 - 1):  # more than 18 digits: 400
        for options in ({"params": {"since_seq": str(cursor)}},
                        {"headers": {"Last-Event-ID": str(cursor)}}):
            async with client.get(events_url(request_id), **options) as resp:
                assert resp.status == 204, (cursor, options)
                assert await resp.read() == b""
    frames = await replay(client, request_id, params={"since_seq": str(done_seq - 1)})
    assert [f.event for f in event_frames(frames)] == ["done"]


# -- resume of a running request ----------------------------------------------------------
@pytest.mark.parametrize("trace", [False, True])
async def test_resume_at_random_points_of_a_running_turn(
    aiohttp_client: ClientFactory, tmp_path: Path, trace: bool
) -> None:
    client = await start(aiohttp_client, tmp_path, offline_token_delay_ms=3)
    messages = [user("A long turn to drop out of.")]
    request_id = await background(client, {"messages": messages, "max_tokens": 300,
                                           "trace": trace})
    uninterrupted = Follower(client, request_id, trace=trace)

    rng = random.Random(4_2024 + trace)
    # After 1 frame, at once without reading, 18 random points (at most 217 frames in all,
    # of about 305), then right after stream_end, the frame before done.
    cuts: list[Cut] = [1, 0, *(rng.randint(1, 12) for _ in range(18)), "stream_end"]
    pieces, live_at_reconnect = await follow_with_drops(client, request_id, cuts, trace=trace)

    full = await uninterrupted.result()
    assert len(live_at_reconnect) == len(cuts) == 21
    assert live_at_reconnect[0], "the first resume should have found the turn running"
    assert frame_keys(pieces) == frame_keys(full)
    events = assert_wire_rules(pieces, trace=trace)
    assert events[-1]["reason"] == "completed"
    assert text_of(pieces) == answer(messages, max_tokens=300)
    # And the store agrees with both once the turn is over.
    flag = {"trace": "true" if trace else "false"}
    assert frame_keys(await replay(client, request_id, params=flag)) == frame_keys(full)


async def test_three_concurrent_followers_see_identical_streams(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, offline_token_delay_ms=2)
    request_id = await background(client, {"messages": [user("Fan me out.")], "max_tokens": 150})
    first = Follower(client, request_id)
    second = Follower(client, request_id)
    await first.until(lambda f: f.texts >= 20, "first follower reads 20 texts")
    third = Follower(client, request_id)  # joins late: gets the history, then live
    streams = [await first.result(), await second.result(), await third.result()]

    assert frame_keys(streams[0]) == frame_keys(streams[1]) == frame_keys(streams[2])
    assert_wire_rules(streams[0], trace=False)
    assert frame_keys(await replay(client, request_id)) == frame_keys(streams[0])
    assert (await health(client))["clients"] == {"open": 0, "cut_off": 0}


# -- slow clients ----------------------------------------------------------------------------
async def test_turn_cuts_loose_a_slow_consumer_and_not_the_fast_one(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """At the Turn level: a consumer that stops pulling overflows its bounded buffer and gets
    BufferOverflowError after what was buffered; the other consumer and the turn go on."""
    client = await start(aiohttp_client, tmp_path)
    orchestrator = client.app[server.ORCHESTRATOR]
    turn = orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content="Slow.")],
                                      max_tokens=120, trace=True, model=MODEL))
    slow = turn.events(trace=True, max_buffer=8)
    allowance = 8 + turn.last_seq  # history at subscription does not count (Turn.view)
    slow_got = [await anext(slow)]  # subscribes now

    fast_got: list[EventBase] = []
    far_enough = asyncio.Event()

    async def fast_consumer() -> None:
        async with contextlib.aclosing(turn.events(trace=True)) as events:
            async for event in events:
                fast_got.append(event)
                if event.seq >= allowance + 20:
                    far_enough.set()

    fast = asyncio.create_task(fast_consumer())
    await wait_for(far_enough, "fast consumer 20 events past the slow one's allowance")
    # The slow one's subscription was dropped at the overflow, before it came back to read.
    assert turn.subscribers == 2  # the recorder and the fast consumer
    with pytest.raises(BufferOverflowError) as raised:
        async with contextlib.aclosing(slow) as rest:
            async for event in rest:
                slow_got.append(event)
    assert raised.value.max_buffer == 8  # the lag allowed; the history came on top

    await asyncio.wait_for(fast, WAIT_S)
    result = await asyncio.wait_for(turn.result, WAIT_S)
    assert result.status == "completed"
    assert [e.seq for e in fast_got] == list(range(1, result.last_seq + 1))
    assert isinstance(fast_got[-1], Done)
    # What the slow one got is exactly the start of the fast one's stream, then the cut.
    assert slow_got == fast_got[: len(slow_got)]
    assert len(slow_got) == 1 + allowance


async def test_a_view_iterated_late_still_gets_its_history(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    turn = client.app[server.ORCHESTRATOR].run(TurnInput(
        messages=[ChatMessage(role="user", content="Late view.")], max_tokens=60, trace=True,
        model=MODEL,
    ))
    late = turn.events(trace=True, max_buffer=8)  # created now, iterated below
    reached = asyncio.Event()

    async def watch() -> None:
        async with contextlib.aclosing(turn.events(trace=True)) as events:
            async for event in events:
                if event.seq >= 30:
                    reached.set()

    watcher = asyncio.create_task(watch())
    await wait_for(reached, "the turn reaches seq 30")
    async with contextlib.aclosing(late) as events:
        got = [event.seq async for event in events]
    await asyncio.wait_for(watcher, WAIT_S)
    assert got == list(range(1, (await turn.result).last_seq + 1))


class StalledClient:
    """Makes one SSE client's server-side writer stop pulling events, as a blocked socket
    write would.

    Over loopback a slow HTTP reader does not block the server's writes: the kernel and
    transport buffers took 480 KB (3,000 frames) from a reader with a 1 KB receive buffer
    without a write waiting, so the server's bounded per-client buffer never filled. So the
    events of the next ``api.native.stream_native`` call after :meth:`arm` are wrapped:
    after the first event it stops pulling from the client's bounded iterator until
    :attr:`release` is set, exactly as if ``await response.write(...)`` had blocked. The rest
    (overflow, final comment, disconnect, resume) is the server's own code.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = asyncio.Event()
        self._armed = False
        real = api.native.stream_native

        async def stream_native(
            request: web.Request, events: AsyncGenerator[Any], **options: Any
        ) -> web.StreamResponse:
            if self._armed:
                self._armed = False
                events = self._stall(events)
            return await real(request, events, **options)

        monkeypatch.setattr(api.native, "stream_native", stream_native)

    def arm(self) -> None:
        self._armed = True

    async def _stall(self, beats: AsyncGenerator[Any]) -> AsyncGenerator[Any]:
        async with contextlib.aclosing(beats) as items:
            stalled = False
            async for item in items:
                yield item
                if item is not None and not stalled:
                    stalled = True
                    await self.release.wait()


async def test_slow_http_client_is_cut_off_and_resumes_without_loss(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stall = StalledClient(monkeypatch)
    client = await start(aiohttp_client, tmp_path, client_buffer_events=8,
                         offline_token_delay_ms=2)
    messages = [user("Leave the slow one behind.")]
    request_id = await background(client, {"messages": messages, "max_tokens": 300})

    stall.arm()
    slow = await client.get(events_url(request_id))
    assert slow.status == 200
    slow_frames: list[Frame] = []
    slow_iter = iter_frames(slow)
    async for frame in slow_iter:  # up to its first event: its writer is now stalled
        slow_frames.append(frame)
        if frame.data is not None:
            break
    status = await get_json(client, f"/v1/requests/{request_id}")
    bound = 8 + status["last_seq"]  # at least the slow client's allowance

    fast = Follower(client, request_id)
    await fast.until(lambda f: f.last_seq >= bound + 20, "fast follower far ahead")
    stall.release.set()
    async with contextlib.aclosing(slow_iter) as rest:
        slow_frames += [frame async for frame in rest]
    slow.close()

    comments = cut_off_comments(slow_frames)
    assert len(comments) == 1 and "behind" in comments[0], slow_frames[-3:]
    assert slow_frames[-1].comments == comments and slow_frames[-1].data is None
    seen = event_frames(slow_frames)
    assert seen[-1].event != "done"
    assert (await health(client))["clients"]["cut_off"] == 1

    resumed = await replay(client, request_id, headers={"Last-Event-ID": seen[-1].id or ""})
    full = await fast.result()
    assert frame_keys(seen + resumed) == frame_keys(full)
    assert_wire_rules(full, trace=False)
    assert text_of(full) == answer(messages, max_tokens=300)
    assert (await health(client))["clients"] == {"open": 0, "cut_off": 1}


async def test_bursty_producer_reconnect_loop_loses_nothing(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """A tiny client buffer and a model with no token delay: the producer comes in bursts
    that may overflow any client. An EventSource-like loop (reconnect with the last id
    whenever the stream ends without ``done``) ends with exactly the stored stream. How
    often it is cut off depends on scheduling, so only its correctness is asserted."""
    client = await start(aiohttp_client, tmp_path, client_buffer_events=8,
                         offline_token_delay_ms=0)
    messages = [user("Burst.")]
    request_id = await background(client, {"messages": messages, "max_tokens": 500})
    seen: list[Frame] = []
    cut_offs = 0
    for _ in range(1000):
        headers = {"Last-Event-ID": seen[-1].id or ""} if seen else {}
        frames = await replay(client, request_id, headers=headers)
        seen += event_frames(frames)
        if seen and seen[-1].event == "done":
            assert not cut_off_comments(frames)
            break
        assert len(cut_off_comments(frames)) == 1, frames[-3:]
        cut_offs += 1
    else:
        pytest.fail("no done after 1000 reconnects")
    assert frame_keys(seen) == frame_keys(await replay(client, request_id))
    assert_wire_rules(seen, trace=False)
    assert text_of(seen) == answer(messages, max_tokens=500)
    assert (await health(client))["clients"] == {"open": 0, "cut_off": cut_offs}


# -- heartbeat and reconnect advice -------------------------------------------------------
def assert_heartbeats(frames: list[Frame], *, retry_ms: int) -> None:
    """A ``: stream open`` comment first, ``retry:`` in the first event's block (never
    alone); a keep-alive comment before the first text and between texts."""
    assert frames[0].comments == ["stream open"] and frames[0].data is None, frames[0]
    assert frames[0].retry is None, frames[0]
    assert frames[1].retry == retry_ms and frames[1].event == "request_received", frames[1]
    assert [f.retry for f in frames[2:] if f.retry is not None] == [], "retry: sent once"
    kinds = ["beat" if f.data is None and "keep-alive" in f.comments else f.event
             for f in frames]
    first_text = kinds.index("text")
    assert "beat" in kinds[kinds.index("stream_start"):first_text], kinds
    texts = [i for i, kind in enumerate(kinds) if kind == "text"]
    assert len(texts) >= 3, kinds
    for a, b in itertools.pairwise(texts):
        assert "beat" in kinds[a:b], kinds
    assert_wire_rules(frames, trace=False)


async def test_heartbeat_and_retry_advice_on_native_streams(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, heartbeat_s=0.03, offline_token_delay_ms=150,
                         sse_retry_ms=1234)
    body = {"messages": [user("Slowly.")], "max_tokens": 3}

    async def streamed() -> bytes:
        async with client.post("/v1/orchestrate", json=body) as resp:
            assert resp.status == 200
            return await resp.read()

    async def followed() -> bytes:
        request_id = await background(client, body)
        async with client.get(events_url(request_id)) as resp:
            assert resp.status == 200
            return await resp.read()

    async def chat() -> bytes:
        async with client.post("/v1/chat/completions",
                               json={"model": MODEL, "stream": True, **body}) as resp:
            assert resp.status == 200
            return await resp.read()

    native, replayed, openai_raw = await asyncio.gather(streamed(), followed(), chat())
    for raw in (native, replayed):
        assert raw.startswith(b": stream open\n\nretry: 1234\nid: 1\nevent: request_received\n"), raw[:60]
        assert_heartbeats(parse_sse(raw), retry_ms=1234)
    # The OpenAI-compatible stream stays data-only, heartbeat or not (field notes).
    assert all(line == "" or line.startswith("data: ") for line in openai_raw.decode().split("\n"))


# -- cancel and status -----------------------------------------------------------------------
def assert_message(message: dict[str, Any], **expected: Any) -> None:
    assert {k: message[k] for k in expected} == expected, message


async def test_status_and_cancel_of_a_running_turn(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, offline_token_delay_ms=3)
    messages = [user("Go on until stopped.")]
    request_id = await background(client, {"messages": messages, "max_tokens": 2000})
    follower = Follower(client, request_id)
    await follower.until(lambda f: f.texts >= 5, "five text frames")

    running = await get_json(client, f"/v1/requests/{request_id}")
    assert request_id in (running.get("request_id"), running.get("response_id")), running
    assert running["status"] == "running" and running["live"] is True
    assert running["last_seq"] >= follower.last_seq
    assert running["model"] == MODEL and running["error"] is None
    assert running["usage"] == {"prompt_tokens": None, "completion_tokens": None,
                                "total_tokens": None}
    assert running["timings"]["started_at"] and running["timings"]["finished_at"] is None
    assert running["timings"]["duration_ms"] is None
    assert len(running["request"]) == 1
    assert_message(running["request"][0], role="user", content=messages[0]["content"],
                   status="complete")
    assert_message(running["response"], role="assistant", status="streaming")

    cancelled = await post_json(client, f"/v1/requests/{request_id}/cancel")
    frames = await follower.result()
    events = assert_wire_rules(frames, trace=False)
    done = events[-1]
    assert cancelled.pop("worker") == client.app[WORKER_ID]  # issue 13: who cancelled it
    assert cancelled == {"request_id": request_id, "cancelled": True, "status": "cancelled",
                         "last_seq": done["seq"]}
    assert done["ok"] is False and done["reason"] == "cancelled"
    (end,) = [e for e in events if e["type"] == "stream_end"]
    assert end["status"] == "cancelled"
    partial = text_of(frames)
    full = answer(messages, max_tokens=2000)
    assert partial and full.startswith(partial) and len(partial) < len(full)

    after_cancel = await get_json(client, f"/v1/requests/{request_id}")
    assert after_cancel["status"] == "cancelled" and after_cancel["live"] is False
    assert after_cancel["last_seq"] == done["seq"]
    assert_message(after_cancel["response"], role="assistant", status="cancelled",
                   content=partial)
    assert frame_keys(await replay(client, request_id)) == frame_keys(frames)

    offline = client.app[server.OFFLINE].stats

    async def model_saw_disconnect() -> bool:
        return offline.disconnected == 1

    await eventually(model_saw_disconnect, "the offline model sees the closed stream")
    assert offline.completed == 0

    again = await post_json(client, f"/v1/requests/{request_id}/cancel")
    assert again["cancelled"] is False and again["status"] == "cancelled"
    assert again["request_id"] == request_id
    assert "already ended" in again["message"] and "cancelled" in again["message"]
    assert frame_keys(await replay(client, request_id)) == frame_keys(frames)  # unchanged

    unknown = await post_json(client, "/v1/requests/req_nope/cancel", status=404)
    assert_json_error(unknown, code="request_not_found")
    assert_json_error(await get_json(client, "/v1/requests/req_nope", status=404),
                      code="request_not_found")
    body = await health(client)
    assert body["live_turns"] == 0 and body["clients"]["open"] == 0


async def test_status_of_a_finished_request(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, user("Status, please.")]
    request_id, frames = await orchestrate(client, {"messages": messages})
    events = assert_wire_rules(frames, trace=False)
    (usage,) = [e for e in events if e["type"] == "token_usage"]
    done = events[-1]

    body = await get_json(client, f"/v1/requests/{request_id}")
    assert request_id in (body.get("request_id"), body.get("response_id")), body
    assert events[0]["conversation_id"] in (body.get("conversation_id"), body.get("session_id"))
    assert body["status"] == "completed" and body["live"] is False
    assert body["last_seq"] == done["seq"] and body["model"] == MODEL and body["error"] is None
    assert body["usage"] == {k: usage[k] for k in
                             ("prompt_tokens", "completion_tokens", "total_tokens")}
    timings = body["timings"]
    assert timings["duration_ms"] == done["duration_ms"]
    assert timings["first_token_ms"] is not None
    assert 0 <= timings["first_token_ms"] <= timings["duration_ms"]
    assert timings["started_at"] <= timings["finished_at"]  # ISO-8601 strings, same zone
    assert [(m["role"], m["content"], m["status"]) for m in body["request"]] == [
        (m["role"], m["content"], "complete") for m in messages
    ]
    assert_message(body["response"], role="assistant", content=text_of(frames),
                   status="complete", request_id=request_id)


# -- start-up recovery -------------------------------------------------------------------------
def numbered(request_id: str, seq: int, event: EventBase) -> EventBase:
    event.request_id = request_id
    event.seq = seq
    return event


def write_crashed_store(path: Path) -> dict[str, list[EventBase]]:
    """A store as a killed server leaves it: two requests ``running`` mid-stream, one done."""
    now = time.time()
    conv = "conv_crashed"
    specs: dict[str, tuple[str, list[tuple[EventBase, str | None, int | None]]]] = {
        "req_mid_stream": ("running", [
            (RequestReceived(agent="assistant", conversation_id=conv), "assistant", None),
            (Route(route="respond"), None, None),
            (Memory(messages_loaded=0), None, None),
            (StreamStart(stream_id=1, agent="assistant", depth=0), "assistant", 0),
            (LlmCall(stream_id=1, model=MODEL, messages=[user("Crash here.")]), "assistant", 0),
            (Text(stream_id=1, delta="Half"), "assistant", 0),
            (Text(stream_id=1, delta=" an answer"), "assistant", 0),
            (StreamStart(stream_id=2, agent="helper", depth=1, parent_stream_id=1), "helper", 1),
            (Text(stream_id=2, delta="aside"), "helper", 1),
        ]),
        "req_just_started": ("running", [
            (RequestReceived(agent="assistant", conversation_id=conv), "assistant", None),
            (Route(route="respond"), None, None),
        ]),
        "req_finished": ("completed", [
            (RequestReceived(agent="assistant", conversation_id=conv), "assistant", None),
            (StreamStart(stream_id=1, agent="assistant", depth=0), "assistant", 0),
            (Text(stream_id=1, delta="Whole."), "assistant", 0),
            (TokenUsage(stream_id=1, model=MODEL, prompt_tokens=3, completion_tokens=1,
                        total_tokens=4), "assistant", 0),
            (StreamEnd(stream_id=1, status="ok", finish_reason="stop"), "assistant", 0),
            (Done(ok=True, duration_ms=12.5, reason="completed"), None, None),
        ]),
    }
    stored: dict[str, list[EventBase]] = {}
    with EventStore(path) as store:
        for request_id, (status, events) in specs.items():
            finished = status == "completed"
            store.put_request(RequestRow(
                request_id=request_id, conversation_id=conv, kind="orchestrate", status=status,
                started_at=now, model=MODEL, finished_at=now if finished else None,
                last_seq=len(events) if finished else None,
            ))
            store.put_message(MessageRow(
                message_id=f"{request_id}:0", conversation_id=conv, request_id=request_id,
                ordinal=0, role="user", content="Crash here.", status="complete",
                created_at=now, updated_at=now,
            ))
            store.put_message(MessageRow(
                message_id=f"{request_id}:assistant", conversation_id=conv,
                request_id=request_id, ordinal=1, role="assistant",
                content="Whole." if finished else "",
                status="complete" if finished else "streaming", created_at=now, updated_at=now,
            ))
            stored[request_id] = []
            for seq, (event, agent, depth) in enumerate(events, start=1):
                store.append_event(numbered(request_id, seq, event), agent=agent, depth=depth)
                stored[request_id].append(event)
    return stored


def as_json(events: list[EventBase]) -> list[dict[str, Any]]:
    return [json.loads(e.model_dump_json()) for e in events]


async def test_startup_closes_interrupted_requests(tmp_path: Path) -> None:
    path = tmp_path / "crashed.duckdb"
    stored = write_crashed_store(path)
    settings = make_settings(tmp_path, db_path=path)

    async with TestClient(TestServer(server.create_app(settings))) as client:
        frames = await replay(client, "req_mid_stream", params={"trace": "true"})
        events = assert_wire_rules(frames, trace=True)
        kept = len(stored["req_mid_stream"])
        assert events[:kept] == as_json(stored["req_mid_stream"])
        closing = [{k: v for k, v in e.items() if k not in ("request_id", "ts")}
                   for e in events[kept:]]
        error_text = closing[2].get("error")
        assert isinstance(error_text, str) and "interrupted" in error_text
        assert closing == [
            {"seq": 9 + GAP + 1, "type": "stream_end", "stream_id": 2, "status": "error",
             "finish_reason": None},
            {"seq": 9 + GAP + 2, "type": "stream_end", "stream_id": 1, "status": "error",
             "finish_reason": None},
            {"seq": 9 + GAP + 3, "type": "turn_error", "stream_id": None, "error": error_text,
             "retryable": True},
            {"seq": 9 + GAP + 4, "type": "done", "ok": False, "duration_ms": 0.0,
             "reason": "interrupted"},
        ]
        public = await replay(client, "req_mid_stream")
        assert_wire_rules(public, trace=False)
        assert frame_keys(public) == [
            key for key, frame in zip(frame_keys(frames), event_frames(frames), strict=True)
            if frame.event not in ("route", "memory", "llm_call")
        ]
        # A follower that had seen the last stored event gets exactly the closing frames.
        resumed = await replay(client, "req_mid_stream", params={"trace": "true"},
                               headers={"Last-Event-ID": str(kept)})
        assert frame_keys(resumed) == frame_keys(frames)[kept:]

        body = await get_json(client, "/v1/requests/req_mid_stream")
        assert body["status"] == "interrupted" and body["live"] is False
        assert body["last_seq"] == 9 + GAP + 4 and body["error"] == error_text
        assert_message(body["response"], role="assistant", status="interrupted",
                       content="Half an answer")  # depth-0 text only

        short = await replay(client, "req_just_started", params={"trace": "true"})
        short_events = assert_wire_rules(short, trace=True)
        assert [(e["type"], e["seq"]) for e in short_events] == [
            ("request_received", 1), ("route", 2), ("turn_error", 2 + GAP + 1),
            ("done", 2 + GAP + 2)]
        assert short_events[-1]["reason"] == "interrupted"

        finished = await replay(client, "req_finished")
        assert events_of(finished) == as_json(stored["req_finished"])
        assert (await get_json(client, "/v1/requests/req_finished"))["status"] == "completed"
        first_run = {rid: frame_keys(await replay(client, rid, params={"trace": "true"}))
                     for rid in stored}

    # A second start on the same file changes nothing: recovery ran once.
    async with TestClient(TestServer(server.create_app(settings))) as client:
        for request_id, keys in first_run.items():
            again = await replay(client, request_id, params={"trace": "true"})
            assert frame_keys(again) == keys, request_id


async def test_recovery_of_a_request_without_stored_events_keeps_the_wire_rules(
    tmp_path: Path,
) -> None:
    path = tmp_path / "crashed.duckdb"
    now = time.time()
    with EventStore(path) as store:
        store.put_request(RequestRow(request_id="req_empty", conversation_id="conv_e",
                                     kind="orchestrate", status="running", started_at=now))
    async with TestClient(TestServer(server.create_app(make_settings(tmp_path, db_path=path)))) as c:
        frames = await replay(c, "req_empty")
        events = assert_wire_rules(frames, trace=False)
        assert events[-1]["reason"] == "interrupted"


async def test_recovery_when_a_client_saw_more_than_was_stored(tmp_path: Path) -> None:
    path = tmp_path / "crashed.duckdb"
    request_id, conv, now = "req_ahead", "conv_ahead", time.time()
    sent: list[EventBase] = [
        RequestReceived(agent="assistant", conversation_id=conv),
        StreamStart(stream_id=1, agent="assistant", depth=0),
        *(Text(stream_id=1, delta=f" word{i}") for i in range(28)),
    ]  # seqs 1..30 went to the client; the store got 1..12 before the kill
    for seq, event in enumerate(sent, start=1):
        numbered(request_id, seq, event)
    with EventStore(path) as store:
        store.put_request(RequestRow(request_id=request_id, conversation_id=conv,
                                     kind="orchestrate", status="running", started_at=now))
        for event in sent[:12]:
            store.append_event(event, agent="assistant", depth=0)
    seen = [Frame(id=str(e.seq), event=getattr(e, "type"), data=e.model_dump_json())  # noqa: B009
            for e in sent]

    async with TestClient(TestServer(server.create_app(make_settings(tmp_path, db_path=path)))) as c:
        assert_wire_rules(await replay(c, request_id), trace=False)  # from 0 it is well-formed
        rest = await replay(c, request_id, headers={"Last-Event-ID": "30"})
        events = assert_wire_rules(seen + rest, trace=False)
        assert events[-1]["reason"] == "interrupted"



async def test_recovery_interrupts_running_tool_executions(tmp_path: Path) -> None:
    """A tool call the stop left running ends ``interrupted`` with the request."""
    path = tmp_path / "crashed_tools.duckdb"
    request_id, conv, now = "req_tool", "conv_tool", time.time()
    events: list[EventBase] = [
        RequestReceived(agent="assistant", conversation_id=conv),
        StreamStart(stream_id=1, agent="assistant", depth=0),
        ToolCall(stream_id=1, tool="fs.read", execution_id="exe_1", params={"path": "a"}),
    ]
    for seq, event in enumerate(events, start=1):
        numbered(request_id, seq, event)
    with EventStore(path) as store:
        store.put_request(RequestRow(request_id=request_id, conversation_id=conv,
                                     kind="orchestrate", status="running", started_at=now))
        store.put_tool_execution(ToolExecutionRow(
            execution_id="exe_1", request_id=request_id, conversation_id=conv, tool="fs.read",
            params='{"path": "a"}', status="running", started_at=now))
        for event in events:
            store.append_event(event, agent="assistant", depth=0)
    async with TestClient(TestServer(server.create_app(make_settings(tmp_path, db_path=path)))):
        pass  # start-up recovery runs; stopping flushes
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            "SELECT status, ok, error, started_at IS NOT NULL FROM tool_executions").fetchall()
    assert rows == [("interrupted", False, INTERRUPTED_ERROR, True)]


async def test_recovery_of_a_request_whose_done_was_stored_adds_nothing(tmp_path: Path) -> None:
    """A kill between the commit of a turn's last events and of its row: the stored done
    stands; the row takes its status and no second done is appended."""
    path = tmp_path / "done_stored.duckdb"
    request_id, conv, now = "req_done", "conv_done", time.time()
    events: list[EventBase] = [
        RequestReceived(agent="assistant", conversation_id=conv),
        StreamStart(stream_id=1, agent="assistant", depth=0),
        Text(stream_id=1, delta="All there."),
        StreamEnd(stream_id=1),
        Done(ok=True, duration_ms=12.5, reason="completed"),
    ]
    for seq, event in enumerate(events, start=1):
        numbered(request_id, seq, event)
    with EventStore(path) as store:
        store.put_request(RequestRow(request_id=request_id, conversation_id=conv,
                                     kind="orchestrate", status="running", started_at=now))
        store.put_message(MessageRow(
            message_id=f"{request_id}:assistant", conversation_id=conv, request_id=request_id,
            ordinal=1, role="assistant", content="", status="streaming", created_at=now,
            updated_at=now))
        for event in events:
            store.append_event(event, agent="assistant", depth=0)
    async with TestClient(TestServer(server.create_app(make_settings(tmp_path, db_path=path)))) as c:
        frames = await replay(c, request_id)
        assert [f.event for f in event_frames(frames)] == [e.type for e in events]
        body = await get_json(c, f"/v1/requests/{request_id}")
    assert body["status"] == "completed" and body["last_seq"] == len(events)
    assert body["response"]["status"] == "complete"
    assert body["response"]["content"] == "All there."


async def test_an_absurdly_long_cursor_is_a_400(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    request_id, _ = await orchestrate(client, {"messages": [user("Long cursor.")]})
    for params, headers in (({"since_seq": "9" * 5000}, {}), ({}, {"Last-Event-ID": "1" * 40})):
        async with client.get(events_url(request_id), params=params, headers=headers) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["error"]["code"] == "invalid_cursor"

"""The Responses wire across workers, against real processes: ``python server.py --workers 2
--event-log redis://127.0.0.1:6379/15`` (db 15, key prefixes ``resp-…``), driven by the
official ``openai`` client, with the supervisor helpers of :mod:`tests.test_workers_e2e`.

A background response is created through one worker (its owner) and then retrieved,
streamed, resumed with ``starting_after`` and cancelled through the other, as a load
balancer (or the SDK reconnecting) does. Each client is pinned to one worker: its one
kept-alive connection was opened until ``X-Worker`` named that worker, and every answer's
``X-Worker`` is recorded and checked, so a test that did not cross workers fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, NotFoundError

from tests.redis_helpers import REDIS_HOST, REDIS_PORT
from tests.test_workers_e2e import Workers, ids_of, running

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/15"  # db 15: the suite's, unique prefixes
MODEL = "offline"


@dataclasses.dataclass
class Pinned:
    """An ``openai`` client whose one connection is on ``worker``; ``seen`` is the
    ``X-Worker`` of every answer it got."""

    client: AsyncOpenAI
    worker: str
    seen: list[str]

    def assert_stayed(self) -> None:
        assert self.seen and set(self.seen) == {self.worker}, self.seen


@contextlib.asynccontextmanager
async def pinned_sdk(srv: Workers, worker: str, *, tries: int = 200) -> AsyncIterator[Pinned]:
    """An ``openai`` client on the worker ``worker`` (see the module docstring)."""
    for _ in range(tries):
        seen: list[str] = []

        async def record(response: httpx.Response, seen: list[str] = seen) -> None:
            seen.append(response.headers.get("X-Worker", "?"))

        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(60.0), event_hooks={"response": [record]})
        probe = await http.get(f"{srv.base}/healthz")
        if probe.headers.get("X-Worker") == worker:
            seen.clear()
            client = AsyncOpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0,
                                 http_client=http)
            try:
                yield Pinned(client=client, worker=worker, seen=seen)
            finally:
                await client.close()
            return
        await http.aclose()
    pytest.fail(f"no connection reached the worker {worker} in {tries} tries")


def dumped(event: Any) -> dict[str, Any]:
    return dict(event.model_dump(exclude_unset=True))


async def stream_all(pinned: Pinned, response_id: str, *, starting_after: int | None = None,
                     stop_after: int | None = None) -> list[dict[str, Any]]:
    """The response's events through ``pinned`` (after ``starting_after``), to the end or
    the first ``stop_after`` of them."""
    out: list[dict[str, Any]] = []
    if starting_after is None:
        stream = await pinned.client.responses.retrieve(response_id, stream=True)
    else:
        stream = await pinned.client.responses.retrieve(response_id, stream=True,
                                                        starting_after=starting_after)
    async with stream:
        async for event in stream:
            out.append(dumped(event))
            if stop_after is not None and len(out) >= stop_after:
                break
    return out


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


async def test_a_background_response_is_retrieved_streamed_and_resumed_through_the_other_worker(
        tmp_path: Path) -> None:
    async with running(tmp_path, redis_url=REDIS_URL, prefix_head="resp",
                       OFFLINE_TOKEN_DELAY_MS=20) as srv:
        owner, other = sorted(await ids_of(srv))
        async with pinned_sdk(srv, owner) as on_owner, pinned_sdk(srv, other) as on_other:
            created = await on_owner.client.responses.create(
                model=MODEL, input="Tell a long story across workers.", background=True,
                max_output_tokens=150)
            assert created.status in ("queued", "in_progress")
            # At once, through the worker that does not run it: found, live, not stale.
            early = await on_other.client.responses.retrieve(created.id)
            assert early.id == created.id and early.status == "in_progress", early
            assert early.model_dump(exclude={"output", "usage"}) == created.model_dump(
                exclude={"output", "usage"})
            owners_stream = asyncio.create_task(_stream_on(srv, owner, created.id))
            head = await stream_all(on_other, created.id, stop_after=12)
            on_other.assert_stayed()
        assert head[-1]["type"] == "response.output_text.delta", head[-1]
        after = head[-1]["sequence_number"]

        # Mid-answer, the JSON snapshot through the other worker has the output so far.
        async with pinned_sdk(srv, other) as on_other:
            snapshot = await on_other.client.responses.retrieve(created.id)
            on_other.assert_stayed()
        assert snapshot.status == "in_progress", snapshot
        assert snapshot.output_text.startswith(deltas(head)) and snapshot.output_text

        # Resumed through the other worker: exactly the rest, live to the end.
        async with pinned_sdk(srv, other) as on_other:
            tail = await stream_all(on_other, created.id, starting_after=after)
            replay = await stream_all(on_other, created.id)
            final = await on_other.client.responses.retrieve(created.id)
            on_other.assert_stayed()
        everything = await owners_stream
    assert tail[0]["sequence_number"] == after + 1
    assert head + tail == everything, "the other worker's stream differs from the owner's"
    assert replay == everything
    assert [e["sequence_number"] for e in everything] == list(range(len(everything)))
    assert everything[-1]["type"] == "response.incomplete"  # it ran to its token limit
    assert final.status == "incomplete" and final.output_text == deltas(everything)
    assert final.model_dump(exclude_unset=True) == everything[-1]["response"]


async def test_a_cancel_through_the_other_worker_ends_the_response_cancelled_for_every_follower(
        tmp_path: Path) -> None:
    async with running(tmp_path, redis_url=REDIS_URL, prefix_head="resp",
                       OFFLINE_TOKEN_DELAY_MS=30) as srv:
        owner, other = sorted(await ids_of(srv))
        async with pinned_sdk(srv, owner) as on_owner:
            created = await on_owner.client.responses.create(
                model=MODEL, input="Talk for a very long while.", background=True,
                max_output_tokens=20000)
            on_owner.assert_stayed()
        owners_stream = asyncio.create_task(_stream_on(srv, owner, created.id))
        async with pinned_sdk(srv, other) as follower, pinned_sdk(srv, other) as canceller:
            events: list[dict[str, Any]] = []
            cancelled = None
            stream = await follower.client.responses.retrieve(created.id, stream=True)
            async with stream:
                async for event in stream:
                    events.append(dumped(event))
                    if cancelled is None and sum(
                            e["type"] == "response.output_text.delta" for e in events) >= 5:
                        cancelled = await canceller.client.responses.cancel(created.id)
            again = await canceller.client.responses.retrieve(created.id)
            follower.assert_stayed()
            canceller.assert_stayed()
        async with pinned_sdk(srv, owner) as on_owner:
            on_owners_side = await on_owner.client.responses.retrieve(created.id)
            on_owner.assert_stayed()
        owners = await owners_stream
    assert cancelled is not None and cancelled.status == "cancelled", cancelled
    assert cancelled.output_text  # the partial answer is kept
    assert events == owners, "the other worker's follower saw another stream than the owner's"
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "cancelled"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert again.status == on_owners_side.status == "cancelled"
    assert again.output_text == on_owners_side.output_text == cancelled.output_text
    assert cancelled.output_text == deltas(events)


async def _stream_on(srv: Workers, worker: str, response_id: str) -> list[dict[str, Any]]:
    """The whole stream of a response through ``worker`` (the owner: its live turn)."""
    async with pinned_sdk(srv, worker) as pinned:
        events = await stream_all(pinned, response_id)
        pinned.assert_stayed()
    return events


async def test_cancel_and_delete_through_the_other_worker_reach_the_owner(tmp_path: Path) -> None:
    async with running(tmp_path, redis_url=REDIS_URL, prefix_head="resp",
                       OFFLINE_TOKEN_DELAY_MS=30) as srv:
        owner, other = sorted(await ids_of(srv))
        async with pinned_sdk(srv, owner) as on_owner, pinned_sdk(srv, other) as on_other:
            doomed, deleted = [await on_owner.client.responses.create(
                model=MODEL, input=f"Talk for a very long while, {n}.", background=True,
                max_output_tokens=20000) for n in (1, 2)]
            cancelled = await on_other.client.responses.cancel(doomed.id)
            on_owners_side = await on_owner.client.responses.retrieve(doomed.id)
            await on_other.client.responses.delete(deleted.id)
            with pytest.raises(NotFoundError):
                await on_other.client.responses.retrieve(deleted.id)
            status = await on_other.client.get(f"/requests/req_{deleted.id.removeprefix('resp_')}",
                                               cast_to=httpx.Response)
            on_owner.assert_stayed()
            on_other.assert_stayed()
    assert cancelled.status == on_owners_side.status == "cancelled", (cancelled, on_owners_side)
    assert cancelled.output == on_owners_side.output
    # Deleting a running response cancelled its turn on its owner.
    assert status.json()["status"] == "cancelled", status.json()

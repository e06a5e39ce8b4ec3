"""Workers sharing one Redis (issue 13): who is alive, who owns which turn, and closing the
turns of a worker that died.

Keys and channels (all under ``REDIS_PREFIX``)::

    <prefix>:workers              sorted set: worker id → expiry (ms, Redis's clock)
    <prefix>:workers:info         hash: worker id → {"id", "pid", "host", "started_at"}
    <prefix>:live                 hash: request id → owner worker id (running turns)
    <prefix>:lease:<rid>          the owner's lease on a turn: SET NX PX, renewed by it
    <prefix>:claim:<rid>          SET NX PX by the one worker that closes a dead owner's turn
    <prefix>:req:<rid>:meta       hash: worker, status, conversation_id, kind, model, times
    <prefix>:worker:<id>          pub/sub: cancel requests to that worker, and its replies

A worker renews its registration and its turns' leases every ``TURN_LEASE_S / 3``; its
registration lives ``2 × TURN_LEASE_S``, a lease ``TURN_LEASE_S``. Every worker's reaper
looks every ``TURN_LEASE_S`` (with jitter) for live turns whose lease is gone: the first to
``SET NX`` the claim closes the turn from the log exactly as start-up recovery closes a
stored one (:func:`sinks.recovery.closing_events`: open streams end ``error``, then
``turn_error`` and ``done`` with ``reason: "interrupted"``), numbered right after the log's
last seq and appended through the log's own script, which refuses any append that does not
start right after the stream's end: a second closer (or an owner that was only slow) cannot
append behind it. So a dead owner's turn is closed within ``3 × TURN_LEASE_S``, once.

An owner that finds its lease taken (it was stalled longer than the lease) cancels the
turn locally: the log already refuses its appends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from reactivex import Observer
from redis.exceptions import RedisError

from core.errors import PipelineError
from core.events import Done, Event, StreamStart
from core.turn import TurnContext, TurnState
from sinks.event_log import RedisEventLog
from sinks.recovery import INTERRUPTED_ERROR, OpenStreams, closing_events
from sinks.store import EventStore, RequestRow

log = logging.getLogger(__name__)

_FAILURES = (RedisError, OSError, PipelineError)

# KEYS: workers zset, info hash. ARGV: id ('' = only list), ttl ms, info JSON.
# Drops expired workers, (re)registers this one, answers every live worker's info.
HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
if #live == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(live))
"""

# KEYS: live hash, then (lease, meta) per turn. ARGV: worker, ttl ms, the request ids.
# Per turn: 1 renewed; 2 restored (Redis lost the lease, e.g. it restarted, and no closer
# took the turn: lease, live entry and owner written again); 0 lost (another worker holds
# the lease, or closed the turn).
RENEW_SCRIPT = """
local out = {}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local lease, meta = KEYS[2 * i], KEYS[2 * i + 1]
  local holder = redis.call('GET', lease)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', lease, ARGV[2])
    out[i] = 1
  elseif (not holder) and (not redis.call('HGET', meta, 'closed_by')) then
    redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
    redis.call('HSET', KEYS[1], ARGV[2 + i], ARGV[1])
    redis.call('HSET', meta, 'worker', ARGV[1], 'status', 'running')
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease, live hash, meta. ARGV: worker, request id, status, finished_at, ttl s.
# The owner's release after its done is in the log; 0 when a closer took the turn.
RELEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[3], 'closed_by') then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
redis.call('HSET', KEYS[3], 'status', ARGV[3], 'finished_at', ARGV[4])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
return 1
"""

_DONE_STATUS = {"completed": "completed", "cancelled": "cancelled", "error": "error",
                "interrupted": "interrupted"}


def new_worker_id() -> str:
    """A worker id never used before: ``<host>-<pid>-<random>`` (the random part, because
    pids are reused, e.g. in a container restarted with the same pid)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclasses.dataclass
class ClusterStats:
    """Counters for ``/healthz`` and the tests."""

    turns_registered: int = 0
    leases_lost: int = 0
    reaped: int = 0  # dead owners' turns this worker closed
    reap_refused: int = 0  # closings refused by the log (someone else appended)
    claims_lost: int = 0  # another worker claimed first
    remote_cancels: int = 0  # cancels this worker forwarded to an owner
    last_error: str | None = None


class RemoteCancelError(PipelineError):
    """A cancel could not reach the turn's owner (or it did not answer in time)."""

    def __init__(self, message: str, *, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


class Cluster:
    """One worker's membership: registration, leases of its turns, the reaper, the cancel bus.

    Args:
        url: The Redis URL (``EVENT_LOG``).
        event_log: The worker's event log (its script and reads close dead owners' turns).
        store: Where a turn this worker closes is recorded ``interrupted``.
        worker_id: This worker's id (:func:`new_worker_id`).
        lease_s: ``TURN_LEASE_S``.
        meta_ttl_s: A finished turn's meta expires after this (``EVENT_LOG_TTL_S``).
        live_ttl_s: A running turn's meta expiry (``EVENT_LOG_LIVE_TTL_S``).
        cancel_timeout_s: How long a forwarded cancel waits for the owner's answer.
        cancel_local: Cancels a turn of this worker (on a request from another worker);
            returns the answer to send back.
        on_lease_lost: Called with a request id whose lease another worker took.
        timeout_s: Redis connect and command timeout.
    """

    def __init__(
        self, url: str, *, prefix: str, event_log: RedisEventLog, store: EventStore | None,
        worker_id: str, lease_s: float, meta_ttl_s: int, live_ttl_s: int,
        cancel_timeout_s: float, cancel_local: Callable[[str], Awaitable[dict[str, Any]]],
        on_lease_lost: Callable[[str], None], timeout_s: float = 2.0,
        is_local: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self.prefix = prefix
        self.event_log = event_log
        self.store = store
        self.worker_id = worker_id
        self.pid = os.getpid()
        self.lease_s = lease_s
        self.meta_ttl_s = meta_ttl_s
        self.live_ttl_s = live_ttl_s
        self.cancel_timeout_s = cancel_timeout_s
        self._cancel_local = cancel_local
        self._on_lease_lost = on_lease_lost
        self._is_local = is_local
        self.stats = ClusterStats()
        # A bounded pool that waits for a free connection rather than failing: registrations
        # and releases are batched, but status, cancel and reaper reads come in bursts.
        self.client: aioredis.Redis = aioredis.Redis.from_pool(  # it owns (closes) the pool
            aioredis.BlockingConnectionPool.from_url(
                url, max_connections=32, timeout=timeout_s, socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s))
        # Pub/sub waits for messages without a deadline: its own client, no socket timeout.
        self._sub_client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout_s)
        self._info = json.dumps({"id": worker_id, "pid": self.pid,
                                 "host": socket.gethostname(), "started_at": time.time()})
        self._registering: dict[str, asyncio.Future[bool]] = {}
        # Registrations and releases wait here for the writer: one pipeline per loop tick.
        self._to_register: list[tuple[TurnContext, asyncio.Future[bool]]] = []
        self._to_release: list[tuple[str, str]] = []
        self._wake = asyncio.Event()
        self._held: set[str] = set()  # request ids whose lease this worker holds
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[Any]] = set()
        self._heartbeat = self.client.register_script(HEARTBEAT_SCRIPT)
        self._renew = self.client.register_script(RENEW_SCRIPT)
        self._release = self.client.register_script(RELEASE_SCRIPT)

    # -- names ------------------------------------------------------------------------
    def lease_key(self, request_id: str) -> str:
        return f"{self.prefix}:lease:{request_id}"

    def claim_key(self, request_id: str) -> str:
        return f"{self.prefix}:claim:{request_id}"

    def meta_key(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}:meta"

    def channel(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def live_key(self) -> str:
        return f"{self.prefix}:live"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}:workers"

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Register (once Redis answers; a worker starts without it) and start the loops."""
        with contextlib.suppress(*_FAILURES):
            await self._beat()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._beat_loop(), name="cluster-heartbeat"),
                       loop.create_task(self._reap_loop(), name="cluster-reaper"),
                       loop.create_task(self._listen(), name="cluster-cancel-bus"),
                       loop.create_task(self._write_loop(), name="cluster-writer")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 2.0)

    async def aclose(self, *, within_s: float = 5.0) -> None:
        """Release what is pending, leave the worker list, stop: within ``within_s`` in all
        (a worker's stop must stay inside the supervisor's bound even when Redis or
        redis-py hangs); past it, what is left is abandoned (logged), the leases expire."""
        try:
            async with asyncio.timeout(within_s):
                await self._close()
        except TimeoutError:
            log.error("cluster: stopping took over %.0fs; leaving the rest (leases expire)",
                      within_s)
            for task in (*self._tasks, *self._side):
                task.cancel()

    async def _close(self) -> None:
        if self._side:
            await asyncio.wait(list(self._side), timeout=5.0)
        deadline = time.monotonic() + 5.0
        while (self._to_register or self._to_release) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*(_stop(task) for task in self._tasks))
        with contextlib.suppress(*_FAILURES):
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self.workers_key, self.worker_id)
            pipe.hdel(f"{self.workers_key}:info", self.worker_id)
            await pipe.execute()
        await self.client.aclose()
        await self._sub_client.aclose()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)
        return task

    # -- membership -------------------------------------------------------------------
    async def _beat(self) -> list[dict[str, Any]]:
        ttl_ms = int(self.lease_s * 2000)
        raw = await self._heartbeat(keys=[self.workers_key, f"{self.workers_key}:info"],
                                    args=[self.worker_id, ttl_ms, self._info])
        return _infos(raw)

    async def workers(self) -> list[dict[str, Any]]:
        """Every live worker as ``{"id", "pid"}`` (sorted by id).

        Raises:
            PipelineError: Redis could not be asked.
        """
        try:
            raw = await self._heartbeat(keys=[self.workers_key, f"{self.workers_key}:info"],
                                        args=["", 0, ""])
        except (RedisError, OSError) as exc:
            raise PipelineError(f"cluster: listing workers failed: {exc}") from exc
        return sorted(({"id": info["id"], "pid": info["pid"]} for info in _infos(raw)),
                      key=lambda info: str(info["id"]))

    async def _beat_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._beat()
                await self._renew_leases()
                if failures:
                    log.info("cluster: Redis answers again after %d failed heartbeats", failures)
                failures = 0
            except _FAILURES as exc:
                failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                if failures == 1:
                    log.warning("cluster: heartbeat failed (%s); the turns' leases may lapse", exc)

    async def _renew_leases(self) -> None:
        held = sorted(self._held)
        for start in range(0, len(held), 500):
            chunk = held[start:start + 500]
            keys = [self.live_key]
            for rid in chunk:
                keys += [self.lease_key(rid), self.meta_key(rid)]
            answers = await self._renew(keys=keys,
                                        args=[self.worker_id, int(self.lease_s * 1000), *chunk])
            for rid, kept in zip(chunk, answers, strict=True):
                if int(kept) == 2:
                    log.warning("cluster: the lease of turn %s was gone from Redis (a restart?); "
                                "restored", rid)
                if not int(kept) and rid in self._held:
                    self._held.discard(rid)
                    self.stats.leases_lost += 1
                    log.error("cluster: the lease of turn %s was taken over (this worker stalled "
                              "past TURN_LEASE_S?); cancelling it here", rid)
                    self._on_lease_lost(rid)

    # -- turns ------------------------------------------------------------------------
    def tap(self, ctx: TurnContext) -> Observer[Event]:
        """The orchestrator tap: registers a turn when it starts, releases it after its
        ``done`` is in the log."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._registering[ctx.request_id] = future
        self._to_register.append((ctx, future))
        self._wake.set()
        return _TurnTap(self, ctx.request_id)

    async def _write_loop(self) -> None:
        """Sends what waits, in one pipeline per batch: whatever the turns started or
        released in one loop tick (and while the previous batch was in flight)."""
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            ok = await self._register_batch() and await self._release_batch()
            failures = 0 if ok else failures + 1
            if failures:  # Redis away: retry with backoff (registrations give up, see below)
                await asyncio.sleep(min(2.0, 0.05 * 2 ** failures))
                if self._to_release:
                    self._wake.set()

    async def _register_batch(self) -> bool:
        batch, self._to_register = self._to_register, []
        if not batch:
            return True
        started = repr(time.time())
        try:
            pipe = self.client.pipeline(transaction=True)
            for ctx, _ in batch:
                rid = ctx.request_id
                pipe.set(self.lease_key(rid), self.worker_id, nx=True,
                         px=int(self.lease_s * 1000))
                pipe.hset(self.live_key, rid, self.worker_id)
                pipe.hset(self.meta_key(rid), mapping={
                    "worker": self.worker_id, "status": "running",
                    "conversation_id": ctx.conversation_id, "kind": ctx.kind,
                    "model": ctx.model, "started_at": started})
                pipe.expire(self.meta_key(rid), self.live_ttl_s)
            await pipe.execute()
        except _FAILURES as exc:
            # Not retried: a turn whose owner is unknown still runs and streams here; its
            # lease is restored by the next renewal if Redis answers by then.
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.error("cluster: registering %d turns failed: %s (the renewal retries)",
                      len(batch), exc)
            for ctx, future in batch:
                self._held.add(ctx.request_id)  # so that the renewal restores its lease
                if not future.done():
                    future.set_result(False)
            return False
        for ctx, future in batch:
            self._held.add(ctx.request_id)
            self.stats.turns_registered += 1
            if not future.done():
                future.set_result(True)
        return True

    async def _release_batch(self) -> bool:
        batch, self._to_release = self._to_release, []
        if not batch:
            return True
        now = repr(time.time())
        try:
            pipe = self.client.pipeline(transaction=False)
            for rid, status in batch:
                await self._release(
                    keys=[self.lease_key(rid), self.live_key, self.meta_key(rid)],
                    args=[self.worker_id, rid, status, now, self.meta_ttl_s], client=pipe)
            await pipe.execute()
        except _FAILURES as exc:
            log.warning("cluster: releasing %d turns failed: %s; retrying", len(batch), exc)
            self._to_release[:0] = batch
            return False
        return True

    async def registered(self, request_id: str, *, within: float) -> bool:
        """Wait (bounded) until the turn's owner is in Redis: a background turn's ``202``
        waits for it, so every worker asked next names its owner."""
        future = self._registering.get(request_id)
        if future is None:
            return request_id in self._held
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(future), within)
        return False

    def _ended(self, request_id: str, done: Done | None) -> None:
        self._spawn(self._finish(request_id, done))

    async def _finish(self, request_id: str, done: Done | None) -> None:
        registering = self._registering.pop(request_id, None)
        if registering is not None:
            await registering
        if done is not None:  # release once every worker can read the done
            await self.event_log.appended(request_id, seq=done.seq,
                                          within=max(5.0, self.lease_s * 3))
        self._held.discard(request_id)
        status = _DONE_STATUS.get(done.reason, "error") if done is not None else "error"
        self._to_release.append((request_id, status))
        self._wake.set()

    async def owner(self, request_id: str) -> str | None:
        """The worker running the turn now, or None (not running anywhere)."""
        raw = await self.client.hget(self.live_key, request_id)
        return _text(raw) if raw is not None else None

    async def meta(self, request_id: str) -> dict[str, str] | None:
        """What Redis knows of a request (its owner, status, …), or None."""
        raw = await self.client.hgetall(self.meta_key(request_id))
        if not raw:
            return None
        return {_text(key): _text(value) for key, value in raw.items()}

    # -- the reaper -------------------------------------------------------------------
    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s * (1 + random.random() * 0.25))
            try:
                await self.reap_once()
            except _FAILURES as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("cluster: reaper pass failed: %s", exc)

    async def reap_once(self) -> list[str]:
        """One pass: close every live turn whose owner's lease is gone and whose claim this
        worker wins; return their ids."""
        live = {_text(key): _text(value)
                for key, value in (await self.client.hgetall(self.live_key)).items()}
        candidates = [rid for rid in live if not self._is_local(rid) and rid not in self._held]
        if not candidates:
            return []
        pipe = self.client.pipeline(transaction=False)
        for rid in candidates:
            pipe.exists(self.lease_key(rid))
        leased = await pipe.execute()
        closed = []
        for rid, has_lease in zip(candidates, leased, strict=True):
            if has_lease:
                continue
            if await self.close_orphan(rid, owner=live[rid]):
                closed.append(rid)
        return closed

    async def close_orphan(self, request_id: str, *, owner: str) -> bool:
        """Close a turn whose owner's lease lapsed, if this worker wins its claim.

        Returns True when this worker appended its closing events."""
        claim_ms = int(max(10.0, self.lease_s * 5) * 1000)
        won = await self.client.set(self.claim_key(request_id), self.worker_id, nx=True,
                                    px=claim_ms)
        if not won:
            self.stats.claims_lost += 1
            return False
        events = await self.event_log.read_all(request_id)
        meta = await self.meta(request_id) or {}
        if events and isinstance(events[-1], Done):  # it ended; its owner died before releasing
            await self._forget(request_id, owner, _DONE_STATUS.get(events[-1].reason, "error"),
                               closed=False)
            return False
        conversation_id = meta.get("conversation_id") or next(
            (getattr(e, "conversation_id", None) for e in events if e.type == "request_received"),
            None) or ""
        state = TurnState(request_id, conversation_id, meta.get("model") or "")
        streams = OpenStreams()
        for event in events:
            state.apply(event)
            streams.apply(event)
        closing = closing_events(state, streams, first_seq=state.last_seq + 1,
                                 error=f"interrupted: worker {owner} stopped before the turn "
                                       "finished")
        ok, last = await self.event_log.append_as_closer(request_id, [e for e, _, _ in closing])
        if not ok:
            self.stats.reap_refused += 1
            log.warning("cluster: closing turn %s was refused: its log ends at seq %d, not %d "
                        "(its owner is alive, or another worker closed it)", request_id, last,
                        state.last_seq - len(closing))
            return False
        await self._forget(request_id, owner, "interrupted", closed=True)
        self.stats.reaped += 1
        log.warning("cluster: closed turn %s of the dead worker %s as interrupted (seq %d..%d)",
                    request_id, owner, closing[0][0].seq, closing[-1][0].seq)
        self._record(request_id, events, closing, state, meta)
        return True

    async def _forget(self, request_id: str, owner: str, status: str, *, closed: bool) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.live_key, request_id)
        fields: dict[Any, Any] = {
            "status": status, "finished_at": repr(time.time()), "worker": owner}
        if closed:
            fields["closed_by"] = self.worker_id
        pipe.hset(self.meta_key(request_id), mapping=fields)
        pipe.expire(self.meta_key(request_id), self.meta_ttl_s)
        pipe.delete(self.lease_key(request_id))
        await pipe.execute()

    def _record(self, request_id: str, events: list[Event], closing: list[Any],
                state: TurnState, meta: dict[str, str]) -> None:
        """The closed turn in this process's own store (a single-role process on a shared
        Redis, no recorder): every event the log had, the closing ones, and its request
        row ``interrupted``. Workers have no store of their own (``store`` is None): the
        recorder records the closing events from the log like any others."""
        store = self.store
        if store is None:
            return
        try:
            agents: dict[int, tuple[str | None, int | None]] = {}
            for event in events:
                if isinstance(event, StreamStart):
                    agents[event.stream_id] = (event.agent, event.depth)
                stream = getattr(event, "stream_id", None)
                agent, depth = agents.get(stream, (None, None)) if stream is not None else (
                    None, None)
                store.append_event(event, agent=agent, depth=depth)
            for event, agent, depth in closing:
                store.append_event(event, agent=agent, depth=depth)
            started = float(meta.get("started_at") or time.time())
            store.put_request(RequestRow(
                request_id=request_id, conversation_id=state.conversation_id,
                kind=meta.get("kind") or "orchestrate", status="interrupted",
                started_at=started, finished_at=time.time(), model=meta.get("model"),
                prompt_tokens=state.usage.prompt_tokens,
                completion_tokens=state.usage.completion_tokens,
                total_tokens=state.usage.total_tokens, last_seq=state.last_seq,
                error=INTERRUPTED_ERROR))
        except PipelineError as exc:
            log.error("cluster: recording the closed turn %s in the store failed: %s",
                      request_id, exc)

    # -- the cancel bus ---------------------------------------------------------------
    async def cancel_remote(self, request_id: str, owner: str) -> dict[str, Any]:
        """Ask the owner of a turn to cancel it; its answer.

        Raises:
            RemoteCancelError: nobody listens on the owner's channel (it died: the reaper
                closes its turn), or it did not answer within ``REMOTE_CANCEL_TIMEOUT_S``.
        """
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), self.cancel_timeout_s)
        token = secrets.token_hex(8)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[token] = reply
        self.stats.remote_cancels += 1
        try:
            message = json.dumps({"op": "cancel", "request_id": request_id, "token": token,
                                  "reply_to": self.channel(self.worker_id)})
            receivers = await self.client.publish(self.channel(owner), message)
            if not receivers:
                raise RemoteCancelError(
                    f"the owner of {request_id}, worker {owner}, does not listen (it died?); "
                    f"the turn is closed as interrupted within 3 × TURN_LEASE_S", owner=owner)
            try:
                return await asyncio.wait_for(reply, self.cancel_timeout_s)
            except TimeoutError:
                raise RemoteCancelError(
                    f"the owner of {request_id}, worker {owner}, did not answer within "
                    f"{self.cancel_timeout_s:.0f}s (REMOTE_CANCEL_TIMEOUT_S)", owner=owner) from None
        finally:
            self._replies.pop(token, None)

    async def _listen(self) -> None:
        failures = 0
        while True:
            pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel(self.worker_id))
                self._subscribed.set()
                failures = 0
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                failures += 1
                self._subscribed.clear()
                if failures == 1:
                    log.warning("cluster: the cancel bus connection failed: %s", exc)
            finally:
                with contextlib.suppress(*_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(min(2.0, 0.05 * 2 ** failures))

    def _dispatch(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if message.get("op") == "cancel":
            self._spawn(self._serve_cancel(message))
        elif message.get("op") == "reply":
            future = self._replies.get(str(message.get("token")))
            if future is not None and not future.done():
                future.set_result(dict(message.get("answer") or {}))

    async def _serve_cancel(self, message: dict[str, Any]) -> None:
        request_id = str(message.get("request_id"))
        try:
            answer = await self._cancel_local(request_id)
        except Exception as exc:  # the answer says so rather than leaving the asker waiting
            log.exception("cluster: cancelling %s for another worker failed", request_id)
            answer = {"cancelled": False, "message": f"the owner failed to cancel: {exc}"}
        reply = json.dumps({"op": "reply", "token": message.get("token"), "answer": answer})
        with contextlib.suppress(*_FAILURES):
            await self.client.publish(str(message.get("reply_to")), reply)

    # -- health -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        stats = self.stats
        return {"lease_s": self.lease_s, "held_leases": len(self._held),
                "turns_registered": stats.turns_registered, "leases_lost": stats.leases_lost,
                "reaped": stats.reaped, "reap_refused": stats.reap_refused,
                "claims_lost": stats.claims_lost, "remote_cancels": stats.remote_cancels,
                "last_error": stats.last_error}


class _TurnTap(Observer[Event]):
    def __init__(self, cluster: Cluster, request_id: str) -> None:
        super().__init__()
        self._cluster = cluster
        self._request_id = request_id
        self._ended = False

    def _on_next_core(self, event: Event) -> None:
        if isinstance(event, Done) and not self._ended:
            self._ended = True
            self._cluster._ended(self._request_id, event)

    def _on_error_core(self, error: Exception) -> None:
        self._on_completed_core()

    def _on_completed_core(self) -> None:
        if not self._ended:
            self._ended = True
            self._cluster._ended(self._request_id, None)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait for it, cancelling again while it goes on: redis-py can
    swallow a cancellation that lands inside a command (measured here: the writer went
    back to waiting, ``cancelling`` forever, and the worker never stopped)."""
    for _ in range(10):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            with contextlib.suppress(asyncio.CancelledError, *_FAILURES):
                task.result()
            return
    log.error("cluster: task %s does not stop; leaving it", task.get_name())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _infos(raw: Any) -> list[dict[str, Any]]:
    out = []
    for item in raw or ():
        if item is None:
            continue
        with contextlib.suppress(ValueError):
            out.append(json.loads(item))
    return out

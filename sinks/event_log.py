"""The distributed event log (issue 13): every numbered event of a turn in a Redis Stream.

With ``EVENT_LOG=memory`` (the default) nothing here runs: a turn's events live in its
in-process :class:`~operators.ReplayLog` only. With ``EVENT_LOG=redis://host:port/db`` the
owner of a turn also appends each event to one stream per request::

    <prefix>:req:<request_id>:events     entries "<seq>-0" → {"e": <the event's JSON>}
    <prefix>:req:<request_id>:notify     pub/sub: the newest seq after each append (never a payload)
    <prefix>:turns                       discovery: one entry per turn (auto id, r = request id,
                                         m = its meta), added with the turn's first events when
                                         its writer has a meta (worker role); the recorder
                                         (:mod:`sinks.log_recorder`) drains it with a group

and any process can follow the turn from there (:meth:`RedisEventLog.follow`).

Appending (the writer side):
    * Each event is serialized once, when the turn emits it, and queued; one flusher task
      sends everything queued in one pipeline per loop tick (one ``EVALSHA`` per turn
      in the batch), so a burst of N events costs one round trip, not N.
    * The script (:data:`APPEND_SCRIPT`) appends with explicit ids ``<seq>-0`` only if the
      stream ends exactly at the seq before the batch; it answers with the stream's last
      seq otherwise. So the stream never has a hole: a stream that lost entries (Redis
      restarted without persistence, the key expired) is re-filled from the owner's memory,
      from the stream's last seq on (the whole turn when the key is gone); and a stale
      writer behind a newer one is refused (logged, counted, never a crash).
    * While Redis is unreachable, batches are retried with a capped exponential backoff;
      the turn itself never waits for Redis and never fails because of it (the ReplayLog
      and the DuckDB store have every event). After a failure, or when Redis's ``run_id``
      changes (a restart), every live turn's stream is checked and repaired.
    * Finished turns' streams expire after ``EVENT_LOG_TTL_S``; a live turn's stream is
      never trimmed (its expiry, ``EVENT_LOG_LIVE_TTL_S``, is renewed by every append and
      only reclaims streams whose owner vanished).

Following (the reader side), :meth:`RedisEventLog.follow`:
    subscribe to the turn's channel first (one shared pub/sub connection per process,
    subscriptions confirmed before reading), then ``XRANGE key (N-0 +`` from the cursor,
    deliver only the next seq in order (seq ≤ last sent is dropped), then on each
    notification read again from the last seq; it ends after ``done``. When the pub/sub
    connection comes back after an outage it re-subscribes and every follower re-reads the
    log, so nothing published meanwhile is missed.

Following many turns at once (the recorder), :class:`LiveReader`: one pattern subscription
(``PSUBSCRIBE <prefix>:req:*:notify``) instead of one per turn, and one ``XREAD`` for every
turn with news instead of an ``XRANGE`` (and a task wake-up) per turn; the same guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from reactivex import Observer
from redis.asyncio.connection import Connection
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from core.config import Settings
from core.errors import PipelineError
from core.events import EVENT_ADAPTER, Done, Event

log = logging.getLogger(__name__)

# KEYS[1] the turn's stream, KEYS[2] the discovery stream (``<prefix>:turns``);
# ARGV: channel, first seq of the batch, ttl (s), request id, turn meta ('' = no discovery),
# payloads… Returns {1, last appended seq} or {0, the stream's last seq} (nothing appended).
# A batch that starts at seq 1 also announces the turn on the discovery stream (auto id,
# fields r = request id, m = the turn's meta), in the same atomic step as its first events,
# so the recorder can never miss a turn whose events exist. A repair that re-appends from
# seq 1 announces it again: the recorder's writes are idempotent.
APPEND_SCRIPT = """
local first = tonumber(ARGV[2])
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = 0
if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
if last ~= first - 1 then return {0, last} end
local n = #ARGV - 5
for i = 1, n do
  redis.call('XADD', KEYS[1], string.format('%d-0', first + i - 1), 'e', ARGV[5 + i])
end
if n > 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  if first == 1 and ARGV[5] ~= '' then
    redis.call('XADD', KEYS[2], '*', 'r', ARGV[4], 'm', ARGV[5])
  end
  redis.call('PUBLISH', ARGV[1], first + n - 1)
end
return {1, first + n - 1}
"""

_FAILURES = (RedisError, OSError)


class EventLogError(PipelineError):
    """The distributed event log could not serve a request."""


@dataclasses.dataclass(frozen=True, slots=True)
class StreamHead:
    """What a turn's stream holds: whether it exists, its last seq, and whether that is ``done``."""

    exists: bool
    last_seq: int = 0
    done: bool = False


@dataclasses.dataclass
class EventLogStats:
    """Counters for ``/healthz`` and the tests."""

    appended: int = 0  # events confirmed in Redis
    batches: int = 0  # pipelines sent (round trips)
    failed_batches: int = 0
    repairs: int = 0  # streams re-filled from memory
    re_appended: int = 0  # events appended again by repairs
    refused: int = 0  # stale writes refused
    abandoned: int = 0  # finished turns given up while Redis stayed away
    follower_reconnects: int = 0
    last_error: str | None = None
    reachable: bool = True


@dataclasses.dataclass(eq=False)
class _TurnLog:
    """The writer's state for one turn."""

    request_id: str
    key: str
    channel: str
    history: Callable[[], Sequence[Event]]
    meta: bytes = b""  # announced on the discovery stream with seq 1 (b"": not announced)
    appended: int = 0  # the last seq confirmed in the stream
    pending: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    done_seq: int | None = None
    done_at: float = 0.0
    uncertain: bool = False  # a batch failed in flight: it may or may not have been applied
    refused: bool = False
    watchers: list[tuple[int, asyncio.Future[None]]] = dataclasses.field(default_factory=list)

    def settled(self, *, gone: bool = False) -> None:
        """Wake whoever waits for a seq now in the stream (everyone when ``gone``)."""
        keep = []
        for seq, future in self.watchers:
            if gone or seq <= self.appended:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((seq, future))
        self.watchers = keep


def _dump(event: Event) -> bytes:
    return type(event).__pydantic_serializer__.to_json(event)


class _TurnWriter(Observer[Event]):
    """Subscribed to a turn's shared stream: queues each event for the flusher."""

    def __init__(self, log_: RedisEventLog, turn: _TurnLog) -> None:
        super().__init__()
        self._log = log_
        self._turn = turn

    def _on_next_core(self, event: Event) -> None:
        try:
            self._log._queue(self._turn, event)
        except Exception:  # the log must never break the turn for the other sinks
            log.exception("event log: queueing %s seq=%s failed", event.type, event.seq)

    def _on_error_core(self, error: Exception) -> None:
        log.warning("event log: turn %s failed upstream: %s", self._turn.request_id, error)
        self._log._close(self._turn)

    def _on_completed_core(self) -> None:
        self._log._close(self._turn)


class _Waiter:
    """One follower's view of its channel's notifications."""

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self.notified = 0  # the highest seq announced
        self.epoch = 0  # bumped each time the subscription is (re)confirmed
        self.subscribed = False
        self.wake = asyncio.Event()

    def poke(self) -> None:
        self.wake.set()

    async def wait(self, *, last: int, epoch: int, within: float | None) -> bool:
        """Until something is new: a seq after ``last``, a new subscription; False on timeout.

        (A timer, not ``asyncio.wait_for``, which would start a task per wait.)"""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while self.notified <= last and self.epoch == epoch:
            self.wake.clear()
            timer = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                timer = loop.call_later(remaining, self.wake.set)
            try:
                await self.wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        return True


class _PatternWatch:
    """A pattern subscription (``PSUBSCRIBE``) and who is told of its messages: the
    recorder's :class:`LiveReader` hears every turn's notifications on one subscription."""

    def __init__(self, pattern: bytes, on_message: Callable[[bytes, int], None],
                 on_subscribed: Callable[[], None]) -> None:
        self.pattern = pattern
        self.on_message = on_message  # (channel, seq)
        self.on_subscribed = on_subscribed  # (re)confirmed: what was published meanwhile?
        self.subscribed = False
        self.epoch = 0


class _Notifier:
    """One pub/sub connection per process, shared by every follower (ref-counted channels).

    A subscription counts only once Redis confirmed it: a follower reads the log after
    that, so an append is either in what it reads or announced to it. After the connection
    is lost, it reconnects with backoff, subscribes again to every channel, and bumps each
    waiter's epoch so its follower re-reads the log.

    Nothing here waits for Redis unbounded but the read of the next message: a
    (un)subscribe that does not go out within ``send_timeout_s`` drops the connection,
    and a failure of any kind (a bug in a callback included) is a lost connection, never
    the end of the subscriber, which every follower of the process depends on.
    """

    def __init__(self, connect: Callable[[], Connection], *, retry_base_s: float,
                 retry_max_s: float, stats: EventLogStats, send_timeout_s: float = 2.0) -> None:
        self._connect = connect
        self._send_timeout_s = send_timeout_s
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._stats = stats
        self._waiters: dict[bytes, set[_Waiter]] = {}
        self._patterns: dict[bytes, set[_PatternWatch]] = {}
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-log-notifier")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop()

    async def register(self, channel: bytes) -> _Waiter:
        waiter = _Waiter(channel)
        group = self._waiters.setdefault(channel, set())
        group.add(waiter)
        if len(group) > 1:
            waiter.subscribed = any(other.subscribed for other in group if other is not waiter)
        elif self._conn is not None:
            await self._send("SUBSCRIBE", channel)
        return waiter

    async def unregister(self, waiter: _Waiter) -> None:
        group = self._waiters.get(waiter.channel)
        if group is None:
            return
        group.discard(waiter)
        if not group:
            del self._waiters[waiter.channel]
            if self._conn is not None:
                await self._send("UNSUBSCRIBE", waiter.channel)

    async def watch(self, watch: _PatternWatch) -> None:
        """Subscribe to ``watch.pattern`` (ref-counted); it counts once Redis confirmed it
        (``watch.subscribed``, ``on_subscribed``)."""
        group = self._patterns.setdefault(watch.pattern, set())
        group.add(watch)
        if len(group) > 1:
            if any(other.subscribed for other in group if other is not watch):
                watch.subscribed, watch.epoch = True, 1
        elif self._conn is not None:
            await self._send("PSUBSCRIBE", watch.pattern)

    async def unwatch(self, watch: _PatternWatch) -> None:
        group = self._patterns.get(watch.pattern)
        if group is None or watch not in group:
            return
        group.discard(watch)
        watch.subscribed = False
        if not group:
            del self._patterns[watch.pattern]
            if self._conn is not None:
                await self._send("PUNSUBSCRIBE", watch.pattern)

    async def _send(self, *args: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await conn.send_command(*args)
        except TimeoutError:  # a stuck connection: drop it, the reader reconnects
            log.warning("event log: pub/sub %s got no answer within %.1fs; reconnecting",
                        args[0], self._send_timeout_s)
            if self._conn is conn:
                await self._drop()
        except _FAILURES as exc:  # the reader notices too, reconnects and subscribes anew
            log.debug("event log: pub/sub %s failed: %s", args[0], exc)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        for group in self._waiters.values():
            for waiter in group:
                waiter.subscribed = False
        for watches in self._patterns.values():
            for watch in watches:
                watch.subscribed = False
        if conn is not None:
            with contextlib.suppress(*_FAILURES):
                await conn.disconnect()

    async def _run(self) -> None:
        failures = 0
        while True:
            conn = self._connect()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                self._conn = conn  # from here a new channel is subscribed by register()
                async with asyncio.timeout(self._send_timeout_s):
                    if self._waiters:
                        await conn.send_command("SUBSCRIBE", *self._waiters)
                    if self._patterns:
                        await conn.send_command("PSUBSCRIBE", *self._patterns)
                if failures:
                    log.info("event log: pub/sub connection back after %d failures", failures)
                failures = 0
                while True:
                    self._dispatch(await conn.read_response(timeout=math.inf))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug too: reconnect, never die
                failures += 1
                self._stats.follower_reconnects += 1
                if not isinstance(exc, _FAILURES):
                    log.error("event log: the pub/sub reader failed; reconnecting",
                              exc_info=exc)
                elif failures == 1:
                    log.warning("event log: pub/sub connection lost: %s", exc)
            await self._drop()
            await asyncio.sleep(min(self._retry_max_s, self._retry_base_s * 2 ** (failures - 1)))

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, list) or len(message) < 3:
            return
        kind, channel = message[0], message[1]
        if kind in (b"pmessage", b"psubscribe", b"punsubscribe"):  # (pattern, channel, seq)
            self._dispatch_pattern(kind, message)
            return
        group = self._waiters.get(channel, ())
        if kind == b"message":
            try:
                seq = int(message[2])
            except ValueError:
                return
            for waiter in group:
                if seq > waiter.notified:
                    waiter.notified = seq
                    waiter.poke()
        elif kind == b"unsubscribe":  # a re-subscription follows; its confirmation re-reads
            for waiter in group:
                waiter.subscribed = False
        elif kind == b"subscribe":
            for waiter in group:
                if not waiter.subscribed:
                    waiter.subscribed = True
                    waiter.epoch += 1
                    waiter.poke()


    def _dispatch_pattern(self, kind: bytes, message: list[Any]) -> None:
        for watch in self._patterns.get(message[1], ()):
            if kind == b"pmessage" and len(message) >= 4:
                try:
                    seq = int(message[3])
                except ValueError:
                    return
                watch.on_message(message[2], seq)
            elif kind == b"psubscribe":
                if not watch.subscribed:
                    watch.subscribed = True
                    watch.epoch += 1
                    watch.on_subscribed()
            elif kind == b"punsubscribe":  # a re-subscription follows; its confirmation re-reads
                watch.subscribed = False


class RedisEventLog:
    """The Redis Streams event log: the owner's batched writer and followers anywhere.

    Args:
        url: ``redis://host:port/db`` (also ``rediss://``, ``unix://``).
        prefix: Put before every key and channel (``REDIS_PREFIX``), so deployments that
            share one Redis never see each other's turns (pub/sub ignores the db number).
        ttl_s: A finished turn's stream expires this long after its ``done``.
        live_ttl_s: A live turn's stream expiry, renewed by every append.
        retry_base_s / retry_max_s: The backoff of failed appends and reconnects.
        give_up_s: A finished turn still not fully appended this long after ``done`` is
            given up (logged, counted); the store still has it.
        ping_s: How often Redis's health (and ``run_id``, to notice restarts) is checked.
        batch_max: Most events of one turn in one append.
        timeout_s: Connect and command timeout of appends and reads.
        read_count: Most entries one ``XRANGE`` of a follower reads.
        lost_after_s: A follower whose stream vanished (after a reconnect) and is not
            re-filled within this long ends with :class:`EventLogError`.
        connection_class: The redis-py connection class (tests count round trips with it).
        max_connections: With it, commands wait (at most ``timeout_s``) for one of this many
            connections rather than failing when all are in use (redis-py's default pool
            fails past 100: the recorder follows every live turn at once).
    """

    def __init__(
        self, url: str, *, prefix: str, ttl_s: int = 3600, live_ttl_s: int = 86400,
        retry_base_s: float = 0.05, retry_max_s: float = 2.0, give_up_s: float = 300.0,
        ping_s: float = 1.0, batch_max: int = 512, timeout_s: float = 2.0, read_count: int = 512,
        lost_after_s: float = 5.0, connection_class: type[Connection] | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.live_ttl_s = live_ttl_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.give_up_s = give_up_s
        self.ping_s = ping_s
        self.batch_max = batch_max
        self.read_count = read_count
        self.lost_after_s = lost_after_s
        self.stats = EventLogStats()
        extra: dict[str, Any] = {}
        if connection_class is not None:
            extra["connection_class"] = connection_class
        # No retries inside redis-py: this class decides (backoff, repair, degraded state).
        if max_connections is not None:
            self.client: aioredis.Redis = aioredis.Redis.from_pool(  # closes the pool too
                aioredis.BlockingConnectionPool.from_url(
                    url, max_connections=max_connections, timeout=timeout_s,
                    socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                    retry=Retry(NoBackoff(), 0), **extra))
        else:
            self.client = aioredis.Redis.from_url(
                url, retry=Retry(NoBackoff(), 0), socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s, **extra,
            )
        pool_kwargs = dict(self.client.connection_pool.connection_kwargs)
        # RESP2 on the subscriber: pub/sub messages are plain replies to read, not pushes.
        pool_kwargs.update(socket_timeout=None, retry=Retry(NoBackoff(), 0), protocol=2)
        self._notifier = _Notifier(lambda: Connection(**pool_kwargs), retry_base_s=retry_base_s,
                                   retry_max_s=retry_max_s, stats=self.stats,
                                   send_timeout_s=timeout_s)
        self._turns: dict[str, _TurnLog] = {}
        self._wakeup = asyncio.Event()
        self._suspect = False  # check every live turn's stream on the next flush
        self._sha: str | None = None
        self._run_id: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.followers = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, max_connections: int | None = None
                      ) -> RedisEventLog:
        """The log client ``EVENT_LOG``/``REDIS_PREFIX`` and the ``EVENT_LOG_*`` settings
        describe (not started)."""
        return cls(
            settings.event_log, prefix=settings.redis_prefix, ttl_s=settings.event_log_ttl_s,
            live_ttl_s=settings.event_log_live_ttl_s,
            retry_base_s=settings.event_log_retry_base_s,
            retry_max_s=settings.event_log_retry_max_s, give_up_s=settings.event_log_give_up_s,
            ping_s=settings.event_log_ping_s, batch_max=settings.event_log_batch_max,
            timeout_s=settings.event_log_timeout_s, lost_after_s=settings.event_log_lost_s,
            max_connections=max_connections)

    @property
    def safe_url(self) -> str:
        """The URL without its password (for logs and ``/healthz``)."""
        scheme, sep, rest = self.url.partition("://")
        credentials, at, place = rest.rpartition("@")
        return f"{scheme}{sep}{'***@' if at else ''}{place}" if credentials or at else self.url

    # -- names ------------------------------------------------------------------------
    def key(self, request_id: str) -> str:
        """The stream of a request's events."""
        return f"{self.prefix}:req:{request_id}:events"

    def channel(self, request_id: str) -> str:
        """The pub/sub channel that announces a request's new seqs."""
        return f"{self.prefix}:req:{request_id}:notify"

    @property
    def turns_key(self) -> str:
        """The discovery stream: one entry per turn announced (``r`` = request id, ``m`` =
        its meta), read by the recorder's consumer group (:mod:`sinks.log_recorder`)."""
        return f"{self.prefix}:turns"

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start the flusher, the health monitor and the shared subscriber. Redis may be
        down: everything waits for it with backoff, the server starts anyway."""
        loop = asyncio.get_running_loop()
        self._notifier.start()
        self._tasks = [loop.create_task(self._flush_loop(), name="event-log-flusher"),
                       loop.create_task(self._monitor(), name="event-log-monitor")]

    async def aclose(self, *, timeout_s: float = 5.0) -> None:
        """Append what is still queued (within ``timeout_s``), then stop and disconnect."""
        deadline = time.monotonic() + timeout_s
        while self._has_work() and time.monotonic() < deadline and self.stats.reachable:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._has_work():
            log.warning("event log: closing with %d events not appended",
                        sum(len(t.pending) for t in self._turns.values()))
        for task in self._tasks:
            task.cancel()
        bound = max(1.0, timeout_s)
        try:  # bounded: a process's stop must not hang on Redis or redis-py
            async with asyncio.timeout(bound):
                for task in self._tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await self._notifier.aclose()
                await self.client.aclose()
        except TimeoutError:
            log.error("event log: disconnecting took over %.1fs; leaving the rest", bound)

    # -- the writer -------------------------------------------------------------------
    def writer(self, request_id: str, *, history: Callable[[], Sequence[Event]],
               meta: bytes | None = None) -> Observer[Event]:
        """An observer for one turn's numbered stream; ``history`` gives every event so far
        (the turn's ReplayLog items), from which a lost stream is re-filled. With ``meta``
        (what the recorder needs to know of the turn that no event carries, see
        :func:`sinks.recorder.turn_meta`) the turn is announced on :meth:`turns_key` with its
        first events."""
        turn = _TurnLog(request_id=request_id, key=self.key(request_id),
                        channel=self.channel(request_id), history=history, meta=meta or b"")
        self._turns[request_id] = turn
        return _TurnWriter(self, turn)

    async def appended(self, request_id: str, *, seq: int = 1, within: float) -> bool:
        """Wait (at most ``within`` seconds) until this process's turn has ``seq`` in its
        stream, so that any process asked next finds it (a background turn's ``202``).
        False when it did not happen in time (Redis away: the turn goes on regardless)."""
        turn = self._turns.get(request_id)
        if turn is None:  # not a turn of this process, or appended to its end already
            return True
        if turn.appended >= seq:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turn.watchers.append((seq, future))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), within)
        return turn.appended >= seq

    async def drained(self, *, within: float = 2.0) -> bool:
        """Wait (at most ``within`` seconds) until every event this process queued so far
        is in Redis, so a read answered from the log (the recorder) includes them; False
        when that did not happen in time."""
        goals = [(turn.request_id, turn.pending[-1][0])
                 for turn in self._turns.values() if turn.pending]
        deadline = time.monotonic() + within
        ok = True
        for request_id, seq in goals:
            ok = await self.appended(request_id, seq=seq,
                                     within=max(0.0, deadline - time.monotonic())) and ok
        return ok

    def _queue(self, turn: _TurnLog, event: Event) -> None:
        if turn.refused or turn.done_seq is not None:
            return
        turn.pending.append((event.seq, _dump(event)))
        if isinstance(event, Done):
            turn.done_seq = event.seq
            turn.done_at = time.monotonic()
        self._wakeup.set()

    def _close(self, turn: _TurnLog) -> None:
        """The turn's stream ended (normally after ``done``): once what was queued is in,
        this process forgets it."""
        if turn.done_seq is None:
            turn.done_seq = turn.pending[-1][0] if turn.pending else turn.appended
            turn.done_at = time.monotonic()
            if turn.appended >= turn.done_seq:
                self._turns.pop(turn.request_id, None)
                turn.settled(gone=True)
            self._wakeup.set()

    def _has_work(self) -> bool:
        return self._suspect or any(turn.pending for turn in self._turns.values())

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._has_work():
                if await self._flush_once():
                    failures = 0
                    continue
                failures += 1
                self._abandon_overdue()
                await asyncio.sleep(min(self.retry_max_s, self.retry_base_s * 2 ** (failures - 1)))

    async def _flush_once(self) -> bool:
        """Send one batch; False when Redis could not be reached (retry later)."""
        check_all, self._suspect = self._suspect, False
        batch = [turn for turn in self._turns.values() if turn.pending or check_all]
        if not batch:
            return True
        try:
            sha = self._sha or await self._load_script()
            pipe = self.client.pipeline(transaction=False)
            sent: list[int] = []
            for turn in batch:
                chunk = turn.pending[: self.batch_max]
                last = chunk[-1][0] if chunk else turn.appended
                ttl = self.ttl_s if turn.done_seq is not None and last == turn.done_seq else self.live_ttl_s
                first = chunk[0][0] if chunk else turn.appended + 1
                pipe.execute_command("EVALSHA", sha, 2, turn.key, self.turns_key, turn.channel,
                                     first, ttl, turn.request_id, turn.meta,
                                     *(payload for _, payload in chunk))
                sent.append(len(chunk))
            self.stats.batches += 1
            results = await pipe.execute(raise_on_error=False)
        except _FAILURES as exc:
            self._failed(exc, batch)
            return False
        reload = False
        failed: list[tuple[_TurnLog, BaseException]] = []
        for turn, count, result in zip(batch, sent, results, strict=True):
            if isinstance(result, NoScriptError):  # Redis restarted and forgot the script
                reload = True
            elif isinstance(result, BaseException):
                failed.append((turn, result))
            else:
                self._settle(turn, count, int(result[0]), int(result[1]))
        if reload:
            self._sha = None
            self._suspect = True
        self._reachable(True)
        for turn in batch:
            turn.settled()
        for turn in [t for t in self._turns.values() if self._finished(t)]:
            del self._turns[turn.request_id]
            turn.settled(gone=True)
        for turn, error in failed:  # an error answer (not a lost connection): back off too
            log.error("event log: appending to %s failed: %s", turn.key, error)
            self.stats.failed_batches += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"
            turn.uncertain = True
        return not failed

    async def _load_script(self) -> str:
        self._sha = str(await self.client.script_load(APPEND_SCRIPT))
        return self._sha

    def _settle(self, turn: _TurnLog, count: int, ok: int, last: int) -> None:
        if ok:
            del turn.pending[:count]
            self.stats.appended += last - turn.appended
            turn.appended = last
            turn.uncertain = False
        elif last <= turn.appended:
            # The stream lost entries (restart without persistence, expiry): re-fill it
            # from memory after its last seq (all of it when the key is gone).
            self._repair(turn, last)
        elif turn.uncertain:
            # Our own batch was applied but its answer was lost: adopt what is there.
            self.stats.appended += last - turn.appended
            turn.appended = last
            turn.pending = [(seq, payload) for seq, payload in turn.pending if seq > last]
            turn.uncertain = False
        else:
            turn.refused = True
            turn.pending.clear()
            self.stats.refused += 1
            self.stats.last_error = (f"stale writer refused: {turn.key} ends at seq {last}, "
                                     f"this writer at {turn.appended}")
            log.error("event log: %s; this process stops appending to it", self.stats.last_error)

    def _repair(self, turn: _TurnLog, last: int) -> None:
        events = [event for event in turn.history() if event.seq > last]
        turn.pending = [(event.seq, _dump(event)) for event in events]
        self.stats.repairs += 1
        self.stats.re_appended += max(0, turn.appended - last)
        log.warning("event log: %s ends at seq %d but %d were appended (Redis lost them?); "
                    "re-appending %d events from memory", turn.key, last, turn.appended,
                    len(turn.pending))
        turn.appended = last

    def _failed(self, exc: BaseException, turns: list[_TurnLog]) -> None:
        self.stats.failed_batches += 1
        for turn in turns:
            turn.uncertain = True
        self._suspect = True  # what else did we miss? check every live stream when back
        if self.stats.reachable or self.stats.last_error != f"{type(exc).__name__}: {exc}":
            log.warning("event log: append failed (%s); retrying with backoff", exc)
        self._reachable(False, exc)

    def _reachable(self, up: bool, exc: BaseException | None = None) -> None:
        if up and not self.stats.reachable:
            log.info("event log: Redis reachable again")
        self.stats.reachable = up
        if exc is not None:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"

    def _finished(self, turn: _TurnLog) -> bool:
        return turn.refused or (turn.done_seq is not None and turn.appended >= turn.done_seq)

    def _abandon_overdue(self) -> None:
        now = time.monotonic()
        for turn in list(self._turns.values()):
            if turn.done_seq is not None and now - turn.done_at > self.give_up_s:
                del self._turns[turn.request_id]
                turn.settled(gone=True)
                self.stats.abandoned += 1
                log.error("event log: gave up appending %s after %.0fs without Redis (%d events "
                          "not appended; the store has them)", turn.key, now - turn.done_at,
                          len(turn.pending))

    async def _monitor(self) -> None:
        """Ping Redis; a new ``run_id`` means it restarted: check every live stream."""
        while True:
            try:
                info = await self.client.info("server")
                run_id = str(info.get("run_id"))
                if self._run_id is not None and run_id != self._run_id:
                    log.warning("event log: Redis restarted (run_id changed); checking %d live "
                                "streams", len(self._turns))
                    self._suspect = True
                    self._sha = None
                    self._wakeup.set()
                if not self.stats.reachable:
                    self._suspect = True
                    self._wakeup.set()
                self._run_id = run_id
                self._reachable(True)
            except _FAILURES as exc:
                self._reachable(False, exc)
            await asyncio.sleep(self.ping_s)

    async def append_as_closer(self, request_id: str, events: Sequence[Event]) -> tuple[bool, int]:
        """Append a numbered run of events (a dead owner's closing events, :mod:`sinks.cluster`)
        through :data:`APPEND_SCRIPT`, as the turn's last ones (the finished expiry): only
        if the stream ends right before the first, so a second closer, or an owner still
        alive, is refused. Returns (appended, the stream's last seq).

        Raises:
            EventLogError: Redis could not be asked.
        """
        first = events[0].seq
        try:
            sha = self._sha or await self._load_script()
            try:
                answer = await self.client.evalsha(
                    sha, 2, self.key(request_id), self.turns_key, self.channel(request_id),
                    first, self.ttl_s, request_id, "", *(_dump(event) for event in events))
            except NoScriptError:
                sha = await self._load_script()
                answer = await self.client.evalsha(
                    sha, 2, self.key(request_id), self.turns_key, self.channel(request_id),
                    first, self.ttl_s, request_id, "", *(_dump(event) for event in events))
        except _FAILURES as exc:
            raise EventLogError(f"event log: appending to {self.key(request_id)} failed: {exc}"
                                ) from exc
        return bool(int(answer[0])), int(answer[1])

    async def read_all(self, request_id: str) -> list[Event]:
        """Every event of the request's stream, in order (empty when it does not exist).

        Raises:
            EventLogError: Redis could not be asked.
        """
        out: list[Event] = []
        last = 0
        try:
            while True:
                entries = _entries(await self.client.xrange(
                    self.key(request_id), f"({last}-0", "+", count=self.read_count))
                out.extend(EVENT_ADAPTER.validate_json(payload) for _, payload in entries)
                if len(entries) < self.read_count:
                    return out
                last = entries[-1][0]
        except _FAILURES as exc:
            raise EventLogError(f"event log: reading {self.key(request_id)} failed: {exc}") from exc

    # -- the reader -------------------------------------------------------------------
    async def head(self, request_id: str) -> StreamHead:
        """Whether the request's stream exists, its last seq, and whether that is ``done``.

        Raises:
            EventLogError: Redis could not be asked.
        """
        try:
            top = _entries(await self.client.xrevrange(self.key(request_id), "+", "-", count=1))
        except _FAILURES as exc:
            raise EventLogError(f"event log: reading {self.key(request_id)} failed: {exc}") from exc
        if not top:
            return StreamHead(exists=False)
        seq, payload = top[0]
        return StreamHead(exists=True, last_seq=seq,
                          done=isinstance(EVENT_ADAPTER.validate_json(payload), Done))

    async def follow(self, request_id: str, *, since: int = 0, idle_s: float | None = None,
                     gap_s: float = 0.0, hurry: asyncio.Event | None = None,
                     ) -> AsyncGenerator[Event | None]:
        """Every event after ``since`` in order, then the live tail, until ``done``.

        Use under ``contextlib.aclosing``. With ``idle_s``, ``None`` marks each silence of
        that length (heartbeats), also while Redis is unreachable: the follower waits for it
        and resumes from its last seq, without loss or repetition. With ``gap_s``, a
        follower that need not be prompt (the recorder) waits that long after each read
        before the next, so one read takes what arrived meanwhile rather than one round
        trip per event (a model stream at 20 tokens/s, read every 100 ms: a fifth of the
        reads); ``hurry`` set cuts the wait short (somebody waits for this turn).
        """
        key = self.key(request_id)
        waiter = await self._notifier.register(self.channel(request_id).encode())
        self.followers += 1
        last = since
        beat = None if idle_s is None else time.monotonic() + idle_s
        failures = 0
        doubt = False  # after a reconnect or a failed read: is the stream still there?
        lost_since: float | None = None
        epoch_seen = 0
        try:
            while True:
                if waiter.epoch != epoch_seen:
                    doubt = doubt or epoch_seen > 0  # re-subscribed after a lost connection
                    epoch_seen = waiter.epoch
                epoch = waiter.epoch
                timeout: float | None = None
                if waiter.subscribed:  # subscribed first, then read: no gap
                    try:
                        entries = _entries(await self.client.xrange(key, f"({last}-0", "+",
                                                                    count=self.read_count))
                        failures = 0
                    except _FAILURES as exc:
                        failures += 1
                        doubt = True
                        if failures == 1:
                            log.warning("event log: follower of %s: read failed: %s", key, exc)
                        entries = []
                        timeout = min(self.retry_max_s, self.retry_base_s * 2 ** (failures - 1))
                    if entries:
                        doubt, lost_since = False, None
                    elif doubt and not failures:
                        lost_since = await self._check_lost(key, lost_since)
                        if lost_since is None:
                            doubt = False
                        else:
                            timeout = self.ping_s
                    for seq, payload in entries:
                        if seq <= last:
                            continue
                        if seq != last + 1:
                            break  # a hole: the owner is re-filling the stream; read again
                        event = EVENT_ADAPTER.validate_json(payload)
                        last = seq
                        yield event
                        if isinstance(event, Done):
                            return
                        if idle_s is not None:
                            beat = time.monotonic() + idle_s
                    if len(entries) >= self.read_count:
                        continue
                    if gap_s > 0 and entries and not (hurry is not None and hurry.is_set()):
                        # What comes meanwhile goes in the next read.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(gap_s):
                                if hurry is None:
                                    await asyncio.Future()  # the gap itself
                                else:
                                    await hurry.wait()
                if beat is not None:
                    until_beat = max(0.0, beat - time.monotonic())
                    timeout = until_beat if timeout is None else min(timeout, until_beat)
                # Unsubscribed (Redis away), the seqs announced before say nothing to read
                # now: wait for the subscription (a new epoch), a newer seq or the timeout.
                # (Waiting on them returned at once, a spin that never yielded to the loop.)
                seen = last if waiter.subscribed else max(last, waiter.notified)
                await waiter.wait(last=seen, epoch=epoch, within=timeout)
                if beat is not None and time.monotonic() >= beat and idle_s is not None:
                    yield None
                    beat = time.monotonic() + idle_s
        finally:
            self.followers -= 1
            await self._notifier.unregister(waiter)

    async def _check_lost(self, key: str, lost_since: float | None) -> float | None:
        """None while the stream exists; else since when it is missing.

        Raises:
            EventLogError: missing for longer than ``lost_after_s``: Redis lost it and no
                owner re-filled it (the turn had finished, or its owner is gone). The
                client reconnects and is served from the store.
        """
        try:
            if await self.client.exists(key):
                return None
        except _FAILURES:
            return lost_since
        now = time.monotonic()
        if lost_since is None:
            return now
        if now - lost_since > self.lost_after_s:
            raise EventLogError(f"event log: {key} is gone from Redis and nobody re-filled it "
                                f"within {self.lost_after_s:.0f}s")
        return lost_since

    def live_reader(self, *, count: int = 128, streams_max: int = 256, gap_s: float = 0.0,
                    lost_after_s: float = 60.0) -> LiveReader:
        """A reader of many live turns at once (the recorder's): see :class:`LiveReader`."""
        return LiveReader(self, count=count, streams_max=streams_max, gap_s=gap_s,
                          lost_after_s=lost_after_s)

    @property
    def notify_pattern(self) -> bytes:
        """The ``PSUBSCRIBE`` pattern of every turn's channel under this prefix (the prefix's
        glob characters escaped)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}:req:*:notify".encode()

    # -- health -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The ``event_log`` part of ``/healthz``: ``state`` is ``degraded`` while Redis is
        unreachable (turns go on; appends wait and are retried)."""
        stats = self.stats
        return {
            "kind": "redis", "state": "ok" if stats.reachable else "degraded",
            "url": self.safe_url, "prefix": self.prefix, "live_streams": len(self._turns),
            "pending": sum(len(turn.pending) for turn in self._turns.values()),
            "appended": stats.appended, "batches": stats.batches,
            "failed_batches": stats.failed_batches, "repairs": stats.repairs,
            "re_appended": stats.re_appended, "refused": stats.refused,
            "abandoned": stats.abandoned, "followers": self.followers,
            "follower_reconnects": stats.follower_reconnects, "last_error": stats.last_error,
        }


@dataclasses.dataclass(eq=False, slots=True)
class _Feed:
    """One live turn in a :class:`LiveReader`."""

    request_id: str
    key: bytes
    channel: bytes
    last: int  # the last seq delivered
    notified: int = 0  # the highest seq announced
    want: bool = True  # read it whatever the notifications say (new, re-subscribed, more)
    doubt: bool = True  # is the stream there? asked when a read finds nothing
    not_before: float = 0.0  # (loop time) a hole or a missing stream: not read again before
    lost_since: float | None = None


@dataclasses.dataclass
class LiveBatch:
    """What one :meth:`LiveReader.read` brought: each turn's next events, in seq order (a
    turn whose last is ``done`` has left the reader), and the turns whose stream is lost
    (gone from Redis for ``lost_after_s``; they have left the reader too)."""

    events: list[tuple[str, list[Event]]]
    lost: list[tuple[str, str]]


class LiveReader:
    """Many live turns' streams read together: one ``XREAD`` per round trip for every turn
    that has news, woken by one pattern subscription to every turn's notifications.

    What :meth:`RedisEventLog.follow` is for one turn, for hundreds at once, without a
    subscription, a task and a round trip per turn per wake-up (the recorder follows every
    live turn of every worker). The same guarantees:

    * subscribed first, then read: a turn's first read waits for the pattern subscription's
      confirmation, so an append is either in what a read returns or announced after it; when
      the subscription comes back after an outage every turn is read again (and its stream's
      existence doubted);
    * each turn's events in seq order, each once: a read starts after the last seq
      delivered, a hole (the owner re-filling the stream) ends that turn's part of the read
      and it is read again shortly;
    * a stream that is missing (at its first read, or after an outage or a failed read) and
      stays missing ``lost_after_s`` is reported lost, not waited for forever.

    Args:
        count: Most entries of one turn in one read (``XREAD … COUNT``); a turn that got that
            many is read again at once.
        streams_max: Most turns' streams in one ``XREAD``; more turns with news wait for
            the next read (turn by turn, in the order their news came).
        gap_s: After a read that brought events, the next read waits this long, so one read
            takes what every turn appended meanwhile; a hurried turn (:meth:`hurry`) with
            news cuts it short.
        lost_after_s: How long a missing stream is waited for.
    """

    def __init__(self, log_: RedisEventLog, *, count: int, streams_max: int, gap_s: float,
                 lost_after_s: float) -> None:
        self._log = log_
        self.count = count
        self.streams_max = streams_max
        self.gap_s = gap_s
        self.lost_after_s = lost_after_s
        self._feeds: dict[str, _Feed] = {}
        self._by_key: dict[bytes, _Feed] = {}
        self._by_channel: dict[bytes, _Feed] = {}
        self._dirty: dict[str, _Feed] = {}  # turns to read, in the order their news came
        self._hurried: dict[str, int] = {}  # request id → how many wait for it
        self._wake = asyncio.Event()
        self._next_at = 0.0  # (loop time) the gap: no read before, unless hurried
        self._watch = _PatternWatch(log_.notify_pattern, self._notified, self._resubscribed)
        self.reads = 0  # round trips (XREADs), for the tests and the bench

    async def start(self) -> None:
        """Subscribe to every turn's notifications (the log must be started)."""
        await self._log._notifier.watch(self._watch)

    async def aclose(self) -> None:
        await self._log._notifier.unwatch(self._watch)
        self._feeds.clear()
        self._by_key.clear()
        self._by_channel.clear()
        self._dirty.clear()

    def __len__(self) -> int:
        return len(self._feeds)

    @property
    def subscribed(self) -> bool:
        return self._watch.subscribed

    def add(self, request_id: str, *, since: int) -> None:
        """Read ``request_id``'s events after ``since`` (until its ``done``)."""
        if request_id in self._feeds:
            return
        key, channel = self._log.key(request_id).encode(), self._log.channel(request_id).encode()
        feed = _Feed(request_id, key, channel, last=since)
        self._feeds[request_id] = self._by_key[key] = self._by_channel[channel] = feed
        self._dirty[request_id] = feed
        self._wake.set()

    def discard(self, request_id: str) -> None:
        feed = self._feeds.pop(request_id, None)
        if feed is not None:
            del self._by_key[feed.key], self._by_channel[feed.channel]
            self._dirty.pop(request_id, None)

    def hurry(self, request_id: str, waiting: bool = True) -> None:
        """Somebody waits for ``request_id`` (``waiting=False``: one waiter less): its news
        is read without waiting for the gap."""
        count = self._hurried.get(request_id, 0) + (1 if waiting else -1)
        if count > 0:
            self._hurried[request_id] = count
            self._wake.set()
        else:
            self._hurried.pop(request_id, None)

    # -- notifications ----------------------------------------------------------------
    def _notified(self, channel: bytes, seq: int) -> None:
        feed = self._by_channel.get(channel)
        if feed is None or seq <= feed.notified:
            return  # a turn not (or no longer) read here: its first read finds it all
        feed.notified = seq
        if seq > feed.last and feed.request_id not in self._dirty:
            self._dirty[feed.request_id] = feed
            self._wake.set()

    def _resubscribed(self) -> None:
        again = self._watch.epoch > 1  # what was published while unsubscribed is unheard of
        for feed in self._feeds.values():
            feed.want = True
            feed.doubt = feed.doubt or again
            feed.not_before = 0.0
            self._dirty[feed.request_id] = feed
        self._wake.set()

    # -- reading ----------------------------------------------------------------------
    async def read(self) -> LiveBatch:
        """Wait until some turn has news, then read every turn with news (up to
        ``streams_max``) in one ``XREAD``.

        Raises:
            RedisError, OSError: Redis failed; the turns of that read are read again (their
                streams doubted) on the next call, which the caller makes after a backoff.
        """
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = loop.time()
            due, wait = self._due(now)
            if due:
                break
            timer = None if wait is None else loop.call_later(wait, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        for feed in due:
            del self._dirty[feed.request_id]
        try:
            self.reads += 1
            reply = await self._log.client.xread(
                {f.key: f"{f.last}-0" for f in due}, count=self.count)
        except BaseException:
            for feed in due:
                feed.want = feed.doubt = True
                self._dirty.setdefault(feed.request_id, feed)
            raise
        batch, empty = self._deliver(due, reply, loop.time())
        if empty:  # (never raises: the events delivered above must reach the caller)
            batch.lost.extend(await self._check(empty, loop.time()))
        for feed in due:
            if self._feeds.get(feed.request_id) is feed and (feed.want
                                                              or feed.notified > feed.last):
                self._dirty.setdefault(feed.request_id, feed)
        if batch.events and self.gap_s > 0:
            self._next_at = loop.time() + self.gap_s
        return batch

    def _due(self, now: float) -> tuple[list[_Feed], float | None]:
        """The turns to read now (at most ``streams_max``), or how long until one may be
        (None: until news)."""
        if not self._watch.subscribed or not self._dirty:
            return [], None
        if now < self._next_at and not any(rid in self._dirty for rid in self._hurried):
            return [], self._next_at - now
        due: list[_Feed] = []
        wait: float | None = None
        for request_id, feed in list(self._dirty.items()):
            if not (feed.want or feed.notified > feed.last):
                del self._dirty[request_id]
            elif feed.not_before > now:
                wait = feed.not_before - now if wait is None else min(wait, feed.not_before - now)
            else:
                due.append(feed)
                if len(due) >= self.streams_max:
                    break
        return due, (None if due else wait)

    def _deliver(self, due: list[_Feed], reply: Any, now: float
                 ) -> tuple[LiveBatch, list[_Feed]]:
        batch = LiveBatch(events=[], lost=[])
        got: dict[bytes, list[Any]] = dict(reply.items() if isinstance(reply, dict)
                                           else (reply or ()))
        empty: list[_Feed] = []
        for feed in due:
            entries = got.get(feed.key)
            if not entries:
                feed.want = False
                if feed.doubt:
                    empty.append(feed)
                continue
            feed.doubt, feed.lost_since = False, None
            feed.want = len(entries) >= self.count  # more where these came from
            events: list[Event] = []
            for entry_id, fields in entries:
                seq = int(bytes(entry_id).partition(b"-")[0])
                if seq <= feed.last:
                    continue
                if seq != feed.last + 1:  # a hole: the owner is re-filling; read again soon
                    feed.want = True
                    feed.not_before = now + self._log.retry_base_s
                    break
                event = EVENT_ADAPTER.validate_json(fields[b"e"])
                feed.last = seq
                events.append(event)
                if isinstance(event, Done):
                    self.discard(feed.request_id)
                    break
            if events:
                batch.events.append((feed.request_id, events))
        return batch, empty

    async def _check(self, feeds: list[_Feed], now: float) -> list[tuple[str, str]]:
        """Turns whose read found nothing while their stream was doubted: is it there?"""
        pipe = self._log.client.pipeline(transaction=False)
        for feed in feeds:
            pipe.exists(feed.key)
        try:
            answers = await pipe.execute()
        except _FAILURES as exc:  # asked again after a while
            log.debug("event log: checking %d streams failed: %s", len(feeds), exc)
            for feed in feeds:
                feed.want = True
                feed.not_before = now + self._log.retry_max_s
            return []
        lost = []
        for feed, exists in zip(feeds, answers, strict=True):
            if self._feeds.get(feed.request_id) is not feed:
                continue
            if exists:
                feed.doubt, feed.lost_since = False, None
                continue
            feed.lost_since = feed.lost_since or now
            if now - feed.lost_since >= self.lost_after_s:
                self.discard(feed.request_id)
                lost.append((feed.request_id, f"{feed.key.decode()} is gone from Redis and "
                             f"nobody re-filled it within {self.lost_after_s:g}s"))
            else:  # the owner may be re-filling it: look again in a while
                feed.want = True
                feed.not_before = now + min(self._log.ping_s, self.lost_after_s)
        return lost


def _entries(raw: Any) -> list[tuple[int, bytes]]:
    """``XRANGE``/``XREVRANGE`` entries as ``(seq, payload)``."""
    return [(int(bytes(entry_id).partition(b"-")[0]), fields[b"e"]) for entry_id, fields in raw or ()]

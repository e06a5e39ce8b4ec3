"""The log recorder (issue 13): the one process that writes the DuckDB store, fed from Redis.

DuckDB allows one writing process. With ``EVENT_LOG=redis://…`` and several workers, the
workers never open the file: each announces its turns on the discovery stream
(``<prefix>:turns``, see :data:`sinks.event_log.APPEND_SCRIPT`), and this recorder drains it::

    XGROUP CREATE <prefix>:turns recorder $ MKSTREAM      once (BUSYGROUP: it exists)
    XREADGROUP GROUP recorder <consumer> STREAMS … 0      first its own pending entries,
    XAUTOCLAIM … <claim idle>                             then those of a dead consumer,
    XREADGROUP GROUP recorder <consumer> BLOCK … >        then new turns

For each announced turn it reads what the store already has (after a restart: the turn's
events up to some seq N), rebuilds the turn's state from them
(:meth:`sinks.recorder.TurnRecorder.resume`), reads the turn's stream from N and feeds every
event through the same :class:`~sinks.recorder.TurnRecorder` the single process uses: the
same ``events``, ``requests``, ``messages`` and ``tool_executions`` rows. Every live turn is
read by one :class:`~sinks.event_log.LiveReader`: one pattern subscription hears every turn's
notifications, and one ``XREAD`` (``RECORDER_READ_STREAMS`` streams, ``RECORDER_READ_COUNT``
entries each) reads every turn with news, so hundreds of live turns cost one round trip and
one wake-up per read, not one per turn. It ``XACK`` s (and deletes) the turn's discovery entries only once
the turn's ``done`` and every row derived from it are committed (a store flush barrier).

At-least-once delivery, exactly-once rows: events are keyed by ``(request_id, seq)`` (the
store's insert falls back to ``INSERT OR IGNORE`` when a batch holds a row it has) and the
other rows are upserts by key, so a turn recorded twice (a restart between the commit and
the ``XACK``, a repair that announced it twice) writes the same rows. Killing the recorder
loses nothing: its pending entries are re-read when it starts again.

Read-your-writes for the workers (:meth:`LogRecorder.sync`): a worker's ``done`` waits until
the recorder has committed the turn's events (its durability barrier), and reads (memory,
status, replays) first wait until the recorder has caught up with what the log holds now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError, ResponseError

from core.errors import StoreError
from core.events import Done, Event
from sinks.event_log import RedisEventLog
from sinks.recorder import TurnRecorder, context_of
from sinks.recovery import close_interrupted
from sinks.store import EventStore

log = logging.getLogger(__name__)

_FAILURES = (RedisError, OSError)


@dataclasses.dataclass
class RecorderStats:
    """Counters for ``/healthz``, the tests and the bench."""

    discovered: int = 0  # discovery entries read (re-deliveries included)
    turns_recorded: int = 0  # turns whose done was committed and acknowledged
    events_recorded: int = 0  # events fed to the store from the log
    resumed: int = 0  # turns taken up with some of their events already stored
    redelivered: int = 0  # entries read again (own pending on start, or claimed)
    lost: int = 0  # turns whose stream vanished: closed as interrupted
    reachable: bool = True
    last_error: str | None = None


@dataclasses.dataclass(eq=False)
class _Followed:
    """One turn being recorded."""

    request_id: str
    conversation_id: str
    entries: list[bytes]
    recorded: int = 0  # the last seq handed to the store
    done: bool = False
    progress: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    recorder: TurnRecorder | None = None  # while its events are read (the reader feeds it)
    finished: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # read to its end
    lost: str | None = None  # why its stream is lost (the reader gave up on it)
    failed: BaseException | None = None  # recording one of its events failed

    def advanced(self) -> None:
        self.progress.set()
        self.progress = asyncio.Event()


class LogRecorder:
    """Drains the discovery stream and records every turn into ``store``.

    Args:
        event_log: The Redis log (started by the caller; its follower side is used).
        store: The open event store (this process is its only writer).
        group / consumer: The consumer group and this recorder's name in it. The name must
            stay the same across restarts, so a restarted recorder finds its own pending
            entries (``RECORDER_CONSUMER``).
        block_ms: How long one ``XREADGROUP`` waits for new turns.
        read_count: Most discovery entries one ``XREADGROUP`` takes.
        live_count / live_streams: Most entries of one live turn, and most live turns, that
            one read of the live turns' streams takes (``RECORDER_READ_COUNT``,
            ``RECORDER_READ_STREAMS``).
        claim_idle_s: Entries of another consumer idle this long are claimed on start.
        lost_s: A turn whose stream is missing this long (Redis lost it, and no owner
            re-filled it) is closed in the store as interrupted, as start-up recovery does.
        retry_max_s: The longest wait between retries while Redis or the store fail.
        sync_timeout_s: How long :meth:`sync` waits by default.
        read_gap_s: The live turns are read at most this often (``RECORDER_READ_GAP_S``);
            a turn somebody waits for (:meth:`sync`) cuts it short.
    """

    def __init__(self, event_log: RedisEventLog, store: EventStore, *, group: str = "recorder",
                 consumer: str = "recorder", block_ms: int = 1000, read_count: int = 64,
                 claim_idle_s: float = 30.0, lost_s: float = 60.0, retry_max_s: float = 2.0,
                 sync_timeout_s: float = 10.0, read_gap_s: float = 0.0, live_count: int = 128,
                 live_streams: int = 256) -> None:
        self.log = event_log
        self.read_gap_s = read_gap_s
        self.reader = event_log.live_reader(count=live_count, streams_max=live_streams,
                                            gap_s=read_gap_s, lost_after_s=lost_s)
        self.store = store
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.read_count = read_count
        self.claim_idle_s = claim_idle_s
        self.lost_s = lost_s
        self.retry_max_s = retry_max_s
        self.sync_timeout_s = sync_timeout_s
        self.stats = RecorderStats()
        self.key = event_log.turns_key
        self._followed: dict[str, _Followed] = {}
        self._task: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # own pending entries re-read
        self._touched = time.monotonic()
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start draining (Redis may be down: it waits for it with backoff)."""
        loop = asyncio.get_running_loop()
        await self.reader.start()
        self._reading = loop.create_task(self._read_live(), name="log-recorder-reader")
        self._task = loop.create_task(self._run(), name="log-recorder")

    async def aclose(self, *, drain_s: float = 5.0) -> None:
        """Stop: first record what the log holds now of the turns being recorded (at most
        ``drain_s``), then stop where they are: a live turn's entry stays pending and is
        taken up by the next start; what was handed to the store stays queued there."""
        if self._task is not None:
            # Not cancelled inside a blocked XREADGROUP (redis-py can hang cancelling a
            # shared client's blocking read): it ends after its read, within block_ms.
            self._stopping = True
            done, _ = await asyncio.wait([self._task], timeout=self.block_ms / 1000 + 5)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._followed and drain_s > 0 and self._ready.is_set():
            try:
                await self.sync(timeout_s=drain_s)
            except StoreError as exc:
                log.warning("recorder: stopping before the log was caught up with: %s", exc)
        tasks = [t for t in (f.task for f in self._followed.values()) if t]
        if self._reading is not None:
            tasks.append(self._reading)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._followed.clear()
        await self.reader.aclose()

    async def ready(self, timeout_s: float = 10.0) -> bool:
        """Wait until the pending entries of the last run are being recorded again."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._ready.is_set()

    @property
    def live_turns(self) -> int:
        return len(self._followed)

    def health(self) -> dict[str, Any]:
        """The ``recorder`` part of the recorder's ``/healthz``."""
        stats = self.stats
        return {"state": "ok" if stats.reachable else "degraded", "group": self.group,
                "consumer": self.consumer, "live_turns": len(self._followed),
                "live_reads": self.reader.reads,
                **{k: v for k, v in dataclasses.asdict(stats).items() if k != "reachable"}}

    # -- draining the discovery stream ------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        phase = "pending"
        while not self._stopping:
            try:
                if phase == "pending":
                    await self._create_group()
                    await self._read_pending()
                    await self._claim_dead()
                    phase = "new"
                    self._ready.set()
                await self._read_new()
                await self._touch()
                failures = 0
                self._reachable(True)
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                failures += 1
                if "NOGROUP" in str(exc):  # Redis restarted empty: the group is gone too
                    log.warning("recorder: the group %r on %s is gone (Redis restarted?); "
                                "creating it again", self.group, self.key)
                    phase = "pending"
                elif failures == 1:
                    log.warning("recorder: reading %s failed (%s); retrying", self.key, exc)
                self._reachable(False, exc)
                await asyncio.sleep(min(self.retry_max_s, 0.05 * 2 ** (failures - 1)))
            except Exception:  # never let the recorder die: log, back off, go on
                log.exception("recorder: draining %s failed; going on", self.key)
                await asyncio.sleep(self.retry_max_s)

    async def _create_group(self) -> None:
        try:
            await self.log.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            log.info("recorder: created group %r on %s", self.group, self.key)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_pending(self) -> None:
        """Entries this consumer read before it stopped, not acknowledged: again."""
        start = "0"
        while True:
            reply = await self.log.client.xreadgroup(
                self.group, self.consumer, {self.key: start}, count=self.read_count)
            entries = _stream_entries(reply)
            if not entries:
                return
            self.stats.redelivered += len(entries)
            for entry_id, fields in entries:
                await self._discovered(entry_id, fields)
            start = entries[-1][0].decode()

    async def _claim_dead(self) -> None:
        """Entries of another consumer (a recorder that died under another name)."""
        start = "0-0"
        while True:
            reply = await self.log.client.xautoclaim(
                self.key, self.group, self.consumer, min_idle_time=int(self.claim_idle_s * 1000),
                start_id=start, count=self.read_count)
            start = bytes(reply[0]).decode()
            entries = [(bytes(entry_id), fields) for entry_id, fields in reply[1] or ()]
            self.stats.redelivered += len(entries)
            for entry_id, fields in entries:
                await self._discovered(entry_id, fields)
            if start == "0-0":
                return

    async def _touch(self) -> None:
        """Reset the idle time of the entries of the turns being recorded (``XCLAIM …
        JUSTID`` to this consumer), so that a long live turn's entry never looks abandoned
        to another recorder's ``XAUTOCLAIM``."""
        now = time.monotonic()
        if not self._followed or now - self._touched < self.claim_idle_s / 3:
            return
        self._touched = now
        entries: list[Any] = [entry for f in self._followed.values() for entry in f.entries]
        await self.log.client.xclaim(self.key, self.group, self.consumer, min_idle_time=0,
                                     message_ids=entries, justid=True)

    async def _read_new(self) -> None:
        reply = await self.log.client.xreadgroup(
            self.group, self.consumer, {self.key: ">"}, count=self.read_count,
            block=self.block_ms)
        for entry_id, fields in _stream_entries(reply):
            await self._discovered(entry_id, fields)

    async def _discovered(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        if self._stopping:  # read while stopping: pending, re-read on the next start
            return
        self.stats.discovered += 1
        if not fields or b"r" not in fields:  # deleted meanwhile, or not ours: nothing to do
            await self._ack([entry_id])
            return
        request_id = fields[b"r"].decode()
        followed = self._followed.get(request_id)
        if followed is not None:  # announced again (a repair): one recording answers both
            followed.entries.append(entry_id)
            return
        try:
            ctx, started_at = context_of(fields.get(b"m", b""))
        except ValueError as exc:
            log.error("recorder: the discovery entry %s of %s is unusable (%s); dropped",
                      entry_id.decode(), request_id, exc)
            await self._ack([entry_id])
            return
        followed = _Followed(request_id, ctx.conversation_id, [entry_id])
        self._followed[request_id] = followed
        recorder = TurnRecorder(ctx, store=self.store, started_at=started_at)
        followed.task = asyncio.get_running_loop().create_task(
            self._record_turn(followed, recorder), name=f"record-{request_id}")

    # -- recording one turn -----------------------------------------------------------
    async def _record_turn(self, followed: _Followed, recorder: TurnRecorder) -> None:
        request_id = followed.request_id
        try:
            stored = await self._stored(request_id)
            if stored:
                self.stats.resumed += 1
                log.info("recorder: taking %s up after seq %d (stored by an earlier run)",
                         request_id, stored[-1].seq)
                recorder.resume(stored)
                followed.recorded = stored[-1].seq
                followed.done = isinstance(stored[-1], Done)
                followed.advanced()
            else:
                recorder.start()
            if not followed.done:
                await self._follow(followed, recorder)
                if followed.failed is not None:
                    raise followed.failed
                if followed.lost is not None:
                    await self._close_lost(followed, followed.lost)
            await self._commit(request_id)
            await self._ack(followed.entries)
            self.stats.turns_recorded += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recorder: recording %s failed; its entry stays pending (re-read on "
                          "the next start)", request_id)
        finally:
            if self._followed.get(request_id) is followed:
                del self._followed[request_id]
            followed.done = True
            followed.advanced()

    async def _stored(self, request_id: str) -> list[Event]:
        """The turn's events the store has (an earlier run of this recorder wrote them).

        No flush first: rows of an earlier recording of the turn in this run were
        committed before it ended (a turn is recorded by one task at a time). A turn
        without a ``requests`` row (a point lookup on its key, where reading its events is
        a scan) counts as new: its row is written with its first events, and should a crash
        have kept events without it, they are written again and ignored as duplicates."""
        while True:
            try:
                if await self.store.request_row(request_id) is None:
                    return []
                return [event async for event in self.store.events_since(request_id, 0)]
            except StoreError as exc:
                log.warning("recorder: reading %s from the store failed (%s); retrying",
                            request_id, exc)
                await asyncio.sleep(self.retry_max_s)

    async def _follow(self, followed: _Followed, recorder: TurnRecorder) -> None:
        """Until the turn's events after what is recorded are fed, up to ``done`` (or its
        stream is lost, or recording failed): the live reader (:meth:`_read_live`) feeds
        them."""
        followed.recorder = recorder
        self.reader.add(followed.request_id, since=followed.recorded)
        try:
            await followed.finished.wait()
        finally:
            followed.recorder = None
            self.reader.discard(followed.request_id)

    async def _read_live(self) -> None:
        """Read every live turn's news (one round trip per read) and feed each turn's
        recorder, in seq order; retried with backoff while Redis fails."""
        failures = 0
        while True:
            try:
                batch = await self.reader.read()
                failures = 0
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                failures += 1
                if failures == 1:
                    log.warning("recorder: reading the live turns failed (%s); retrying", exc)
                self._reachable(False, exc)
                await asyncio.sleep(min(self.retry_max_s, 0.05 * 2 ** (failures - 1)))
                continue
            except Exception:  # never let the reader die: log, back off, go on
                log.exception("recorder: reading the live turns failed; going on")
                await asyncio.sleep(self.retry_max_s)
                continue
            for request_id, events in batch.events:
                followed = self._followed.get(request_id)
                if followed is not None and followed.recorder is not None:
                    self._feed(followed, followed.recorder, events)
            for request_id, why in batch.lost:
                followed = self._followed.get(request_id)
                if followed is not None and followed.recorder is not None:
                    followed.lost = why
                    followed.finished.set()

    def _feed(self, followed: _Followed, recorder: TurnRecorder, events: list[Event]) -> None:
        try:
            for event in events:
                recorder.on_next(event)
                self.stats.events_recorded += 1
                followed.recorded = event.seq
                if isinstance(event, Done):
                    followed.done = True
                    followed.finished.set()
        except Exception as exc:  # this turn only: its task logs it, its entry stays pending
            followed.failed = exc
            followed.finished.set()
            self.reader.discard(followed.request_id)
        followed.advanced()

    async def _close_lost(self, followed: _Followed, why: str) -> None:
        """The log lost the turn (its owner gone too): close it as start-up recovery does."""
        self.stats.lost += 1
        log.error("recorder: %s: its stream is lost (%s); closing it as interrupted",
                  followed.request_id, why)
        await self.store.flush(request_id=followed.request_id)
        await close_interrupted(self.store, followed.request_id)
        followed.done = True

    async def _commit(self, request_id: str) -> None:
        """Until the turn's rows are all on disk (retried while the store cannot write).

        With the store's next write, not one of its own (``wake=False``): only the
        acknowledgement waits for it, and a write per turn was about 4 ms of DuckDB's CPU
        (the recorder writes every turn of every worker). Who needs the turn on disk sooner
        asks :meth:`sync`, which writes at once."""
        while True:
            try:
                await self.store.flush(request_id=request_id, wake=False)
                return
            except StoreError as exc:
                if "could not be written" in str(exc):  # dead letters: kept, counted, final
                    log.error("recorder: %s: %s", request_id, exc)
                    return
                log.warning("recorder: committing %s failed (%s); retrying", request_id, exc)
                await asyncio.sleep(self.retry_max_s)

    async def _ack(self, entries: list[bytes]) -> None:
        """Acknowledge (then delete: nobody else reads the discovery stream) ``entries``."""
        while True:
            try:
                pipe = self.log.client.pipeline(transaction=True)
                pipe.xack(self.key, self.group, *entries)
                pipe.xdel(self.key, *entries)
                await pipe.execute()
                return
            except _FAILURES as exc:  # not acknowledged: re-read later, rows written again
                self._reachable(False, exc)
                await asyncio.sleep(self.retry_max_s)

    def _reachable(self, up: bool, exc: BaseException | None = None) -> None:
        self.stats.reachable = up
        if exc is not None:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"

    # -- read-your-writes for the workers ---------------------------------------------
    async def sync(self, *, request_id: str | None = None, seq: int | None = None,
                   conversation_id: str | None = None, events_only: bool = False,
                   timeout_s: float | None = None) -> None:
        """Return once what the log holds now is committed to the store.

        ``request_id`` (with ``seq``: up to that seq, even if the turn has not been
        announced yet): that turn; ``conversation_id``: the turns of that conversation
        being recorded; neither: every turn being recorded. Then a store barrier
        (``events_only``: the events, not the derived rows).

        Raises:
            StoreError: not within ``timeout_s`` (default ``sync_timeout_s``), or the store
                could not write.
        """
        timeout = self.sync_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        if not await self.ready(timeout):
            raise StoreError(f"the recorder has not caught up with the log within {timeout:g}s")
        if request_id is not None:
            targets: Iterable[str] = [request_id]
        elif conversation_id is not None:
            targets = [f.request_id for f in self._followed.values()
                       if f.conversation_id == conversation_id]
        else:
            targets = list(self._followed)
        targets = list(targets)
        if seq is not None and request_id is not None:
            goals = [seq]
        else:
            goals = await self._heads(targets)
        for target, goal in zip(targets, goals, strict=True):
            await self._caught_up(target, goal, deadline)
        remaining = max(0.001, deadline - time.monotonic())
        await self.store.flush(request_id=request_id, events_only=events_only,
                               timeout_s=remaining)

    async def _heads(self, request_ids: list[str]) -> list[int]:
        """The last seq of each turn's stream now (0 when it has none), in one round trip."""
        if not request_ids:
            return []
        try:
            pipe = self.log.client.pipeline(transaction=False)
            for request_id in request_ids:
                pipe.xrevrange(self.log.key(request_id), "+", "-", count=1)
            replies = await pipe.execute()
        except _FAILURES as exc:
            raise StoreError(f"the recorder cannot read the log: {exc}") from exc
        return [int(bytes(top[0][0]).partition(b"-")[0]) if top else 0 for top in replies]

    async def _caught_up(self, request_id: str, goal: int, deadline: float) -> None:
        """Until ``request_id`` is recorded up to ``goal`` (or finished); its news is read at
        once meanwhile (no ``read_gap_s``)."""
        self.reader.hurry(request_id)
        try:
            await self._wait_recorded(request_id, goal, deadline)
        finally:
            self.reader.hurry(request_id, False)

    async def _wait_recorded(self, request_id: str, goal: int, deadline: float) -> None:
        while True:
            followed = self._followed.get(request_id)
            if followed is not None:
                if followed.recorded >= goal or followed.done:
                    return
                progress = followed.progress
            elif goal == 0 or await self._stored_seq(request_id) >= goal:
                return
            else:
                progress = None  # not announced yet: the next XREADGROUP brings it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreError(f"the recorder has not recorded {request_id} up to seq {goal} "
                                 "in time (is the log reachable?)")
            if progress is None:
                await asyncio.sleep(min(0.01, remaining))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(progress.wait(), remaining)

    async def _stored_seq(self, request_id: str) -> int:
        """The last seq stored of a turn not being recorded: a finished turn's ``requests``
        row says it (a point lookup); otherwise its events are counted (a scan)."""
        row = await self.store.request_row(request_id)
        if row is None:
            return 0
        if row["status"] != "running" and row["last_seq"] is not None:
            return int(row["last_seq"])
        rows = await self.store.aquery(
            "SELECT coalesce(max(seq), 0) FROM events WHERE request_id = ?", [request_id])
        return int(rows[0][0])


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of the one stream an ``XREADGROUP`` read (RESP2: ``[[key, entries]]``)."""
    if not reply:
        return []
    return [(bytes(entry_id), fields) for entry_id, fields in reply[0][1] or ()]

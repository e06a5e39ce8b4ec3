"""The worker role's store (issue 13): the recorder process's store, over its internal API.

A worker never opens the DuckDB file. What it needs from the store (conversation memory,
request status, finished replays, the durability barrier of ``done``) it asks the
recorder (:mod:`sinks.recorder_api`) on loopback. The worker's own writes do not come here:
they are the turn's events in the Redis log, which the recorder drains.

Failures are reported, never turned into success: a recorder that cannot be reached, or
that answers with an error, raises :class:`RecorderUnavailableError` (a
:class:`~core.errors.StoreError`, so the API answers 503 as for a local store that cannot
serve), and :meth:`RemoteStore.health` says ``writable: false`` (``/healthz`` degraded)
until the recorder answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import duckdb

from core.errors import StoreError
from core.events import EVENT_ADAPTER, Event
from sinks.event_log import RedisEventLog
from sinks.query import QueryAnswer, QueryError
from sinks.responses_table import ResponseRecord, ResponsesTable
from sinks.store import StoreHealth, StoreStats

log = logging.getLogger(__name__)

_DT = "$dt"


class RecorderUnavailableError(StoreError):
    """The recorder could not be reached, or could not serve the request.

    Attributes:
        status: The recorder's answer's HTTP status when it answered with an error (500: it
            failed the request), None when it could not be reached.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def encode(value: Any) -> Any:
    """JSON for the internal API: datetimes tagged, so they come back as datetimes."""
    if isinstance(value, datetime.datetime):
        return {_DT: value.isoformat()}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    return value


def _decode_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _DT in obj:
        return datetime.datetime.fromisoformat(obj[_DT])
    return obj


def decode(text: str | bytes) -> Any:
    """The inverse of :func:`encode` (after ``json.dumps``)."""
    return json.loads(text, object_hook=_decode_hook)


#: The recorder's one route that needs no key (what its answer says of a key: nothing).
HEALTH_PATH = "/internal/health"
#: The recorder's route that answers a worker's ``/v1/query`` in the format asked for.
QUERY_PATH = "/internal/v1/query"
#: ``last_error`` of a worker whose key the recorder refuses.
KEY_REFUSED = "the recorder refuses this worker's key (RECORDER_TOKEN differs)"


class RemoteStore:
    """The read side of the recorder's store, over HTTP (:class:`sinks.store.StoreApi`).

    Args:
        url: The recorder's internal API, e.g. ``http://127.0.0.1:8091`` (``RECORDER_URL``).
        timeout_s: How long one call may take (the recorder's catching up included).
        poll_s: How often :meth:`health` is refreshed from the recorder.
        settle: Awaited before every read: this process's own appends to the log are in
            Redis (so a read after a turn's ``done`` finds the turn; see
            :meth:`sinks.event_log.RedisEventLog.drained`).
        token: The recorder's key (``RECORDER_TOKEN``), sent on every call.
    """

    def __init__(self, url: str, *, timeout_s: float = 10.0, poll_s: float = 1.0,
                 settle: Callable[[], Awaitable[object]] | None = None,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._key_refused = False  # the recorder answered 401: this worker's key is not its
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.settle = settle
        self.stats = StoreStats()
        self._health: dict[str, Any] | None = None
        self._reachable = False
        self._error: str | None = "the recorder has not answered yet"
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Open the HTTP session and start polling the recorder's health (it may be down)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s + 5), headers=self._headers)
        await self._poll_once()
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="recorder-health")

    async def wait_reachable(self, *, within: float, every_s: float = 0.1) -> bool:
        """Wait until the recorder has answered (at most ``within``); whether it has. A
        worker starting beside its recorder waits for it rather than serving 503s."""
        deadline = asyncio.get_running_loop().time() + within
        while not self._reachable and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(every_s)
            await self._poll_once()
        return self._reachable

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._poll_once()

    async def _poll_once(self) -> None:
        try:
            body = await self._call("GET", HEALTH_PATH)
        except RecorderUnavailableError:
            return  # _call noted it
        store = body.get("store", {})
        self._health = store
        for field in dataclasses.fields(StoreStats):
            if field.name in store:
                setattr(self.stats, field.name, store[field.name])

    # -- calls ------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None,
                    params: dict[str, str] | None = None,
                    client_timeout: aiohttp.ClientTimeout | None = None) -> Any:
        async with self._reaching() as session:
            async with session.request(
                    method, self.url + path, params=params,
                    data=None if body is None else json.dumps(encode(body)),
                    headers={"Content-Type": "application/json"},
                    timeout=client_timeout or session.timeout) as resp:
                text = await resp.text()
                self._answered(path, resp.status)
                if resp.status >= 400:
                    try:
                        message = json.loads(text)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = text[:200]
                    # The recorder answered: it is reachable, the request failed.
                    self._up()
                    raise RecorderUnavailableError(f"the recorder: {message}",
                                                   status=resp.status)
                result = decode(text)
        return result

    def _answered(self, path: str, status: int) -> None:
        """Note what the recorder's answer to a call of ``path`` says of this worker's key:
        a 401 is a refused key (health says so until a keyed call succeeds)."""
        if status == 401:  # (the health needs no key: only the others say it)
            if not self._key_refused:
                log.error("the recorder at %s refuses this worker's key: give both the "
                          "same RECORDER_TOKEN", self.url)
            self._key_refused = True
        elif path != HEALTH_PATH and status < 500:
            self._key_refused = False

    @contextlib.asynccontextmanager
    async def _reaching(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The session for one call to the recorder: a transport failure inside is the
        recorder unreachable (health says so); a call that completes marks it reachable."""
        session = self._session
        if session is None:
            raise RecorderUnavailableError("the recorder client is not started")
        try:
            yield session
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._down(exc)
            raise RecorderUnavailableError(
                f"the recorder at {self.url} cannot be reached ({type(exc).__name__}: {exc})"
            ) from exc
        self._up()

    def _up(self) -> None:
        if not self._reachable:
            log.info("the recorder at %s answers", self.url)
        self._reachable, self._error = True, None

    def _down(self, exc: BaseException) -> None:
        if self._reachable:
            log.warning("the recorder at %s cannot be reached: %s", self.url, exc)
        self._reachable = False
        self._error = f"recorder unreachable: {type(exc).__name__}: {exc}"

    async def check_key(self) -> None:
        """Raise :class:`RecorderUnavailableError` (``status`` 401) when the recorder
        refuses this worker's key: one call of a route that needs it (the health does not)."""
        await self._call("GET", "/internal/requests/req_key_check")

    async def _settled(self) -> None:
        if self.settle is not None:
            await self.settle()

    # -- StoreApi -----------------------------------------------------------------------
    def health(self) -> StoreHealth:
        """The recorder's store health as last polled; ``writable: false`` while the
        recorder cannot be reached. New turns are still accepted then: their events wait
        in the log, and the recorder records them when it is back."""
        store = self._health or {}
        # A refused key: the recorder answers, but no store call of this worker can succeed.
        down = KEY_REFUSED if self._key_refused else None if self._reachable else self._error
        if self._key_refused or not self._reachable:
            return StoreHealth(writable=False, backlog_rows=int(store.get("backlog_rows", 0)),
                               backlog_max_rows=int(store.get("backlog_max_rows", 0)),
                               accepting=True, dead_letters=int(store.get("dead_letters", 0)),
                               last_error=down, retry_in_s=self.poll_s)
        return StoreHealth(
            writable=bool(store.get("writable", True)),
            backlog_rows=int(store.get("backlog_rows", 0)),
            backlog_max_rows=int(store.get("backlog_max_rows", 0)),
            accepting=bool(store.get("accepting", True)),
            dead_letters=int(store.get("dead_letters", 0)), last_error=store.get("last_error"),
            retry_in_s=float(store.get("retry_in_s", 0.0)))

    async def flush(self, *, request_id: str | None = None, timeout_s: float | None = None,
                    events_only: bool = False, seq: int | None = None) -> None:
        """A barrier: once it returns, what the log holds now (of ``request_id``, up to
        ``seq`` when given) is committed to the recorder's store.

        Raises:
            RecorderUnavailableError: not in time, or the recorder cannot be reached.
        """
        await self._settled()
        await self._call("POST", "/internal/sync", {
            "request_id": request_id, "seq": seq, "events_only": events_only,
            "timeout_s": self.timeout_s if timeout_s is None else timeout_s})

    async def load_history(self, conversation_id: str, *, limit: int,
                           exclude_request_id: str | None = None) -> list[dict[str, str]]:
        """The conversation's earlier messages (the recorder catches up with its turns first)."""
        await self._settled()
        result: list[dict[str, str]] = await self._call("POST", "/internal/history", {
            "conversation_id": conversation_id, "limit": limit,
            "exclude_request_id": exclude_request_id, "timeout_s": self.timeout_s})
        return result

    async def events_since(self, request_id: str, since_seq: int, *, page: int = 1000
                           ) -> AsyncIterator[Event]:
        cursor = since_seq
        while True:
            rows: list[str] = await self._call(
                "GET", f"/internal/requests/{request_id}/events",
                params={"since": str(cursor), "page": str(page)})
            for data in rows:
                event = EVENT_ADAPTER.validate_json(data)
                cursor = event.seq
                yield event
            if len(rows) < page:
                return

    async def request_row(self, request_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call("GET", f"/internal/requests/{request_id}")
        return result

    async def messages_of(self, request_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call(
            "GET", f"/internal/requests/{request_id}/messages")
        return result

    async def aquery(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read-only statement on the recorder's store (checked there as ``/v1/query``
        checks it)."""
        rows: list[list[Any]] = await self._call("POST", "/internal/query",
                                                 {"sql": sql, "params": list(params)})
        return [tuple(row) for row in rows]

    async def answer_query(self, sql: str, fmt: str, limits: dict[str, Any]) -> QueryAnswer:
        """``/v1/query`` answered by the recorder (after it caught up with the log).

        Raises:
            QueryError: the recorder refused the statement or DuckDB failed it (its
                ``code`` as the recorder gave it: ``query_refused``, ``query_timeout``, …).
            RecorderUnavailableError: the recorder cannot be reached.
        """
        if self._session is None:
            raise RecorderUnavailableError("the recorder client is not started")
        await self._settled()
        timeout = aiohttp.ClientTimeout(total=float(limits.get("timeout_s", 10)) + self.timeout_s)
        async with self._reaching() as session:
            async with session.post(self.url + QUERY_PATH, timeout=timeout,
                                    json={"sql": sql, "format": fmt, **limits}) as resp:
                payload = await resp.read()
                self._answered(QUERY_PATH, resp.status)
                if resp.status in (400, 403):
                    self._up()
                    error = json.loads(payload)["error"]
                    failure = QueryError(error["message"])
                    failure.code = str(error.get("code") or "query_error")
                    raise failure
                if resp.status >= 400:
                    self._up()
                    raise RecorderUnavailableError(f"the recorder: {payload[:200]!r}",
                                                   status=resp.status)
                answer = QueryAnswer(body=payload, content_type=resp.content_type,
                                     rows=int(resp.headers.get("X-Row-Count", "0")),
                                     truncated=resp.headers.get("X-Truncated") == "true")
        return answer

    async def export(self) -> dict[str, Any]:
        """``POST /v1/export`` run by the recorder, which has the file: it catches up with
        the log, flushes, and exports what closed since its last run. Returns the report's
        JSON, what a single process answers. No overall time limit (an export takes what
        it takes, as in a single process); connecting is bounded by ``timeout_s``.

        Raises:
            RecorderUnavailableError: the recorder cannot be reached, could not catch up
                (``status`` 503), or the export failed there (``status`` 500).
        """
        await self._settled()
        report: dict[str, Any] = await self._call(
            "POST", "/internal/export", {"timeout_s": self.timeout_s},
            client_timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s))
        return report

    def responses(self) -> ResponsesTable:
        """The ``responses`` table, in the recorder's store (it creates it when it starts)."""
        return _RemoteResponses(self)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """Not available: a worker has no DuckDB connection (the recorder holds the file)."""
        raise StoreError("the worker role has no DuckDB connection: this endpoint needs the "
                         "store in this process (ROLE=single)")


class _RemoteResponses:
    """:class:`~sinks.responses_table.ResponsesTable` through the recorder's internal API."""

    def __init__(self, store: RemoteStore) -> None:
        self._store = store

    async def create(self) -> None:
        pass  # the recorder creates it when it opens the store

    async def save(self, record: ResponseRecord) -> None:
        await self._store._call("PUT", f"/internal/responses/{record.response_id}",
                                dataclasses.asdict(record))

    async def load(self, response_id: str) -> ResponseRecord | None:
        found = await self._store._call("GET", f"/internal/responses/{response_id}")
        return None if found is None else ResponseRecord(**found)

    async def delete(self, response_id: str) -> None:
        await self._store._call("DELETE", f"/internal/responses/{response_id}")


def log_barrier(event_log: RedisEventLog, store: RemoteStore, *, timeout_s: float
                ) -> Callable[[str, int], Awaitable[None]]:
    """The worker role's durability barrier of ``done`` (the orchestrator's ``durable``):
    the turn's events up to ``seq`` are in Redis, then committed by the recorder.

    Raises (from the returned callable):
        StoreError: either did not happen within ``timeout_s`` each (a recorder that
            cannot be reached is waited for within it: the supervisor restarts it).
    """

    async def durable(request_id: str, seq: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not await event_log.appended(request_id, seq=seq, within=timeout_s):
            raise StoreError(f"the turn's events up to seq {seq} did not reach the log within "
                             f"{timeout_s:g}s")
        while True:
            try:
                await store.flush(request_id=request_id, seq=seq, events_only=True,
                                  timeout_s=max(deadline - loop.time(), 0.1))
                return
            except RecorderUnavailableError as exc:
                # Unreachable (status None): the supervisor restarts a recorder that died,
                # and the turn's events wait in the log; so the barrier waits for it, within
                # what is left of its time, rather than failing the turn at once.
                left = deadline - loop.time()
                if exc.status is not None or left <= 0:
                    raise
                if not await store.wait_reachable(within=left):
                    raise

    return durable

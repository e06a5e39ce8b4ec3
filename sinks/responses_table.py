"""The ``responses`` table: what a Responses-API response adds to its turn (issue 11).

The Responses wire (:mod:`api.responses`) keeps each stored response's fixed fields (the
response object's ``base``) and its function tools' names here, next to the turn's events.
It reaches the table through :class:`ResponsesTable`: on the store's own connection in the
process that opens the file (:class:`LocalResponses`), or through the recorder's internal API
in the worker role (:meth:`sinks.remote_store.RemoteStore.responses`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Final, Protocol

import duckdb

RESPONSES_SCHEMA: Final[str] = """
CREATE TABLE IF NOT EXISTS responses (
    response_id  VARCHAR   PRIMARY KEY,   -- resp_… ; its turn is req_… (same suffix)
    request_id   VARCHAR   NOT NULL,
    created_at   TIMESTAMP NOT NULL,
    base         JSON      NOT NULL,      -- the response object's fixed fields
    function_tools JSON    NOT NULL       -- names of the client's function tools
)
"""


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseRecord:
    """One row of ``responses``: ``base`` and ``function_tools`` are JSON text."""

    response_id: str
    request_id: str
    created_at: float  # epoch seconds
    base: str
    function_tools: str


class ResponsesTable(Protocol):
    """Create, write, read and delete rows of ``responses``."""

    async def create(self) -> None: ...
    async def save(self, record: ResponseRecord) -> None: ...
    async def load(self, response_id: str) -> ResponseRecord | None: ...
    async def delete(self, response_id: str) -> None: ...


class LocalResponses:
    """:class:`ResponsesTable` on cursors of the store's connection (``connect``), each call
    in a worker thread."""

    def __init__(self, connect: Callable[[], duckdb.DuckDBPyConnection]) -> None:
        self._connect = connect

    async def _run(self, sql: str, params: list[object]) -> list[tuple[object, ...]]:
        def run() -> list[tuple[object, ...]]:
            cursor = self._connect()
            try:
                return cursor.execute(sql, params).fetchall()
            finally:
                cursor.close()

        return await asyncio.to_thread(run)

    async def create(self) -> None:
        await self._run(RESPONSES_SCHEMA, [])

    async def save(self, record: ResponseRecord) -> None:
        await self._run("INSERT OR REPLACE INTO responses VALUES (?, ?, to_timestamp(?), ?, ?)",
                        [record.response_id, record.request_id, record.created_at, record.base,
                         record.function_tools])

    async def load(self, response_id: str) -> ResponseRecord | None:
        rows = await self._run("SELECT request_id, epoch(created_at), base, function_tools "
                               "FROM responses WHERE response_id = ?", [response_id])
        if not rows:
            return None
        request_id, created_at, base, tools = rows[0]
        return ResponseRecord(response_id=response_id, request_id=str(request_id),
                              created_at=float(str(created_at)), base=str(base),
                              function_tools=str(tools))

    async def delete(self, response_id: str) -> None:
        await self._run("DELETE FROM responses WHERE response_id = ?", [response_id])

"""The SessionCoordinator (seed 001): a response id at once, updates as they come, a completion.

A session is a conversation: ``session_id`` is its ``conversation_id``. Turns run detached
from whoever asked (see :class:`~pipeline.orchestrator.StreamingOrchestrator`): abandoning
the update iterator cleans up that subscription only, and the turn runs to its end::

    coordinator = SessionCoordinator(orchestrator, store=store)
    handle = await coordinator.stream_request(session_id, "Tell me about quantum computing")
    async with contextlib.aclosing(handle.updates) as updates:
        async for update in updates:
            print(update.status, update.content)
    result = await handle.completion          # raises TurnFailedError if the turn failed
    round_ = await coordinator.get_round(handle.response_id)
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel

from core.errors import PipelineError
from core.turn import ChatMessage, TurnInput, TurnResult
from operators import TurnUpdate, turn_updates
from pipeline.orchestrator import StreamingOrchestrator, Turn
from sinks.store import StoreApi


class TurnFailedError(PipelineError):
    """A turn ended without completing (error, cancelled or interrupted)."""

    def __init__(self, result: TurnResult) -> None:
        detail = f": {result.error}" if result.error else ""
        super().__init__(f"turn {result.request_id} ended {result.status}{detail}")
        self.result = result


@dataclasses.dataclass(frozen=True)
class RequestHandle:
    """What :meth:`SessionCoordinator.handle_request` returns at once."""

    response_id: str
    session_id: str
    completion: asyncio.Future[TurnResult]


@dataclasses.dataclass(frozen=True)
class StreamHandle(RequestHandle):
    """:class:`RequestHandle` plus the turn's updates (close it with ``aclosing``)."""

    updates: AsyncGenerator[TurnUpdate]


class Round(BaseModel):
    """A finished or running round: the request, its messages and the response.

    ``response_id``/``session_id`` are the seed's names for ``request_id``/
    ``conversation_id``; both are given.
    """

    response_id: str
    session_id: str
    request_id: str
    conversation_id: str
    status: str
    live: bool
    last_seq: int | None
    model: str | None
    usage: dict[str, int | None]
    timings: dict[str, Any]
    error: str | None
    request: list[dict[str, Any]]
    response: dict[str, Any] | None
    #: The worker that runs (or ran) the turn (issue 13): set by the HTTP layer, which
    #: knows the workers; None when nobody knows (e.g. its Redis meta expired).
    worker: str | None = None


class SessionCoordinator:
    """Starts turns for sessions and hands out their ids, updates and completions.

    Args:
        orchestrator: Runs the turns.
        store: Where rounds are read back from (``get_round``).
        max_buffer: How far an update consumer may fall behind before it is cut off.
    """

    def __init__(
        self, orchestrator: StreamingOrchestrator, *, store: StoreApi, max_buffer: int = 4096
    ) -> None:
        self.orchestrator = orchestrator
        self.store = store
        self.max_buffer = max_buffer

    async def handle_request(
        self, session_id: str | None, content: str, *, model: str | None = None
    ) -> RequestHandle:
        """Start a turn; return its response id now and a completion to await."""
        turn = self._start(session_id, content, model)
        return RequestHandle(turn.request_id, turn.conversation_id, _completion(turn))

    async def stream_request(
        self, session_id: str | None, content: str, *, model: str | None = None
    ) -> StreamHandle:
        """Like :meth:`handle_request`, plus an async iterator of :class:`TurnUpdate`."""
        turn = self._start(session_id, content, model)
        updates = turn.view(turn_updates(session_id=turn.conversation_id),
                            max_buffer=self.max_buffer)
        return StreamHandle(turn.request_id, turn.conversation_id, _completion(turn), updates)

    async def get_round(self, response_id: str) -> Round | None:
        """The round of a response id (live or stored), or None when unknown."""
        turn = self.orchestrator.live.get(response_id)
        await self.store.flush()
        row = await self.store.request_row(response_id)
        if row is None:
            return None
        messages = [_jsonable(m) for m in await self.store.messages_of(response_id)]
        return Round(
            response_id=response_id,
            session_id=row["conversation_id"],
            request_id=response_id,
            conversation_id=row["conversation_id"],
            status=row["status"],
            live=turn is not None,
            last_seq=turn.last_seq if turn is not None else row["last_seq"],
            model=row["model"],
            usage={k: row[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            timings=_jsonable({k: row[k] for k in ("started_at", "finished_at", "duration_ms",
                                                   "first_token_ms")}),
            error=row["error"],
            request=[m for m in messages if m["role"] != "assistant"],
            response=next((m for m in messages if m["role"] == "assistant"), None),
        )

    def _start(self, session_id: str | None, content: str, model: str | None) -> Turn:
        return self.orchestrator.run(TurnInput(
            messages=[ChatMessage(role="user", content=content)],
            conversation_id=session_id, model=model, kind="session",
        ))


def _completion(turn: Turn) -> asyncio.Future[TurnResult]:
    async def complete() -> TurnResult:
        result = await turn.result
        if result.status != "completed":
            raise TurnFailedError(result)
        return result

    return asyncio.ensure_future(complete())


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.replace(tzinfo=datetime.UTC).isoformat() if isinstance(v, datetime.datetime) else v
        for k, v in value.items()
    }

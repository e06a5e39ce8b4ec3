"""Harnesses: each is an async generator of events for one step of a turn.

A harness is any ``Callable[[TurnContext], AsyncIterator[Event]]``. The orchestrator
turns each into a cold Observable (:func:`operators.from_async_iterable`) and sequences
them; a harness knows *how* to do its step, the orchestrator knows *when*.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeAlias

from pipeline.events import Event, LlmCall, Memory, Route, StreamEnd, StreamStart, Text, TokenUsage
from pipeline.providers import ChatProvider, Delta, Finish, Usage
from pipeline.turn import TurnContext

Harness: TypeAlias = Callable[[TurnContext], AsyncIterator[Event]]


class Archivist(Protocol):
    """Reads a conversation's history (the read side of the Archivist/Recorder split)."""

    async def load_history(
        self, conversation_id: str, *, limit: int, exclude_request_id: str | None = None
    ) -> list[dict[str, str]]:
        """Earlier messages, oldest first, as ``{"role", "content"}``, leaving out those of
        ``exclude_request_id`` (the turn asking, whose messages are already recorded)."""
        ...


class RouterHarness:
    """Decides how the turn is answered and says so in a ``route`` trace event.

    Today every turn is routed to the single response model; the decision is an event so
    later routes (tools, roundtable) show up in traces the same way.
    """

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        ctx.route = "respond"
        yield Route(route="respond", reason="one model answers the conversation")


class MemoryHarness:
    """Loads the conversation's earlier messages into the context (``memory`` trace event)."""

    def __init__(self, archivist: Archivist, *, limit: int = 200) -> None:
        self.archivist = archivist
        self.limit = limit

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        ctx.history = await self.archivist.load_history(
            ctx.conversation_id, limit=self.limit, exclude_request_id=ctx.request_id
        )
        yield Memory(messages_loaded=len(ctx.history))


class ResponseHarness:
    """Streams the model's answer: ``llm_call``, ``stream_start``, ``text``…, ``token_usage``,
    ``stream_end``.

    The messages sent are the harness's ``system`` prompt (if any), the loaded history and
    this turn's messages; ``model`` and ``depth`` default to the turn's model and 0. A provider
    failure propagates as :class:`~pipeline.errors.ProviderError`; the turn envelope turns
    it into an ``error`` event and closes the stream with status ``error``.
    """

    def __init__(
        self, provider: ChatProvider, *, agent: str = "assistant", system: str | None = None,
        model: str | None = None, depth: int = 0,
    ) -> None:
        self.provider = provider
        self.agent = agent
        self.system = system
        self.model = model
        self.depth = depth

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        stream_id = ctx.next_stream_id()
        model = self.model or ctx.model
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, *ctx.history, *ctx.messages]
        yield LlmCall(stream_id=stream_id, model=model, messages=messages)
        yield StreamStart(stream_id=stream_id, agent=self.agent, depth=self.depth)
        finish: str | None = None
        async for piece in self.provider.stream_chat(
            model=model, messages=messages, max_tokens=ctx.max_tokens
        ):
            match piece:
                case Delta(text=text):
                    yield Text(stream_id=stream_id, delta=text)
                case Finish(reason=reason):
                    finish = reason
                case Usage():
                    yield TokenUsage(
                        stream_id=stream_id, model=piece.model,
                        prompt_tokens=piece.prompt_tokens,
                        completion_tokens=piece.completion_tokens,
                        total_tokens=piece.total_tokens,
                    )
        yield StreamEnd(stream_id=stream_id, status="ok", finish_reason=finish)

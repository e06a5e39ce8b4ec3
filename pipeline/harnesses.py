"""Harnesses: each is an async generator of events for one step of a turn.

A harness is any ``Callable[[TurnContext], AsyncIterator[Event]]``. The orchestrator
turns each into a cold Observable (:func:`operators.from_async_iterable`) and sequences
them; a harness knows *how* to do its step, the orchestrator knows *when*.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeAlias

from core.events import Event, LlmCall, Memory, Route, StreamEnd, StreamStart, Text, TokenUsage
from core.turn import TurnContext
from pipeline.providers import ChatProvider, Delta, Finish, Piece, ToolCallRequest, Usage
from pipeline.tools import ToolRegistry, ToolStepLimitError, assistant_message, plan_call, run_calls

Harness: TypeAlias = Callable[[TurnContext], AsyncIterator[Event]]

log = logging.getLogger(__name__)


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
        # A conversation made for this turn has no history: no store barrier to wait for
        # (which also lets new conversations run while the store cannot write).
        ctx.history = [] if ctx.new_conversation else await self.archivist.load_history(
            ctx.conversation_id, limit=self.limit, exclude_request_id=ctx.request_id
        )
        yield Memory(messages_loaded=len(ctx.history))


@dataclasses.dataclass
class ModelReply:
    """One model call's reply, mapped to events as it streams (the one place pieces become
    ``text`` and ``token_usage`` events); what is left to decide on is kept: the text,
    the finish reason and the tool calls asked for.

    ``max_tokens`` is enforced here, whatever the upstream does: a text piece past that
    many stops the reading, closes the model call and finishes the reply as ``length``
    (a piece counts as a token: each delta of an OpenAI-compatible stream is about one).
    """

    text: list[str] = dataclasses.field(default_factory=list)
    finish: str | None = None
    tool_calls: list[ToolCallRequest] = dataclasses.field(default_factory=list)
    max_tokens: int | None = None

    async def events(self, pieces: AsyncIterator[Piece], *, stream_id: int) -> AsyncIterator[Event]:
        try:
            async for event in self._events(pieces, stream_id=stream_id):
                yield event
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:  # closes the upstream HTTP stream at once
                await aclose()

    async def _events(self, pieces: AsyncIterator[Piece], *, stream_id: int) -> AsyncIterator[Event]:
        limit = self.max_tokens
        async for piece in pieces:
            match piece:
                case Delta(text=delta):
                    if limit is not None and len(self.text) >= limit:
                        log.warning("the model went on past max_tokens=%d; stopped it", limit)
                        self.finish = "length"
                        return
                    self.text.append(delta)
                    yield Text(stream_id=stream_id, delta=delta)
                case Finish(reason=reason):
                    self.finish = reason
                case Usage():
                    yield TokenUsage(
                        stream_id=stream_id, model=piece.model,
                        prompt_tokens=piece.prompt_tokens,
                        completion_tokens=piece.completion_tokens,
                        total_tokens=piece.total_tokens,
                    )
                case ToolCallRequest():
                    self.tool_calls.append(piece)


class ResponseHarness:
    """Streams the model's answer: ``llm_call``, ``stream_start``, ``text``…, ``token_usage``,
    ``stream_end``; with ``tools``, the agent loop runs inside that one stream.

    The messages sent are the harness's ``system`` prompt (if any), the loaded history, this
    turn's messages and the direct tool calls' results (:class:`ToolHarness`); ``model`` and
    ``depth`` default to the turn's model and 0. A provider failure propagates as
    :class:`~core.errors.ProviderError`; the turn envelope turns it into an ``error``
    event and closes the stream with status ``error``.

    The agent loop: the enabled tools are offered to the model; when it answers with tool
    calls, they become ``tool_call`` events, run concurrently (``tool_result`` events as they
    finish), the assistant's calls and the tool messages are appended, and the model is
    called again (a new ``llm_call`` with the exact messages, and its own ``token_usage``).
    After ``MAX_TOOL_STEPS`` rounds a further request for tools raises
    :class:`~pipeline.tools.ToolStepLimitError`: a ``turn_error`` event, the stream ends
    ``error``. With ``MAX_TOOL_STEPS=0`` no tools are offered, and calls of tools that were
    not offered are never run.
    """

    def __init__(
        self, provider: ChatProvider, *, agent: str = "assistant", system: str | None = None,
        model: str | None = None, depth: int = 0, tools: ToolRegistry | None = None,
    ) -> None:
        self.provider = provider
        self.agent = agent
        self.system = system
        self.model = model
        self.depth = depth
        self.tools = tools

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        stream_id = ctx.next_stream_id()
        model = self.model or ctx.model
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages: list[dict[str, Any]] = [*system, *ctx.history, *ctx.messages, *ctx.tool_context]
        # MAX_TOOL_STEPS=0 means no rounds at all: offer nothing (direct calls still run).
        offered = self.tools.offered() if self.tools is not None and self.tools.limits.max_steps else []
        yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))
        yield StreamStart(stream_id=stream_id, agent=self.agent, depth=self.depth)
        finish: str | None = None
        steps = 0
        while True:
            reply = ModelReply(max_tokens=ctx.max_tokens)
            pieces = (
                self.provider.stream_chat(model=model, messages=messages,
                                          max_tokens=ctx.max_tokens, tools=offered)
                if offered else
                self.provider.stream_chat(model=model, messages=messages, max_tokens=ctx.max_tokens)
            )
            async for event in reply.events(pieces, stream_id=stream_id):
                yield event
            finish = reply.finish or finish
            text, requests = reply.text, reply.tool_calls
            if not requests or self.tools is None or not offered:
                break  # calls of tools never offered are not run
            steps += 1
            if steps > self.tools.limits.max_steps:
                raise ToolStepLimitError(max_steps=self.tools.limits.max_steps)
            calls = [plan_call(self.tools, call_id=r.id, name=r.name, arguments=r.arguments_json)
                     for r in requests]
            messages.append(assistant_message("".join(text), calls))
            async for event in run_calls(self.tools, calls, stream_id=stream_id, messages=messages):
                yield event
            yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))
        yield StreamEnd(stream_id=stream_id, status="ok", finish_reason=finish)


class ToolHarness:
    """Runs the tool calls a request names directly (``tool_calls`` in the body).

    In a stream of its own (agent ``tools``): ``stream_start``, ``tool_call``…,
    ``tool_result``… (concurrently, as they finish), ``stream_end``. The calls and their
    results go to :attr:`TurnContext.tool_context`, so the response model sees them as if it
    had made them. A request without direct calls yields nothing.
    """

    def __init__(self, tools: ToolRegistry, *, agent: str = "tools", depth: int = 0) -> None:
        self.tools = tools
        self.agent = agent
        self.depth = depth

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        if not ctx.tool_calls:
            return
        stream_id = ctx.next_stream_id()
        yield StreamStart(stream_id=stream_id, agent=self.agent, depth=self.depth)
        calls = [plan_call(self.tools, call_id=f"call_direct_{index}", name=spec.name,
                           arguments=spec.params)
                 for index, spec in enumerate(ctx.tool_calls)]
        results: list[dict[str, Any]] = []
        async for event in run_calls(self.tools, calls, stream_id=stream_id, messages=results):
            yield event
        ctx.tool_context = [assistant_message("", calls), *results]
        yield StreamEnd(stream_id=stream_id, status="ok")

"""Harnesses: each is an async generator of events for one step of a turn.

A harness is any ``Callable[[TurnContext], AsyncIterator[Event]]``. The orchestrator
turns each into a cold Observable (:func:`operators.from_async_iterable`) and sequences
them; a harness knows *how* to do its step, the orchestrator knows *when*.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeAlias

from core.events import (
    Event,
    LlmCall,
    Memory,
    Route,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
    ToolCallDelta,
)
from core.turn import TurnContext, new_id
from pipeline.providers import (
    ChatProvider,
    Delta,
    Finish,
    Piece,
    ToolCallPiece,
    ToolCallRequest,
    Usage,
)
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
    """Loads the conversation's earlier messages into the context (``memory`` trace event).

    The store keeps a message's role and text only, so earlier ``tool`` messages (whose
    calls' ids it does not keep) are left out: a model refuses a tool message that answers
    no call. A client running its own tool loop sends the whole loop each time anyway.
    """

    def __init__(self, archivist: Archivist, *, limit: int = 200) -> None:
        self.archivist = archivist
        self.limit = limit

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        # A conversation made for this turn has no history: no store barrier to wait for
        # (which also lets new conversations run while the store cannot write).
        history = [] if ctx.new_conversation else await self.archivist.load_history(
            ctx.conversation_id, limit=self.limit, exclude_request_id=ctx.request_id
        )
        ctx.history = [message for message in history if message.get("role") != "tool"]
        yield Memory(messages_loaded=len(ctx.history))


@dataclasses.dataclass
class ModelReply:
    """One model call's reply, mapped to events as it streams (the one place pieces become
    ``text`` and ``token_usage`` events); what is left to decide on is kept: the text,
    the finish reason and the tool calls asked for.

    ``max_tokens`` is enforced here, whatever the upstream does: a text piece past that
    many stops the reading, closes the model call and finishes the reply as ``length``
    (a piece counts as a token: each delta of an OpenAI-compatible stream is about one).

    With ``client_tools`` the model's tool calls are the client's: their fragments become
    ``tool_call_delta`` events as they stream, and each whole call a ``tool_call`` event
    marked ``side: "client"``; they are never run here. Pieces of
    choices 1… (a request's ``n``) go to child streams of ``stream_id``, opened by ``open``
    as each choice first speaks and closed by :meth:`close_choices`.
    """

    text: list[str] = dataclasses.field(default_factory=list)
    finish: str | None = None
    tool_calls: list[ToolCallRequest] = dataclasses.field(default_factory=list)
    max_tokens: int | None = None
    client_tools: bool = False
    open: Callable[[int], StreamStart] | None = None
    choices: dict[int, int] = dataclasses.field(default_factory=dict)  # choice → stream id
    finishes: dict[int, str] = dataclasses.field(default_factory=dict)  # choice → reason

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
            target = stream_id
            index = getattr(piece, "index", 0)
            if index and self.open is not None:
                if index not in self.choices:
                    start = self.open(index)
                    self.choices[index] = start.stream_id
                    yield start
                target = self.choices[index]
            match piece:
                case Delta(text=delta, logprobs=logprobs, refusal=refusal):
                    if target == stream_id:
                        if limit is not None and len(self.text) >= limit:
                            log.warning("the model went on past max_tokens=%d; stopped it", limit)
                            self.finish = "length"
                            return
                        self.text.append(delta)
                    yield Text(stream_id=target, delta=delta, logprobs=logprobs,
                               refusal=True if refusal else None)
                case Finish(reason=reason):
                    if target == stream_id:
                        self.finish = reason
                    else:
                        self.finishes[index] = reason
                case Usage():
                    yield TokenUsage(
                        stream_id=stream_id, model=piece.model,
                        prompt_tokens=piece.prompt_tokens,
                        completion_tokens=piece.completion_tokens,
                        total_tokens=piece.total_tokens,
                    )
                case ToolCallPiece() if self.client_tools:
                    yield ToolCallDelta(stream_id=target, index=piece.call_index,
                                        call_id=piece.id, name=piece.name,
                                        arguments=piece.arguments)
                case ToolCallPiece():
                    pass  # the server's calls run once whole
                case ToolCallRequest() if self.client_tools:
                    yield client_tool_call(piece, stream_id=target)
                case ToolCallRequest():
                    if target == stream_id:
                        self.tool_calls.append(piece)

    def close_choices(self) -> list[StreamEnd]:
        """The ``stream_end`` of each choice stream opened (choice order)."""
        return [StreamEnd(stream_id=stream, status="ok", finish_reason=self.finishes.get(index))
                for index, stream in sorted(self.choices.items())]


def client_tool_call(request: ToolCallRequest, *, stream_id: int) -> ToolCall:
    """The ``tool_call`` event of a client's tool call (not run here; see :class:`ToolCall`).

    ``params`` are the arguments when they are a JSON object, else
    ``{"_unparsed_arguments": <as sent>}``, so the client gets back what the model wrote.
    """
    try:
        parsed = json.loads(request.arguments_json or "{}")
    except ValueError:
        parsed = None
    params = parsed if isinstance(parsed, dict) else {"_unparsed_arguments": request.arguments_json}
    return ToolCall(stream_id=stream_id, tool=request.name, execution_id=new_id("exec"),
                    params=params, side="client", call_id=request.id)


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
        params = ctx.model_params
        # A client's own tools replace the server's: the model is offered only the client's
        # (in ``params``), and their calls are the client's to run.
        client_tools = "tools" in params
        # MAX_TOOL_STEPS=0 means no rounds at all: offer nothing (direct calls still run).
        offered = (self.tools.offered()
                   if self.tools is not None and self.tools.limits.max_steps
                   and ctx.server_tools and not client_tools else [])
        yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))
        yield StreamStart(stream_id=stream_id, agent=self.agent, depth=self.depth)

        def open_choice(index: int) -> StreamStart:
            return StreamStart(stream_id=ctx.next_stream_id(), agent=self.agent,
                               depth=self.depth + 1, parent_stream_id=stream_id, choice=index)

        finish: str | None = None
        steps = 0
        while True:
            reply = ModelReply(max_tokens=ctx.max_tokens, client_tools=client_tools,
                               open=open_choice)
            extra: dict[str, Any] = {}
            if offered:
                extra["tools"] = offered
            if params:
                extra["params"] = params
            if client_tools:
                extra["tool_call_pieces"] = True
            pieces = self.provider.stream_chat(model=model, messages=messages,
                                               max_tokens=ctx.max_tokens, **extra)
            async for event in reply.events(pieces, stream_id=stream_id):
                yield event
            for end in reply.close_choices():
                yield end
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

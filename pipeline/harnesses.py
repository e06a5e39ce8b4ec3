"""Harnesses: each is an async generator of events for one step of a turn.

A harness is any ``Callable[[TurnContext], AsyncIterator[Event]]``. The orchestrator
turns each into a cold Observable (:func:`operators.from_async_iterable`) and sequences
them; a harness knows *how* to do its step, the orchestrator knows *when*.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, TypeAlias

from core.agent_settings import AgentConfig
from core.errors import PipelineError
from core.events import (
    ErrorEvent,
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
    ToolResult,
)
from core.turn import TurnContext, new_id
from pipeline.agents import AgentTeam, agent_function, agent_tool, task_of
from pipeline.offline_model import ADVISOR_NOTE
from pipeline.providers import (
    ChatProvider,
    Delta,
    Finish,
    Piece,
    ToolCallPiece,
    ToolCallRequest,
    Usage,
)
from pipeline.tools import (
    PlannedCall,
    ToolRegistry,
    ToolStepLimitError,
    assistant_message,
    plan_call,
    run_calls,
)

Harness: TypeAlias = Callable[[TurnContext], AsyncIterator[Event]]

log = logging.getLogger(__name__)

#: Rounds of agent calls a response without tools may make (MAX_TOOL_STEPS bounds the rest).
_AGENT_STEPS = 8


@dataclasses.dataclass
class Verdict:
    """An advisor's verdict on one answer: ``gate_continue``, ``redirect`` or ``end_early``."""

    kind: str = "gate_continue"
    note: str | None = None


class Reviewer(Protocol):
    """What the response harness needs of an advisor (:class:`pipeline.advisor.AdvisorStep`)."""

    max_redirects: int

    def review(
        self, ctx: TurnContext, *, messages: Sequence[dict[str, Any]], answer: str,
        stream_id: int, depth: int, verdict: Verdict,
    ) -> AsyncIterator[Event]:
        """The advisor's events; its verdict is written into ``verdict``."""
        ...


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

    Sub-agents (issue 14, :mod:`pipeline.agents`): with ``agents``, the configured agents are
    offered too (``agent_<name>``); a call of one runs that agent's own response harness
    nested in this stream (depth + 1, ``parent_stream_id``), and its answer is the call's
    result. When the router decided ``delegate``, the top-level response starts with that
    call. A sub-agent harness has a ``task`` (its only user message), ``parent_stream_id``
    and, optionally, ``allowed_tools``; its ``answer`` is what it said.

    Advisor (issue 14, :mod:`pipeline.advisor`): with ``advisor``, each finished top-level
    answer is reviewed; a ``redirect`` calls the model again with the note (bounded).
    """

    def __init__(
        self, provider: ChatProvider, *, agent: str = "assistant", system: str | None = None,
        model: str | None = None, depth: int = 0, tools: ToolRegistry | None = None,
        agents: AgentTeam | None = None, advisor: Reviewer | None = None,
        parent_stream_id: int | None = None, task: str | None = None,
        allowed_tools: frozenset[str] | None = None,
    ) -> None:
        self.provider = provider
        self.agent = agent
        self.system = system
        self.model = model
        self.depth = depth
        self.tools = tools
        self.agents = agents
        self.advisor = advisor
        self.parent_stream_id = parent_stream_id
        self.task = task
        self.allowed_tools = allowed_tools
        self.stream_id: int | None = None
        self.answer_parts: list[str] = []

    @property
    def answer(self) -> str:
        """Everything this harness's model said (a sub-agent's result)."""
        return "".join(self.answer_parts)

    def _offered_tools(self) -> list[dict[str, Any]]:
        # MAX_TOOL_STEPS=0 means no rounds at all: offer nothing (direct calls still run).
        if self.tools is None or not self.tools.limits.max_steps:
            return []
        offered = self.tools.offered()
        if self.allowed_tools is None:
            return offered
        return [spec for spec in offered
                if self.tools.display_name(spec["function"]["name"]) in self.allowed_tools]

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        stream_id = self.stream_id = ctx.next_stream_id()
        model = self.model or ctx.model
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages: list[dict[str, Any]] = (
            [*system, {"role": "user", "content": self.task}] if self.task is not None
            else [*system, *ctx.history, *ctx.messages, *ctx.tool_context])
        # A client's own tools replace the server's and the sub-agents: the model is offered
        # only the client's (in ``params``), and their calls are the client's to run.
        params = ctx.model_params if self.task is None else {}
        client_tools = "tools" in params
        tool_specs = self._offered_tools() if ctx.server_tools and not client_tools else []
        agent_specs = (self.agents.offered(depth=self.depth)
                       if self.agents is not None and not client_tools else [])
        offered = [*tool_specs, *agent_specs]
        start = StreamStart(stream_id=stream_id, agent=self.agent, depth=self.depth,
                            parent_stream_id=self.parent_stream_id)
        if self.parent_stream_id is None:
            yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))
            yield start
        else:  # nested: the stream opens first, so the llm_call belongs to a known depth
            yield start
            yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))

        def open_choice(index: int) -> StreamStart:
            return StreamStart(stream_id=ctx.next_stream_id(), agent=self.agent,
                               depth=self.depth + 1, parent_stream_id=stream_id, choice=index)

        finish: str | None = None
        steps = 0
        redirects = 0
        max_steps = self.tools.limits.max_steps if self.tools is not None else _AGENT_STEPS
        routed = self._routed_call(ctx) if agent_specs else []
        while True:
            if routed:  # the router's delegate decision: the response starts with that call
                text, requests, routed = [], routed, []
            else:
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
            self.answer_parts.extend(text)
            calls, agent_calls = self._plan(requests, tool_specs, agent_specs)
            if not calls and not agent_calls:  # calls of tools never offered are not run
                verdict = Verdict()
                if self.advisor is not None and self.parent_stream_id is None:
                    async for event in self.advisor.review(
                            ctx, messages=messages, answer="".join(text), stream_id=stream_id,
                            depth=self.depth, verdict=verdict):
                        yield event
                if verdict.kind == "redirect" and self.advisor is not None \
                        and redirects < self.advisor.max_redirects:
                    redirects += 1
                    messages.append({"role": "assistant", "content": "".join(text)})
                    messages.append({"role": "user",
                                     "content": f"{ADVISOR_NOTE} {verdict.note or 'answer again'}"})
                    yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))
                    continue
                break
            steps += 1
            if steps > max_steps:
                raise ToolStepLimitError(max_steps=max_steps)
            messages.append(assistant_message("".join(text), [*(c for c, _ in agent_calls), *calls]))
            for call, spec in agent_calls:
                async for event in self._delegate(ctx, call, spec, stream_id=stream_id,
                                                  messages=messages):
                    yield event
            if calls and self.tools is not None:
                async for event in run_calls(self.tools, calls, stream_id=stream_id,
                                             messages=messages):
                    yield event
            yield LlmCall(stream_id=stream_id, model=model, messages=list(messages))
        yield StreamEnd(stream_id=stream_id, status="ok", finish_reason=finish)

    def _routed_call(self, ctx: TurnContext) -> list[ToolCallRequest]:
        if (self.parent_stream_id is not None or ctx.route != "delegate" or self.agents is None
                or ctx.route_agent is None or self.agents.get(ctx.route_agent) is None):
            return []
        return [ToolCallRequest(id=f"call_route_{ctx.route_agent}",
                                name=agent_function(ctx.route_agent),
                                arguments_json=json.dumps({"task": ctx.route_task or ""}))]

    def _plan(
        self, requests: list[ToolCallRequest], tool_specs: list[dict[str, Any]],
        agent_specs: list[dict[str, Any]],
    ) -> tuple[list[PlannedCall], list[tuple[PlannedCall, AgentConfig]]]:
        """Split the model's calls into tool calls and agent calls; unoffered ones are
        refused (a tool) or dropped (nothing offered at all)."""
        calls: list[PlannedCall] = []
        agent_calls: list[tuple[PlannedCall, AgentConfig]] = []
        offered_tools = {spec["function"]["name"] for spec in tool_specs}
        for request in requests:
            spec = self.agents.match(request.name) if self.agents is not None and agent_specs else None
            if spec is not None:
                agent_calls.append((PlannedCall(
                    call_id=request.id, name=request.name, function=request.name,
                    arguments=request.arguments_json, params={"task": task_of(request.arguments_json)},
                    error=None, execution_id=new_id("exec")), spec))
            elif self.tools is not None and tool_specs:
                call = plan_call(self.tools, call_id=request.id, name=request.name,
                                 arguments=request.arguments_json)
                tool = self.tools.resolve(request.name)
                if call.error is None and (tool is None or tool.function not in offered_tools):
                    call = dataclasses.replace(call, error=(
                        f"{self.tools.display_name(request.name)}: not offered to {self.agent}"))
                calls.append(call)
        return calls, agent_calls

    async def _delegate(
        self, ctx: TurnContext, call: PlannedCall, spec: AgentConfig, *, stream_id: int,
        messages: list[dict[str, Any]],
    ) -> AsyncIterator[Event]:
        """One sub-agent's whole turn nested in this stream, then its result for the model."""
        task = str((call.params or {}).get("task", ""))
        yield ToolCall(stream_id=stream_id, tool=agent_tool(spec.name),
                       execution_id=call.execution_id, params={"task": task})
        child = ResponseHarness(
            self.provider, agent=spec.name, system=spec.system or None,
            model=spec.model or ctx.model, depth=self.depth + 1,
            tools=self.tools if spec.tools else None, allowed_tools=frozenset(spec.tools),
            agents=self.agents, parent_stream_id=stream_id, task=task,
        )
        started = time.monotonic()
        error: str | None = None
        try:
            async for event in child(ctx):
                yield event
        except PipelineError as exc:  # the sub-agent failed: its stream closes, the parent goes on
            error = f"agent {spec.name}: {exc}"
            if child.stream_id is not None:
                yield ErrorEvent(stream_id=child.stream_id, error=str(exc),
                                 retryable=bool(getattr(exc, "retryable", False)))
                yield StreamEnd(stream_id=child.stream_id, status="error")
        ms = round((time.monotonic() - started) * 1000)
        data = {"agent": spec.name, "text": child.answer}
        yield ToolResult(stream_id=stream_id, tool=agent_tool(spec.name),
                         execution_id=call.execution_id, ok=error is None,
                         data=data if error is None else None, error=error, duration_ms=ms)
        body = {"ok": True, "data": data} if error is None else {"ok": False, "error": error}
        messages.append({"role": "tool", "tool_call_id": call.call_id,
                         "content": json.dumps(body, ensure_ascii=False)})


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

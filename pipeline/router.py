"""The router decides how a turn is answered, with a model (issue 14, seed 000).

Routes, among those the deployment enables:

* ``respond``: one model answers (the tools it is offered stay available);
* ``agent``: the message asks for tools: the response model's tool loop;
* ``delegate``: hand the task to a named sub-agent (``AGENTS``); the response starts with
  that agent's call, nested in its stream, and continues with its result;
* ``roundtable``: the configured panel (``ROUNDTABLE_PANEL``) answers.

With ``ROUTER_MODEL`` set, that model is asked for one JSON object ``{"route", "agent"?,
"task"?, "reason"}``; its call is a stream of its own (``agent: "router"``, depth 0) with its
``llm_call`` (trace) and ``token_usage`` naming the router's model. The offline model
answers such a prompt with :func:`pipeline.offline_model.route_rule`, deterministically from
the words of the message; without ``ROUTER_MODEL`` the same rule runs in-process (no model
call, today's turn shape). The decision is the ``route`` trace event (``route``,
``reason``). A router that fails or answers nonsense falls back to ``respond`` with an
``error`` event that says so: never a dead turn.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from core.errors import ProviderError
from core.events import ErrorEvent, Event, LlmCall, Route, StreamEnd, StreamStart, TokenUsage
from core.turn import TurnContext
from pipeline.harnesses import ModelReply
from pipeline.offline_model import ROUTER_PROMPT, route_rule
from pipeline.providers import ChatProvider

ROUTES = ("respond", "agent", "delegate", "roundtable")


class ModelRouter:
    """The router harness (see the module doc).

    Args:
        provider: Where the router's model is called (the provider registry).
        model: ``ROUTER_MODEL``; None runs the built-in rule instead of a model.
        agents: The sub-agents' names (``delegate`` is enabled when there are any).
        tools: The function names of the enabled tools (``agent`` is enabled when any).
        roundtable: Whether the ``roundtable`` route is enabled.
    """

    def __init__(
        self, provider: ChatProvider, *, model: str | None, agents: Sequence[str] = (),
        tools: Sequence[str] = (), roundtable: bool = False,
    ) -> None:
        self.provider = provider
        self.model = model
        self.agents = list(agents)
        self.tools = list(tools)
        self.routes = [r for r in ROUTES if r == "respond" or (r == "agent" and self.tools)
                       or (r == "delegate" and self.agents) or (r == "roundtable" and roundtable)]

    def prompt(self, ctx: TurnContext) -> list[dict[str, Any]]:
        """The router's messages: its instructions, then this turn's messages."""
        system = "\n".join([
            f"{ROUTER_PROMPT} Choose how to answer the conversation's last user message.",
            f"Routes: {', '.join(self.routes)}",
            f"Agents: {', '.join(self.agents)}",
            f"Tools: {', '.join(self.tools)}",
            'Answer with one JSON object: {"route": "<a route>", "agent": "<for delegate>", '
            '"task": "<for delegate>", "reason": "<why>"}.',
        ])
        return [{"role": "system", "content": system}, *ctx.messages]

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Event]:
        text = next((m["content"] for m in reversed(ctx.messages) if m["role"] == "user"), "")
        if self.model is None:
            decision = route_rule(text, routes=self.routes, agents=self.agents, tools=self.tools)
            yield self._decide(ctx, decision)
            return
        stream_id = ctx.next_stream_id()
        messages = self.prompt(ctx)
        yield StreamStart(stream_id=stream_id, agent="router", depth=0)
        yield LlmCall(stream_id=stream_id, model=self.model, messages=messages)
        reply = ModelReply()
        try:
            async for event in reply.events(self.provider.stream_chat(
                    model=self.model, messages=messages, max_tokens=300), stream_id=stream_id):
                if isinstance(event, TokenUsage):  # the decision is not the answer's text
                    yield event
            decision = self._parse("".join(reply.text))
        except (ProviderError, ValueError) as exc:
            yield ErrorEvent(stream_id=stream_id, retryable=getattr(exc, "retryable", False),
                             error=f"router {self.model} failed ({exc}); falling back to respond")
            yield StreamEnd(stream_id=stream_id, status="error")
            yield self._decide(ctx, {"route": "respond", "reason": "the router failed"})
            return
        yield StreamEnd(stream_id=stream_id, status="ok")
        yield self._decide(ctx, decision)

    def _parse(self, text: str) -> dict[str, str]:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end < start:
            raise ValueError(f"no JSON object in {text[:120]!r}")
        body = json.loads(text[start:end + 1])
        if not isinstance(body, dict) or body.get("route") not in self.routes:
            raise ValueError(f"route {body.get('route') if isinstance(body, dict) else body!r} "
                             f"is not one of {', '.join(self.routes)}")
        if body["route"] == "delegate" and body.get("agent") not in self.agents:
            raise ValueError(f"delegate to an unknown agent {body.get('agent')!r}")
        return {k: str(v) for k, v in body.items() if v is not None}

    @staticmethod
    def _decide(ctx: TurnContext, decision: dict[str, str]) -> Route:
        ctx.route = decision["route"]
        if ctx.route == "delegate":
            ctx.route_agent, ctx.route_task = decision.get("agent"), decision.get("task", "")
        reason = decision.get("reason")
        if ctx.route == "delegate":
            reason = f"{reason}; agent {ctx.route_agent}" if reason else f"agent {ctx.route_agent}"
        return Route(route=ctx.route, reason=reason)

"""Sub-agents as tools (issue 14): the response model hands a task to a named agent.

Each agent of ``AGENTS`` (name, system prompt, model, allowed tools) is offered to the
response model as a function ``agent_<name>`` with one parameter, ``task``. When the model
calls it (or the router decided ``delegate``), the parent stream shows a ``tool_call`` of
``agent.<name>``; the sub-agent's whole turn then streams *inside* the parent's stream as its
own ``stream_start`` … ``stream_end`` at ``depth + 1`` with ``parent_stream_id`` = the
parent's stream and ``agent`` = its name (its text, tool calls and usage visible), and a
``tool_result`` whose ``data.text`` is the sub-agent's answer goes back to the parent model,
which continues. A sub-agent may delegate further while its depth is below
``MAX_AGENT_DEPTH``; deeper, no agents are offered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from core.agent_settings import AgentConfig

AGENT_FUNCTION_PREFIX = "agent_"
AGENT_TOOL_PREFIX = "agent."


def agent_function(name: str) -> str:
    """The function name a model calls to hand a task to ``name``."""
    return f"{AGENT_FUNCTION_PREFIX}{name}"


def agent_tool(name: str) -> str:
    """The tool name in events (``tool_call.tool``): ``agent.<name>``."""
    return f"{AGENT_TOOL_PREFIX}{name}"


@dataclasses.dataclass(frozen=True, slots=True)
class AgentTeam:
    """The configured sub-agents and the nesting bound.

    Args:
        agents: The ``AGENTS`` entries.
        max_depth: The deepest a sub-agent's stream may be (``MAX_AGENT_DEPTH``).
    """

    agents: tuple[AgentConfig, ...]
    max_depth: int = 2

    @classmethod
    def of(cls, agents: Sequence[AgentConfig], *, max_depth: int) -> AgentTeam:
        return cls(tuple(agents), max_depth)

    @property
    def names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def get(self, name: str) -> AgentConfig | None:
        return next((agent for agent in self.agents if agent.name == name), None)

    def match(self, function: str) -> AgentConfig | None:
        """The agent a model's call names (``agent_<name>`` or ``agent.<name>``)."""
        for prefix in (AGENT_FUNCTION_PREFIX, AGENT_TOOL_PREFIX):
            if function.startswith(prefix):
                return self.get(function[len(prefix):])
        return None

    def offered(self, *, depth: int) -> list[dict[str, Any]]:
        """The agents as OpenAI function specs for a stream at ``depth`` (none at the bound)."""
        if depth >= self.max_depth:
            return []
        return [
            {"type": "function", "function": {
                "name": agent_function(agent.name),
                "description": f"Hand a task to the sub-agent {agent.name}"
                               + (f": {agent.system[:200]}" if agent.system else ""),
                "parameters": {"type": "object", "properties": {
                    "task": {"type": "string", "description": "what the agent should do"}},
                    "required": ["task"]},
            }}
            for agent in self.agents
        ]


def task_of(arguments_json: str) -> str:
    """The ``task`` of an agent call's arguments (the raw text when they are not JSON)."""
    try:
        body = json.loads(arguments_json or "{}")
    except ValueError:
        return arguments_json
    if isinstance(body, dict) and isinstance(body.get("task"), str):
        return str(body["task"])
    return arguments_json

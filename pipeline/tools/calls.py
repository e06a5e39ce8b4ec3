"""Running a batch of tool calls as events: what both tool harnesses share.

:func:`run_calls` emits a ``tool_call`` for every call first (in the order asked), runs the
calls concurrently, emits each ``tool_result`` as its call finishes, and appends one tool
message per call (in the order asked, as OpenAI requires) to ``messages``. Calls past
``MAX_TOOL_CALLS_PER_STEP``, calls of unknown or disabled tools and calls whose arguments
are not a JSON object get an ``ok: false`` result at once, without running. If the consumer
goes away (the turn is cancelled), the running calls are cancelled too (a running
command's process group is killed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from core.events import Event, ToolCall, ToolResult
from core.turn import new_id
from pipeline.tools.registry import ToolOutcome, ToolRegistry, function_name
from pipeline.tools.safety import ToolRefusal

__all__ = ["PlannedCall", "assistant_message", "plan_call", "run_calls"]

_PARAMS_PREVIEW = 2000


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedCall:
    """One call to make.

    Attributes:
        call_id: The model's ``tool_call_id`` (the tool message answers it).
        name: The tool as named (tool or function name).
        function: The function name sent back to the model in the assistant message.
        arguments: The arguments JSON as sent back to the model.
        params: The parsed parameters, or None when they could not be parsed.
        error: Why the parameters could not be parsed.
        execution_id: Our id of this execution (events, ``tool_executions``).
    """

    call_id: str
    name: str
    function: str
    arguments: str
    params: dict[str, Any] | None
    error: str | None
    execution_id: str


def plan_call(
    registry: ToolRegistry, *, call_id: str, name: str, arguments: str | Mapping[str, Any] | None,
) -> PlannedCall:
    """Parse one call's arguments (a malformed one is kept, with its error)."""
    tool = registry.resolve(name)
    function = tool.function if tool is not None else function_name(name)
    raw = arguments if isinstance(arguments, str) else json.dumps(dict(arguments or {}))
    params: dict[str, Any] | None = None
    error = registry.unavailable(name)  # known at once: no need to start a task
    try:
        params = registry.parse_arguments(arguments)
    except ToolRefusal as exc:
        error = error or f"{registry.display_name(name)}: {exc}"
    return PlannedCall(call_id=call_id, name=name, function=function, arguments=raw,
                       params=params, error=error, execution_id=new_id("exec"))


def assistant_message(text: str, calls: Sequence[PlannedCall]) -> dict[str, Any]:
    """The assistant message that asked for ``calls`` (OpenAI's shape)."""
    return {
        "role": "assistant", "content": text or None,
        "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.function, "arguments": call.arguments}}
            for call in calls
        ],
    }


async def run_calls(
    registry: ToolRegistry, calls: Sequence[PlannedCall], *, stream_id: int,
    messages: list[dict[str, Any]],
) -> AsyncIterator[Event]:
    """``tool_call`` events, then ``tool_result`` events as calls finish (see module doc)."""
    limit = registry.limits.max_calls_per_step
    outcomes: dict[str, ToolOutcome] = {}
    for call in calls:
        params = call.params if call.params is not None else {
            "_unparsed_arguments": call.arguments[:_PARAMS_PREVIEW]}
        yield ToolCall(stream_id=stream_id, tool=registry.display_name(call.name),
                       execution_id=call.execution_id, params=params)

    async def one(call: PlannedCall) -> tuple[PlannedCall, ToolOutcome]:
        return call, await registry.execute(call.name, call.params)

    tasks: list[asyncio.Task[tuple[PlannedCall, ToolOutcome]]] = []
    for index, call in enumerate(calls):
        if index >= limit:
            outcomes[call.execution_id] = ToolOutcome(ok=False, error=(
                f"not run: more than {limit} tool calls in one step (MAX_TOOL_CALLS_PER_STEP)"))
        elif call.error is not None:
            outcomes[call.execution_id] = ToolOutcome(ok=False, error=call.error)
        else:
            tasks.append(asyncio.ensure_future(one(call)))
    try:
        for call in calls:  # refusals first: they are already known
            outcome = outcomes.get(call.execution_id)
            if outcome is not None:
                yield _result(registry, call, outcome, stream_id)
        for finished in asyncio.as_completed(tasks):
            call, outcome = await finished
            outcomes[call.execution_id] = outcome
            yield _result(registry, call, outcome, stream_id)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    max_chars = registry.limits.result_max_chars
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.call_id,
                         "content": outcomes[call.execution_id].for_model(max_chars)})


def _result(registry: ToolRegistry, call: PlannedCall, outcome: ToolOutcome, stream_id: int) -> ToolResult:
    return ToolResult(
        stream_id=stream_id, tool=registry.display_name(call.name), execution_id=call.execution_id,
        ok=outcome.ok, data=outcome.data if outcome.ok else None, error=outcome.error,
        duration_ms=outcome.duration_ms,
    )

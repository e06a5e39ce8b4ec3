"""The tool registry: what tools exist, which are enabled, and one safe way to run them.

A :class:`Tool` is a name (``fs.read``), a description, a pydantic parameter model (its JSON
schema is what the model sees) and an async implementation. :meth:`ToolRegistry.execute` is
the only way tools run: it never raises (cancellation aside) — an unknown or disabled tool,
arguments that are not a JSON object, parameters that fail validation, a refusal, a
timeout or a bug all come back as a :class:`ToolOutcome` with ``ok=False`` and a clear
``error``.

Tool names contain a dot; OpenAI function names may not (``^[A-Za-z0-9_-]{1,64}$``), so the
model sees ``fs_read`` and the registry maps it back (:meth:`ToolRegistry.resolve`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from core.errors import PipelineError
from pipeline.tools.safety import ToolRefusal

log = logging.getLogger(__name__)

__all__ = [
    "Tool",
    "ToolLimits",
    "ToolOutcome",
    "ToolRegistry",
    "ToolStepLimitError",
    "function_name",
]

P = TypeVar("P", bound=BaseModel)

_FUNCTION_NAME = re.compile(r"[^A-Za-z0-9_-]")


def function_name(tool: str) -> str:
    """The OpenAI function name of a tool name: ``fs.read`` → ``fs_read``."""
    return _FUNCTION_NAME.sub("_", tool)[:64] or "_"


class ToolStepLimitError(PipelineError):
    """The model kept calling tools past ``MAX_TOOL_STEPS`` rounds in one response."""

    def __init__(self, *, max_steps: int) -> None:
        super().__init__(
            f"tool loop stopped: the model asked for tools again after {max_steps} rounds "
            f"(MAX_TOOL_STEPS={max_steps})"
        )
        self.max_steps = max_steps
        self.retryable = False


@dataclasses.dataclass(frozen=True, slots=True)
class Tool(Generic[P]):
    """One tool.

    Attributes:
        name: Dotted name, e.g. ``fs.read``.
        description: What the model is told the tool does.
        params: The parameter model; unknown fields are refused.
        run: The implementation; raise :class:`ToolRefusal` to refuse with a message.
        family: ``fs``, ``git``, ``terminal``, ``speech`` (what ``ENABLE_*`` switches).
        enabled: Whether it is offered and may run.
        disabled_reason: Why not, when disabled (e.g. ``ENABLE_TERMINAL=false``).
        timeout_s: The longest one call may take before it is abandoned.
    """

    name: str
    description: str
    params: type[P]
    run: Callable[[P], Awaitable[Any]]
    family: str
    enabled: bool = True
    disabled_reason: str | None = None
    timeout_s: float = 30.0

    @property
    def function(self) -> str:
        return function_name(self.name)

    def schema(self) -> dict[str, Any]:
        """The parameters' JSON schema (what the model sees)."""
        return self.params.model_json_schema()

    def openai_spec(self) -> dict[str, Any]:
        """The tool in OpenAI's function-calling format."""
        return {"type": "function", "function": {
            "name": self.function, "description": self.description, "parameters": self.schema(),
        }}

    def describe(self) -> dict[str, Any]:
        """The tool as ``GET /v1/tools`` lists it."""
        return {
            "name": self.name, "function": self.function, "family": self.family,
            "description": self.description, "enabled": self.enabled,
            "disabled_reason": self.disabled_reason, "parameters": self.schema(),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ToolOutcome:
    """The result of one tool call: ``data`` when ok, else ``error``."""

    ok: bool
    data: Any = None
    error: str | None = None
    duration_ms: int = 0

    def for_model(self, max_chars: int) -> str:
        """The tool message content the model gets: JSON, cut at ``max_chars``."""
        body = {"ok": True, "data": self.data} if self.ok else {"ok": False, "error": self.error}
        text = json.dumps(body, ensure_ascii=False, default=str)
        if len(text) > max_chars:
            text = text[:max_chars] + f"…[cut: {len(text) - max_chars} more characters]"
        return text


@dataclasses.dataclass(frozen=True, slots=True)
class ToolLimits:
    """Limits of the agent loop (settings ``MAX_TOOL_STEPS`` and friends)."""

    max_steps: int = 8
    max_calls_per_step: int = 8
    result_max_chars: int = 16_000
    arguments_max_bytes: int = 2_097_152


class ToolRegistry:
    """The tools of a server, enabled or not, and the one way to run them.

    Example:
        >>> registry = ToolRegistry(limits=ToolLimits())
        >>> registry.add(Tool(name="demo.echo", description="echo", params=Echo, run=echo,
        ...                   family="demo"))  # doctest: +SKIP
        >>> await registry.execute("demo.echo", {"text": "hi"})  # doctest: +SKIP
        ToolOutcome(ok=True, data={'text': 'hi'}, error=None, duration_ms=0)
    """

    def __init__(self, tools: Iterable[Tool[Any]] = (), *, limits: ToolLimits | None = None,
                 info: Mapping[str, Any] | None = None) -> None:
        self.limits = limits or ToolLimits()
        self.info: dict[str, Any] = dict(info or {})
        self._tools: dict[str, Tool[Any]] = {}
        self._functions: dict[str, str] = {}
        self._offered: list[dict[str, Any]] | None = None
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool[Any]) -> None:
        """Register a tool; names and function names must be unique."""
        if tool.name in self._tools or tool.function in self._functions:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool
        self._functions[tool.function] = tool.name
        self._offered = None

    @property
    def tools(self) -> list[Tool[Any]]:
        """Every registered tool, in registration order."""
        return list(self._tools.values())

    def enabled(self) -> list[Tool[Any]]:
        return [tool for tool in self._tools.values() if tool.enabled]

    def offered(self) -> list[dict[str, Any]]:
        """The enabled tools in OpenAI's ``tools=[...]`` format (empty: offer none)."""
        if self._offered is None:  # schemas are built once, not on every model call
            self._offered = [tool.openai_spec() for tool in self.enabled()]
        return list(self._offered)

    def resolve(self, name: str) -> Tool[Any] | None:
        """The tool a model or client named, by tool name or function name."""
        tool = self._tools.get(name)
        if tool is None and name in self._functions:
            tool = self._tools[self._functions[name]]
        return tool

    def display_name(self, name: str) -> str:
        """The dotted tool name for events (the name as given when unknown)."""
        tool = self.resolve(name)
        return tool.name if tool is not None else name

    def unavailable(self, name: str) -> str | None:
        """Why a tool cannot run (unknown or disabled), or None when it can."""
        tool = self.resolve(name)
        if tool is None:
            known = ", ".join(t.name for t in self.enabled()) or "none"
            return f"unknown tool {name[:100]!r}; enabled tools: {known}"
        if not tool.enabled:
            return f"{tool.name}: disabled ({tool.disabled_reason})"
        return None

    async def execute(self, name: str, params: Mapping[str, Any] | str | None) -> ToolOutcome:
        """Run one call. Never raises (except ``CancelledError``): failures are outcomes.

        Args:
            name: Tool or function name.
            params: The parameters, or the model's arguments as a JSON string.
        """
        started = time.perf_counter()

        def failed(message: str) -> ToolOutcome:
            return ToolOutcome(ok=False, error=message, duration_ms=_ms(started))

        tool = self.resolve(name)
        refusal = self.unavailable(name)
        if tool is None or refusal is not None:
            return failed(refusal or "")
        try:
            arguments = self.parse_arguments(params)
            validated = tool.params.model_validate(arguments)
        except ToolRefusal as exc:
            return failed(f"{tool.name}: {exc}")
        except ValidationError as exc:
            return failed(f"{tool.name}: invalid parameters: {_problems(exc)}")
        try:
            async with asyncio.timeout(tool.timeout_s):
                data = await tool.run(validated)
        except ToolRefusal as exc:
            return failed(f"{tool.name}: {exc}")
        except TimeoutError:
            return failed(f"{tool.name}: timed out after {tool.timeout_s:g}s")
        except Exception as exc:  # a bug in a tool must not break the turn
            log.exception("tool %s failed", tool.name)
            return failed(f"{tool.name}: failed: {type(exc).__name__}: {exc}")
        return ToolOutcome(ok=True, data=data, duration_ms=_ms(started))

    def parse_arguments(self, params: Mapping[str, Any] | str | None) -> dict[str, Any]:
        """Parameters as a dict; a JSON string must hold an object (``""`` means ``{}``).

        Raises:
            ToolRefusal: Too large, not JSON, or not an object.
        """
        if params is None:
            return {}
        if isinstance(params, str):
            size = len(params.encode("utf-8", "surrogatepass"))
            if size > self.limits.arguments_max_bytes:
                raise ToolRefusal(
                    f"arguments are {size} bytes; the limit is {self.limits.arguments_max_bytes} "
                    "(TOOL_ARGUMENTS_MAX_BYTES)"
                )
            if not params.strip():
                return {}
            try:
                params = json.loads(params)
            except ValueError as exc:
                raise ToolRefusal(f"arguments are not valid JSON: {exc}") from exc
        if not isinstance(params, Mapping):
            raise ToolRefusal(f"arguments must be a JSON object, got {type(params).__name__}")
        return dict(params)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()[:5]
    )


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)  # whole ms, as on every wire

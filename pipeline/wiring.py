"""The orchestrator's router, sub-agents, advisor, routed roundtable and prices, from the
settings (issue 14); ``server.py`` passes these to :class:`StreamingOrchestrator`."""

from __future__ import annotations

from typing import Any

from reactivex import Observable

from core.config import Settings
from core.events import Event
from core.turn import ChatMessage, TurnContext
from pipeline.advisor import AdvisorStep
from pipeline.agents import AgentTeam
from pipeline.harnesses import Archivist, MemoryHarness
from pipeline.prices import PriceTable, load_prices
from pipeline.provider_registry import ProviderRegistry, RegistryConfigError, UnknownModelError
from pipeline.roundtable import Pacer, RoundtableHarness, RoundtableRequest, panel_of
from pipeline.router import ModelRouter
from pipeline.tools import ToolRegistry


def price_table(settings: Settings, registry: ProviderRegistry) -> PriceTable:
    """The bundled prices, ``PRICES_FILE`` and ``PRICES``, by ``provider/model``."""
    return PriceTable(load_prices(file=settings.prices_file, overrides=settings.prices),
                      qualify=registry.qualify)


def agent_options(
    settings: Settings, *, registry: ProviderRegistry, tools: ToolRegistry | None,
    store: Archivist | None,
) -> dict[str, Any]:
    """Keyword arguments for :class:`~pipeline.orchestrator.StreamingOrchestrator`.

    Raises:
        RegistryConfigError: ``ROUTER_MODEL``, ``ADVISOR_MODEL``, an agent's model or a
            ``ROUNDTABLE_PANEL`` model that no provider serves (refused at start, not at
            the first request).
    """
    named = [("ROUTER_MODEL", settings.router_model), ("ADVISOR_MODEL", settings.advisor_model),
             *((f"AGENTS[{a.name}].model", a.model) for a in settings.agents),
             *(("ROUNDTABLE_PANEL", p.model) for p in panel_of(settings.roundtable_panel))]
    for setting, model in named:
        if model is not None:
            try:
                registry.resolve(model)
            except UnknownModelError as exc:
                raise RegistryConfigError(f"{setting}: {exc}") from exc
    team = AgentTeam.of(settings.agents, max_depth=settings.max_agent_depth) if settings.agents else None
    offered = tools.offered() if tools is not None and settings.max_tool_steps else []
    router = ModelRouter(
        registry, model=settings.router_model, agents=team.names if team else (),
        tools=[spec["function"]["name"] for spec in offered], roundtable=True,
    )
    advisor = (AdvisorStep(registry, model=settings.advisor_model,
                           max_redirects=settings.advisor_max_redirects)
               if settings.advisor_model else None)

    def roundtable(ctx: TurnContext) -> Observable[Event]:
        last = next((m["content"] for m in reversed(ctx.messages) if m["role"] == "user"), "")
        spec = RoundtableRequest(
            messages=[ChatMessage(role="user", content=last or "(nothing)")],
            panelists=panel_of(settings.roundtable_panel), rounds=settings.roundtable_rounds,
            max_tokens=ctx.max_tokens,
        )
        harness = RoundtableHarness(
            provider=registry, spec=spec, pacer=Pacer(paced=False),
            memory=MemoryHarness(store, limit=settings.history_max_messages) if store is not None
            else _no_memory,
            max_buffer_per_panelist=settings.roundtable_max_queue,
        )
        return harness.body(ctx, route=False)

    return {"router": router, "agents": team, "advisor": advisor, "roundtable": roundtable,
            "cost": price_table(settings, registry).cost}


async def _no_memory(ctx: TurnContext) -> Any:  # pragma: no cover - the server has a store
    return
    yield

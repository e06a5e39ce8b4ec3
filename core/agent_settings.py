"""The shapes of the providers-and-agents settings (issue 14): ``PROVIDERS``, ``AGENTS``,
``PRICES``. Validated when :class:`core.config.Settings` is built, so a bad value stops the
server at start (``invalid settings``) instead of failing a request later."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Names of the bundled offline providers (each serves the model ``offline``).
OFFLINE_PROVIDERS: tuple[str, ...] = ("offline-a", "offline-b", "offline-c")
#: The model every bundled offline provider serves.
OFFLINE_MODEL = "offline"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class ProviderConfig(BaseModel):
    """One entry of ``PROVIDERS``: an OpenAI-compatible endpoint.

    ``models`` empty means "ask the endpoint's ``/models`` at start". Other keys (a
    ``comment``, a vendor's note) are allowed and ignored.
    """

    model_config = ConfigDict(extra="allow")

    base_url: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    models: list[str] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0, description="default MODEL_TIMEOUT_S")
    max_retries: int | None = Field(default=None, ge=0, description="default MODEL_MAX_RETRIES")
    max_connections: int | None = Field(default=None, ge=1,
                                        description="default MODEL_MAX_CONNECTIONS")

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str]) -> list[str]:
        if any(not m or m != m.strip() for m in models):
            raise ValueError("model ids must be non-empty, without surrounding spaces")
        return models


class AgentConfig(BaseModel):
    """One entry of ``AGENTS``: a sub-agent the response model may hand a task to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,47}$")
    system: str = Field(default="", max_length=20_000)
    model: str | None = Field(default=None, min_length=1, description="default: the turn's model")
    tools: list[str] = Field(default_factory=list, description="tool names it may call")


class PriceConfig(BaseModel):
    """USD per million tokens of one ``provider/model``."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


def check_provider_names(providers: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
    """Provider names are ids in ``provider/model``: no slash, no spaces."""
    import re

    for name in providers:
        if not re.match(_NAME, name):
            raise ValueError(f"provider name {name!r}: letters, digits, '_', '-', '.' only")
    return providers


def check_agent_names(agents: list[AgentConfig]) -> list[AgentConfig]:
    names = [agent.name for agent in agents]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"agent names must be unique; repeated: {', '.join(repeated)}")
    return agents

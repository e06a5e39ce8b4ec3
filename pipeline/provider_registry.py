"""The provider registry: ``provider/model`` ids → (an :class:`OpenAIProvider`, a model).

Built from the settings at start (:func:`open_registry`):

* the bundled offline providers ``offline-a``, ``offline-b``, ``offline-c`` (each an
  :class:`~pipeline.offline_model.OfflineModelServer` on a loopback port serving the model
  ``offline``, each with a voice of its own, so one prompt reads differently from each;
  ``OFFLINE_PROVIDERS=false`` leaves them out);
* today's single provider, when ``OPENAI_BASE_URL`` or ``OPENAI_API_KEY`` is set, named
  ``openai`` (its models: ``MODELS``, else what its ``/models`` lists, plus ``DEFAULT_MODEL``);
* every ``PROVIDERS`` entry: an OpenAI-compatible base URL, the environment variable that
  holds its key, its models (empty: ask ``/models``), timeouts and a connection limit.

A model id is ``<provider>/<model>`` (split at the first ``/`` when the part before it names
a provider, so ``openrouter/anthropic/claude-3.5-sonnet`` works) or a bare id, which means
``DEFAULT_PROVIDER`` (the first configured provider, else ``offline-a``). The registry is
itself a :class:`~pipeline.providers.ChatProvider`: harnesses pass the id as the turn named
it and the registry sends the call to the right endpoint with the bare model. A provider
that is down fails the calls that name it (a :class:`~core.errors.ProviderError`); nothing
falls back to another provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from core.agent_settings import OFFLINE_MODEL, OFFLINE_PROVIDERS, ProviderConfig
from core.config import Settings
from core.errors import PipelineError, ProviderError
from pipeline.offline_model import OfflineModelServer
from pipeline.providers import OpenAIProvider, Piece, Usage

log = logging.getLogger(__name__)

#: The voice of each bundled offline provider ("" is the plain offline model).
OFFLINE_VOICES: dict[str, str] = {"offline-a": "", "offline-b": "offline-b", "offline-c": "offline-c"}
LEGACY_PROVIDER = "openai"


class UnknownModelError(PipelineError):
    """A model id that no configured provider serves."""

    def __init__(self, model: str, *, reason: str) -> None:
        super().__init__(f"The model {model!r} does not exist: {reason}; GET /v1/models lists them.")
        self.model = model


class RegistryConfigError(PipelineError):
    """The provider settings cannot make a working registry (e.g. no provider at all)."""


@dataclasses.dataclass
class ProviderEntry:
    """One configured provider and what is known of its state.

    ``state``: ``ok`` (answered last), ``unknown`` (not called yet), ``down`` (unreachable
    or timing out), ``error`` (answered with an error), ``missing_key`` (its key variable
    is not set).
    """

    name: str
    provider: OpenAIProvider
    models: list[str]
    offline: bool = False
    api_key_env: str | None = None
    state: str = "unknown"
    error: str | None = None
    server: OfflineModelServer | None = dataclasses.field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"base_url": self.provider.name, "models": list(self.models), "state": self.state,
                "error": self.error, "offline": self.offline, "api_key_env": self.api_key_env}


class ProviderRegistry:
    """``provider/model`` → provider; a :class:`~pipeline.providers.ChatProvider` itself.

    Args:
        entries: The providers, in configuration order.
        default: The provider of a bare model id.
    """

    name = "registry"

    def __init__(self, entries: Sequence[ProviderEntry], *, default: str) -> None:
        self.entries: dict[str, ProviderEntry] = {entry.name: entry for entry in entries}
        if default not in self.entries:
            raise RegistryConfigError(
                f"DEFAULT_PROVIDER {default!r} is not configured; providers: "
                + (", ".join(self.entries) or "none"))
        self.default = default

    def split(self, model_id: str) -> tuple[ProviderEntry, str]:
        """The provider and bare model of ``model_id`` (not checked against its models)."""
        head, slash, rest = model_id.partition("/")
        if slash and head in self.entries and rest:
            return self.entries[head], rest
        return self.entries[self.default], model_id

    def resolve(self, model_id: str) -> tuple[ProviderEntry, str]:
        """Like :meth:`split`, but the model must be one the provider serves."""
        entry, model = self.split(model_id)
        if model not in entry.models:
            raise UnknownModelError(model_id, reason=f"provider {entry.name!r} serves "
                                    + (", ".join(entry.models) or "no listed models"))
        return entry, model

    def qualify(self, model_id: str) -> str:
        """``model_id`` as ``provider/model``."""
        entry, model = self.split(model_id)
        return f"{entry.name}/{model}"

    def model_ids(self) -> list[str]:
        """Every model: bare aliases of the default provider's, then ``provider/model``."""
        bare = list(self.entries[self.default].models)
        return [*bare, *(f"{e.name}/{m}" for e in self.entries.values() for m in e.models)]

    def provider_of(self, model_id: str) -> OpenAIProvider:
        return self.split(model_id)[0].provider

    @property
    def offline_server(self) -> OfflineModelServer | None:
        """The first bundled offline provider's server (its stats are what tests read)."""
        return next((e.server for e in self.entries.values() if e.server is not None), None)

    def health(self) -> dict[str, Any]:
        return {name: {**entry.describe(), "default": name == self.default}
                for name, entry in self.entries.items()}

    async def list_models(self) -> list[str]:
        return self.model_ids()

    async def stream_chat(
        self, *, model: str, messages: Sequence[dict[str, Any]], max_tokens: int | None = None,
        tools: Sequence[dict[str, Any]] | None = None, **options: Any,
    ) -> AsyncIterator[Piece]:
        """The provider's ``stream_chat`` with the bare model; ``options`` (any further chat
        parameters a caller passes) are forwarded as they are."""
        entry, bare = self.split(model)
        qualified = model != bare  # the caller named the provider: usage names it too
        if tools:
            options["tools"] = tools
        pieces = entry.provider.stream_chat(model=bare, messages=messages, max_tokens=max_tokens,
                                            **options)
        try:
            async for piece in pieces:
                if entry.state != "ok":
                    entry.state, entry.error = "ok", None
                if qualified and isinstance(piece, Usage):
                    piece = dataclasses.replace(piece, model=f"{entry.name}/{piece.model}")
                yield piece
        except ProviderError as exc:
            entry.state = "down" if exc.status is None and exc.retryable else "error"
            entry.error = str(exc)
            raise


async def open_registry(settings: Settings, stack: contextlib.AsyncExitStack) -> ProviderRegistry:
    """Start the offline providers and make a client per provider; ``stack`` closes them."""
    entries: list[ProviderEntry] = []
    configured: list[str] = []

    def client(base_url: str | None, key: str | None, spec: ProviderConfig | None) -> OpenAIProvider:
        provider = OpenAIProvider(
            base_url=base_url, api_key=key,
            timeout_s=spec.timeout_s if spec and spec.timeout_s else settings.model_timeout_s,
            max_retries=spec.max_retries if spec and spec.max_retries is not None
            else settings.model_max_retries,
            max_connections=spec.max_connections if spec and spec.max_connections
            else settings.model_max_connections,
        )
        stack.push_async_callback(provider.aclose)
        return provider

    if settings.openai_base_url or settings.openai_api_key:
        if LEGACY_PROVIDER not in settings.providers:
            provider = client(settings.openai_base_url, settings.openai_api_key, None)
            models = list(settings.models) or await _listed(provider, settings)
            if settings.default_model not in models:
                models.insert(0, settings.default_model)
            entries.append(ProviderEntry(LEGACY_PROVIDER, provider, models))
            configured.append(LEGACY_PROVIDER)
    for name, spec in settings.providers.items():
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        provider = client(spec.base_url, key, spec)
        entry = ProviderEntry(name, provider, list(spec.models), api_key_env=spec.api_key_env)
        if spec.api_key_env and not key:
            entry.state, entry.error = "missing_key", f"{spec.api_key_env} is not set"
        if not entry.models:
            try:
                entry.models = await asyncio.wait_for(provider.list_models(),
                                                      settings.provider_list_timeout_s)
            except Exception as exc:  # no listing: the provider is down, its ids unknown
                entry.state, entry.error = "down", f"listing models failed: {exc}"
                log.warning("provider %s: %s", name, entry.error)
        entries.append(entry)
        configured.append(name)
    if settings.offline_providers:
        for name in OFFLINE_PROVIDERS:
            if name in settings.providers:
                continue  # configured explicitly: that entry wins
            server = await stack.enter_async_context(OfflineModelServer(
                token_delay_ms=settings.offline_token_delay_ms, models=(OFFLINE_MODEL,),
                voice=OFFLINE_VOICES[name]))
            # Today's offline configuration: MODELS (and DEFAULT_MODEL) are what the first
            # offline provider offers when no other provider is configured.
            legacy = not configured and name == OFFLINE_PROVIDERS[0] and settings.models
            entries.append(ProviderEntry(name, client(server.base_url, "offline", None),
                                         list(settings.models) if legacy else [OFFLINE_MODEL],
                                         offline=True, state="ok", server=server))
    if not entries:
        raise RegistryConfigError("no model provider: set PROVIDERS (or OPENAI_BASE_URL), "
                                  "or leave OFFLINE_PROVIDERS on")
    default = settings.default_provider or (configured[0] if configured else OFFLINE_PROVIDERS[0])
    registry = ProviderRegistry(entries, default=default)
    if "default_model" in settings.model_fields_set:  # named on purpose: always offered
        entry, bare = registry.split(settings.default_model)
        if bare not in entry.models:
            entry.models.insert(0, bare)
    return registry


def default_model(registry: ProviderRegistry, settings: Settings) -> str:
    """``DEFAULT_MODEL`` when its provider serves it, else the default provider's first model."""
    entry, bare = registry.split(settings.default_model)
    if bare in entry.models or not registry.entries[registry.default].models:
        return settings.default_model
    return registry.entries[registry.default].models[0]


async def _listed(provider: OpenAIProvider, settings: Settings) -> list[str]:
    try:
        return await asyncio.wait_for(provider.list_models(), settings.provider_list_timeout_s)
    except Exception as exc:  # a provider without /models still serves DEFAULT_MODEL
        log.warning("could not list the provider's models (%s); offering %s only",
                    exc, settings.default_model)
        return []

"""The provider registry (issue 14): README examples, ids, defaults, health, no fallback."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

import server
from core.config import Settings
from pipeline.provider_registry import (
    ProviderRegistry,
    RegistryConfigError,
    UnknownModelError,
    open_registry,
)
from tests.sse_client import assert_wire_rules, read_frames

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = re.compile(r"<!-- providers example: (?P<name>[\w-]+) -->\n```json\n(?P<json>.*?)```", re.S)


def readme_examples() -> dict[str, dict[str, Any]]:
    return {m.group("name"): json.loads(m.group("json")) for m in EXAMPLE.finditer(README.read_text())}


def test_the_readme_has_every_documented_example() -> None:
    assert sorted(readme_examples()) == sorted(
        ["openai", "gemini", "anthropic", "ollama", "vllm", "openrouter"])


@pytest.mark.parametrize("name", sorted(readme_examples()))
async def test_each_readme_example_configures_the_registry(name: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    example = readme_examples()[name]
    monkeypatch.setenv("PROVIDERS", json.dumps(example))
    for spec in example.values():
        if spec.get("api_key_env"):
            monkeypatch.setenv(spec["api_key_env"], "sk-test")
    settings = Settings(db_path=tmp_path / "e.duckdb", offline_providers=False)
    async with contextlib.AsyncExitStack() as stack:
        registry = await open_registry(settings, stack)  # no network: the models are listed
        assert list(registry.entries) == [name] and registry.default == name
        entry = registry.entries[name]
        assert entry.models == example[name]["models"] and entry.state == "unknown"
        assert entry.provider.name == example[name]["base_url"].rstrip("/")
        for model in example[name]["models"]:
            assert registry.resolve(f"{name}/{model}") == (entry, model)
            assert registry.resolve(model) == (entry, model)  # bare: the default provider
        assert registry.model_ids() == [*example[name]["models"],
                                        *(f"{name}/{m}" for m in example[name]["models"])]


async def test_all_examples_at_once_with_offline_providers(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    merged = {k: v for example in readme_examples().values() for k, v in example.items()}
    settings = Settings(db_path=tmp_path / "e.duckdb", providers=merged, default_provider="openai")
    async with contextlib.AsyncExitStack() as stack:
        registry = await open_registry(settings, stack)
        assert list(registry.entries) == [*merged, "offline-a", "offline-b", "offline-c"]
        assert registry.entries["gemini"].state == "missing_key"  # GEMINI_API_KEY is not set
        entry, model = registry.resolve("openrouter/anthropic/claude-3.5-sonnet")
        assert (entry.name, model) == ("openrouter", "anthropic/claude-3.5-sonnet")
        assert registry.qualify("gpt-4o") == "openai/gpt-4o"
        with pytest.raises(UnknownModelError, match="ollama"):
            registry.resolve("ollama/gpt-4o")
        with pytest.raises(UnknownModelError):
            registry.resolve("offline")  # bare ids mean openai's


def test_bad_provider_settings_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(providers={"a/b": {"base_url": "http://x/v1"}})
    with pytest.raises(ValidationError):
        Settings(providers={"x": {"models": ["m"]}})  # no base_url
    with pytest.raises(ValidationError):
        Settings(agents=[{"name": "a"}, {"name": "a"}])


async def test_default_provider_and_offline_switch(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        registry = await open_registry(Settings(db_path=tmp_path / "e.duckdb"), stack)
        assert registry.default == "offline-a"
        assert registry.model_ids() == ["offline", "offline-a/offline", "offline-b/offline",
                                        "offline-c/offline"]
    with pytest.raises(RegistryConfigError, match="no model provider"):
        async with contextlib.AsyncExitStack() as stack:
            await open_registry(Settings(offline_providers=False), stack)
    with pytest.raises(RegistryConfigError, match="DEFAULT_PROVIDER"):
        async with contextlib.AsyncExitStack() as stack:
            await open_registry(Settings(default_provider="nowhere"), stack)
    assert ProviderRegistry.name == "registry"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_down_provider_fails_its_requests_and_nothing_falls_back(
        aiohttp_client: Any, tmp_path: Path) -> None:
    dead = {"dead": {"base_url": f"http://127.0.0.1:{closed_port()}/v1", "models": ["m"],
                     "max_retries": 0, "timeout_s": 2}}
    client: TestClient = await aiohttp_client(server.create_app(Settings(
        db_path=tmp_path / "e.duckdb", offline_token_delay_ms=0, providers=dead,
        default_provider="offline-a")))
    async with client.get("/v1/models") as resp:
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert "dead/m" in ids and "offline-b/offline" in ids and ids[0] == "offline"
    async with client.post("/v1/orchestrate", json={
            "model": "dead/m", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        events = assert_wire_rules(await read_frames(resp), trace=False)
    (error,) = [e for e in events if e["type"] == "error"]
    assert "unreachable" in error["error"] and error["retryable"] is True
    assert not [e for e in events if e["type"] == "text"]  # no other provider answered
    assert events[-1]["ok"] is False
    async with client.get("/healthz") as resp:
        health = await resp.json()
    assert health["providers"]["dead"]["state"] == "down"
    assert health["providers"]["offline-b"]["state"] == "ok"
    assert health["providers"]["offline-a"]["default"] is True
    async with client.post("/v1/chat/completions", json={
            "model": "nowhere/m", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


async def test_a_configured_provider_gets_its_key_and_the_bare_model(
        aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    from pipeline.offline_model import create_offline_app

    seen: list[tuple[str, str]] = []
    upstream_app = create_offline_app(token_delay_ms=0, models=("vendor-model",))

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/chat/completions"):
            body = await request.json()
            seen.append((request.headers.get("Authorization", ""), body["model"]))
        response: web.StreamResponse = await handler(request)
        return response

    upstream_app.middlewares.append(record)
    upstream = await aiohttp_server(upstream_app)
    monkeypatch.setenv("VENDOR_KEY", "sk-vendor")
    providers = {"vendor": {"base_url": str(upstream.make_url("/v1")), "api_key_env": "VENDOR_KEY"}}
    client: TestClient = await aiohttp_client(server.create_app(Settings(
        db_path=tmp_path / "e.duckdb", offline_token_delay_ms=0, providers=providers)))
    async with client.get("/v1/models") as resp:  # listed from the provider at start
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert ids[:2] == ["vendor-model", "vendor/vendor-model"]  # the first configured is default
    for model in ("vendor/vendor-model", "vendor-model"):
        async with client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["message"]["content"].startswith("You said")
    assert seen == [("Bearer sk-vendor", "vendor-model")] * 2

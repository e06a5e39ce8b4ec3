"""Shared test setup."""

from __future__ import annotations

import pytest

# Settings read these from the environment; a developer's shell must not turn a test's
# offline model into a real provider (or change its limits).
PROVIDER_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)

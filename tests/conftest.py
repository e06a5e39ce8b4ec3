"""Shared test setup."""

from __future__ import annotations

import pytest

from core.config import Settings


@pytest.fixture(autouse=True)
def _no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the Settings a test builds count, whatever the shell exports: a developer's
    OPENAI_* must not turn a test's offline model into a real provider, nor a stray
    FLUSH_INTERVAL_MS change a test's limits."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)

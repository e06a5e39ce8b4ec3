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


def _dump_tasks() -> None:
    """Print every running event loop's tasks with their stacks (a hung test shows where
    each coroutine waits: pytest-timeout's own dump shows threads only)."""
    import asyncio
    import gc
    import sys

    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if not loop.is_running():
            continue

        def dump(loop: asyncio.AbstractEventLoop = loop) -> None:
            tasks = asyncio.all_tasks(loop)
            print(f"\n=== {len(tasks)} asyncio tasks still running ===", file=sys.stderr)
            for task in tasks:
                print(f"--- {task!r}", file=sys.stderr)
                task.print_stack(limit=30, file=sys.stderr)
            sys.stderr.flush()

        loop.call_soon_threadsafe(dump)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):  # type: ignore[no-untyped-def]
    """A test still running at ``TASK_DUMP_S`` (default: 30 s before pytest-timeout's
    limit) has its asyncio tasks printed, so a hang names the await it is stuck in."""
    import os
    import threading

    try:
        limit = float(item.config.getini("timeout") or 0)
    except ValueError:  # pytest-timeout is not installed: no limit to dump before
        limit = 0.0
    after = float(os.environ.get("TASK_DUMP_S") or max(0.0, limit - 30))
    timer = threading.Timer(after, _dump_tasks) if after > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()

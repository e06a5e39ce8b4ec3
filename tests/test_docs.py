"""The documentation's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.turn import ChatMessage, TurnInput
from pipeline.offline_model import OfflineModelServer, compose_answer
from pipeline.orchestrator import StreamingOrchestrator
from pipeline.providers import OpenAIProvider
from sinks.store import EventStore
from tests.analytics_data import create_store_views, record, synthetic_turns

ROOT = Path(__file__).resolve().parent.parent


def sql_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", markdown.read_text(), flags=re.S)


def test_compose_example_prints_a_well_formed_panel_turn() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compose_pipeline.py"), "hello panel"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    ).stdout
    kinds = re.findall(r"^event: (\w+)$", out, flags=re.M)
    ids = [int(i) for i in re.findall(r"^id: (\d+)$", out, flags=re.M)]
    assert kinds[0] == "request_received" and kinds[-1] == "done"
    assert kinds.count("done") == 1
    assert kinds.count("stream_start") == kinds.count("stream_end") == 2
    assert "route" not in kinds  # the example filters trace events out
    assert ids == sorted(set(ids)) and ids[0] == 1
    # Both voices answered the question, each with its own system prompt.
    question = [{"role": "user", "content": "hello panel"}]
    for name, stream_id in (("Alice", 1), ("Bob", 2)):
        tokens = compose_answer(
            "offline", [{"role": "system", "content": f"You are {name}."}, *question],
            max_tokens=12,
        )
        assert f"# stream {stream_id}: {''.join(tokens)}" in out


@pytest.fixture
async def recorded_store(tmp_path: Path) -> EventStore:
    """A store holding a two-turn conversation and a failed turn, made by real turns."""
    store = EventStore(tmp_path / "events.duckdb", flush_interval_ms=20).open()
    async with OfflineModelServer(token_delay_ms=1) as model:
        provider = OpenAIProvider(base_url=model.base_url, api_key="x", max_retries=0)
        orchestrator = StreamingOrchestrator(provider=provider, store=store, default_model="offline")
        first = orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content="one")]))
        await first.result
        second = orchestrator.run(TurnInput(
            messages=[ChatMessage(role="user", content="two")],
            conversation_id=first.conversation_id, trace=True,
        ))
        await second.result
        failed = orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content="x")],
                                            model="no-such-model"))
        assert (await failed.result).status == "error"
        await provider.aclose()
    await store.flush()
    yield store
    store.close()


@pytest.fixture
async def analyst_store(recorded_store: EventStore) -> EventStore:
    """The recorded turns plus synthetic ones with tools and a roundtable, and the views."""
    create_store_views(recorded_store)
    await record(recorded_store, synthetic_turns())
    return recorded_store


async def test_every_analyst_query_runs(analyst_store: EventStore) -> None:
    blocks = sql_blocks(ROOT / "docs" / "analysts.md")
    assert len(blocks) >= 12
    for sql in blocks:
        rows = await analyst_store.aquery(sql)
        assert rows, f"query returned nothing:\n{sql}"


async def test_rebuilt_text_matches_stored_message(recorded_store: EventStore) -> None:
    [rebuild] = [sql for sql in sql_blocks(ROOT / "docs" / "analysts.md") if "string_agg" in sql]
    rows = await recorded_store.aquery(rebuild)
    assert len(rows) == 2
    for _request_id, text, stored in rows:
        assert text == stored


async def test_failure_query_names_the_error(recorded_store: EventStore) -> None:
    [failures] = [sql for sql in sql_blocks(ROOT / "docs" / "analysts.md") if "type = 'turn_error'" in sql]
    rows = await recorded_store.aquery(failures)
    assert len(rows) == 1
    _request_id, model, error, retryable = rows[0]
    assert model == "no-such-model"
    assert "404" in error and retryable is False

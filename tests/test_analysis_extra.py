"""The ``[analysis]`` extra: the pandas / polars snippet of docs/analysts.md runs, as written,
over a lake made by ``python -m pipeline export`` from a store file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.events import Done, RequestReceived
from sinks.store import EventStore, RequestRow

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.S)


def test_the_pandas_and_polars_snippet_runs_over_an_exported_lake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pandas", reason="the [analysis] extra is not installed")
    pytest.importorskip("polars", reason="the [analysis] extra is not installed")
    [snippet] = [b for b in python_blocks(ROOT / "docs" / "analysts.md") if "polars" in b]
    db = tmp_path / "data" / "events.duckdb"
    with EventStore(db) as store:
        for request_id in ("r1", "r2"):
            for seq, event in enumerate((
                    RequestReceived(agent="assistant", conversation_id="c", ts=1_790_000_000.0),
                    Done(ok=True, duration_ms=7, reason="completed", ts=1_790_000_001.0)), start=1):
                event.request_id, event.seq = request_id, seq
                store.append_event(event, agent=None, depth=None)
            store.put_request(RequestRow(
                request_id=request_id, conversation_id="c", kind="orchestrate", status="completed",
                started_at=1_790_000_000.0, finished_at=1_790_000_001.0, duration_ms=7))
    export = subprocess.run([sys.executable, "-m", "pipeline", "export", "--db", str(db)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert export.returncode == 0, export.stderr
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(snippet, "docs/analysts.md", "exec"), scope)
    events, requests = scope["events"], scope["requests"]
    assert sorted(events["type"]) == ["done", "done", "request_received", "request_received"]
    assert sorted(requests["request_id"].to_list()) == ["r1", "r2"]
    assert requests["duration_ms"].to_list() == [7, 7]

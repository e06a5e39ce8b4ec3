"""The ``agentflow`` console script and the Makefile's ``run`` (issue 15)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import server
from sinks.store import EventStore
from tests.ops_server import ROOT, clean_env, launch, wait_healthy
from tests.procs import free_port


def test_the_console_script_is_declared_and_its_module_ships_in_the_wheel() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"agentflow": "server:cli"}
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"] == {"server.py": "server.py"}
    assert "otel" in project["project"]["optional-dependencies"]


def _agentflow(*args: str) -> subprocess.CompletedProcess[str]:
    """What the installed ``agentflow`` script runs: ``sys.exit(server.cli())``."""
    return subprocess.run(
        [sys.executable, "-c", "import sys, server; sys.exit(server.cli())", *args],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)


def test_agentflow_dispatches_to_the_pipeline_cli(tmp_path: Path) -> None:
    db = tmp_path / "events.duckdb"
    EventStore(db).open().close()
    done = _agentflow("query", "SELECT count(*) + 42 AS answer FROM events", "--db", str(db),
                      "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == [[42]]
    assert "python -m pipeline report" in _agentflow("report", "--help").stdout


def test_agentflow_without_a_command_or_with_an_unknown_one_says_so() -> None:
    empty = _agentflow()
    assert empty.returncode == 2 and "usage: agentflow {serve,query,export,report,sql}" in empty.stderr
    unknown = _agentflow("bogus")
    assert unknown.returncode == 2 and "unknown command 'bogus'" in unknown.stderr
    assert server.cli(["--help"]) == 0


def test_agentflow_sql_opens_the_pipelines_prompt(tmp_path: Path) -> None:
    db = tmp_path / "events.duckdb"
    EventStore(db).open().close()
    done = subprocess.run(
        [sys.executable, "-c", "import sys, server; sys.exit(server.cli())", "sql", "--db", str(db)],
        cwd=ROOT, env=clean_env(), input="SELECT 6 * 7 AS answer;\n", capture_output=True,
        text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "42" in done.stdout
    assert "usage: python -m pipeline sql" in _agentflow("sql", "--help").stdout


def test_agentflow_serve_serves(tmp_path: Path) -> None:
    running = wait_healthy(launch(
        tmp_path, argv=[sys.executable, "-c", "import sys, server; sys.exit(server.cli())", "serve"]))
    assert running.stop() == 0
    assert "serving on " + running.base in running.output()


def _make_run_recipe() -> str:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert match is not None
    (line,) = match.group(1).strip().splitlines()
    return line.strip()


def test_make_run_takes_port_host_and_db_path_from_the_environment(tmp_path: Path) -> None:
    recipe = _make_run_recipe()
    assert recipe == "$(PY) server.py"  # no flag overrides the environment
    # the recipe as make runs it, with the venv's python
    argv = [sys.executable if word == "$(PY)" else word for word in recipe.split()]
    port = free_port()
    running = wait_healthy(launch(tmp_path, argv=argv, port=port, HOST="127.0.0.1"))
    assert running.stop() == 0
    assert f"serving on http://127.0.0.1:{port} (db {tmp_path / 'events.duckdb'}," in running.output()


def test_make_install_includes_the_otel_extra() -> None:
    assert "pip install --quiet -e '.[dev,otel]'" in (ROOT / "Makefile").read_text()


def test_the_server_tunes_the_garbage_collector_once_serving(tmp_path: Path) -> None:
    """``GC_GEN0_THRESHOLD`` and ``GC_FREEZE`` (issue 12) reach the serving process; 0 and
    false leave Python's collector as it is."""
    tuned = wait_healthy(launch(tmp_path / "tuned", GC_GEN0_THRESHOLD="12345"))
    assert tuned.stop() == 0
    match = re.search(r"garbage collector: thresholds \((\d+), (\d+), (\d+)\), (\d+) startup",
                      tuned.output())
    assert match is not None, tuned.output()
    assert int(match.group(1)) == 12345 and int(match.group(4)) > 10_000
    assert "event loop: uvloop" in tuned.output()  # EVENT_LOOP=auto, uvloop installed
    plain = wait_healthy(launch(tmp_path / "plain", GC_GEN0_THRESHOLD="0", GC_FREEZE="false"))
    assert plain.stop() == 0
    assert ("garbage collector: thresholds (700, 10, 10), 0 startup objects frozen;"
            in plain.output())  # Python's own


def test_event_loop_asyncio_keeps_the_standard_loop_and_uvloop_is_refused_when_missing(
        tmp_path: Path) -> None:
    """``EVENT_LOOP`` (issue 12): ``asyncio`` runs asyncio's own loop; ``uvloop`` where it
    cannot be imported is a start-up failure naming the setting, not a silent fallback."""
    plain = wait_healthy(launch(tmp_path / "plain", EVENT_LOOP="asyncio"))
    assert plain.stop() == 0
    assert "event loop: asyncio" in plain.output()
    blocker = tmp_path / "no_uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('uvloop hidden by the test')\n")
    refused = launch(tmp_path / "refused", EVENT_LOOP="uvloop",
                     PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    assert refused.proc.wait(timeout=60) == 1
    assert "EVENT_LOOP=uvloop, but uvloop is not installed" in refused.output()


def _listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port`` (``ss``: Send-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out and out[0] == "LISTEN", out
    return int(out[2])


def test_the_listen_backlog_is_listen_backlog_not_asyncios_100(tmp_path: Path) -> None:
    """A burst of stream starts queues in the kernel while the loop starts the first ones:
    with asyncio's default backlog (100), 5-15 of 400 streams ramped over a second were
    reset before their first token (proxy_bench's fan-out, issue 12)."""
    default = wait_healthy(launch(tmp_path / "default"))
    try:
        assert _listen_backlog(int(default.base.rsplit(":", 1)[1])) == 1024
    finally:
        assert default.stop() == 0
    chosen = wait_healthy(launch(tmp_path / "chosen", LISTEN_BACKLOG="77"))
    try:
        assert _listen_backlog(int(chosen.base.rsplit(":", 1)[1])) == 77
    finally:
        assert chosen.stop() == 0

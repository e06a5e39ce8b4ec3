"""Issue 15's wire and tools properties against real ``python server.py`` processes on
loopback: the OpenAPI document (validated, fuzzed with schemathesis: no 5xx), httpx-sse on
the native stream, ``turn_error`` in a real browser's EventSource and the viewer page, and
the DuckDB CLI (the ``duckdb-cli`` package, 1.5.x) opening the store the server wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import pytest
from openapi_spec_validator import validate

from api.openapi import OPERATIONS, build_document
from tests.ops_server import Proc, wait_healthy
from tests.ops_server import launch as launch_process
from tests.procs import free_port
from tests.sse_client import assert_wire_rules, parse_sse

ROOT = Path(__file__).resolve().parents[1]
#: Bounds of the fuzz run, so it stays well under a minute on a shared 2-core machine.
FUZZ_MAX_EXAMPLES = 10
FUZZ_SEED = 15


#: The real-process helper the ops tests use (start, health wait, stop, whole log).
Server = Proc


def launch(folder: Path, **settings: str) -> Server:
    """``python server.py`` on a free loopback port with these settings (lower-case names
    are the Settings fields), no token delay and no scheduled export; waits until healthy."""
    upper = {name.upper(): value for name, value in settings.items()}
    return wait_healthy(launch_process(folder, OFFLINE_TOKEN_DELAY_MS="0", EXPORT_INTERVAL_S="0",
                                       **upper))


def assert_no_handler_errors(server: Server) -> None:
    """Nothing reached the 500 path (``json_errors`` logs each one as "unhandled error")."""
    log = server.output()
    assert "unhandled error" not in log and "internal server error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch(tmp_path_factory.mktemp("api-e2e"))
    yield server
    code = server.stop()
    assert code == 0, f"exit code {code}:\n{server.output()[-4000:]}"
    assert_no_handler_errors(server)


# -- the OpenAPI document --------------------------------------------------------------------
def test_the_served_document_is_valid_openapi_31(live: Server) -> None:
    served = httpx.get(f"{live.base}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"].startswith(
        "application/json")
    document = served.json()
    assert document == json.loads(json.dumps(build_document()))
    assert document["openapi"] == "3.1.0"
    validate(document)  # openapi-spec-validator: raises on any violation


def _schemathesis(live: Server, *, mode: str, phases: str, operations: str, include: bool,
                  folder: Path) -> str:
    """One ``schemathesis run`` against ``live``; its output. Fails on any server error."""
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        pytest.fail("schemathesis is not installed (pip install -e '.[dev]')")
    which = "--include-operation-id-regex" if include else "--exclude-operation-id-regex"
    run = subprocess.run(
        [str(cli), "run", f"{live.base}/openapi.json", "--checks", "not_a_server_error",
         "--mode", mode, "--phases", phases, "--max-examples", str(FUZZ_MAX_EXAMPLES),
         "--seed", str(FUZZ_SEED), "--workers", "1", "--request-timeout", "20",
         which, operations, "--report", "junit", "--report-dir", str(folder)],
        capture_output=True, text=True, timeout=240, cwd=folder,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed\s*$", output, re.M)
    assert counts is not None and counts.group(1) == counts.group(2), output[-6000:]
    assert int(counts.group(1)) >= FUZZ_MAX_EXAMPLES, output[-6000:]
    return output


def test_schemathesis_finds_no_server_error(live: Server, tmp_path: Path) -> None:
    """Valid and invalid requests for every operation that does not start a turn; only
    invalid ones (fuzzed bodies, parameters) for those that do. No 5xx anywhere."""
    turns = sorted(op.operation_id for op in OPERATIONS if op.starts_turn)
    assert turns == ["post_api_chat_stream", "post_chat_stream",  # the seeds' (issue 14)
                     "post_v1_chat_completions", "post_v1_orchestrate", "post_v1_responses",
                     "post_v1_roundtable"]
    pattern = "^(" + "|".join(turns) + ")$"
    others = _schemathesis(live, mode="all", phases="examples,coverage,fuzzing",
                           operations=pattern, include=False, folder=tmp_path)
    tested = re.search(r"Selected: (\d+)/(\d+)", others)
    assert tested is not None and int(tested.group(1)) == int(tested.group(2)) - len(turns), others
    # Every row is an operation schemathesis sees, but for the document's own URL, which it skips.
    assert int(tested.group(2)) == len(OPERATIONS) - 1, others
    before = httpx.post(f"{live.base}/v1/query", json={"sql": "SELECT count(*) FROM requests"},
                        timeout=10).json()["rows"][0][0]
    # The coverage phase also sends valid bodies under other content types, which the
    # server accepts (curl -d sends form-urlencoded): for turns, fuzzed invalid data only.
    negative = _schemathesis(live, mode="negative", phases="fuzzing", operations=pattern,
                             include=True, folder=tmp_path)
    assert re.search(rf"Selected: {len(turns)}/", negative), negative
    after = httpx.post(f"{live.base}/v1/query", json={"sql": "SELECT count(*) FROM requests"},
                       timeout=10).json()["rows"][0][0]
    assert after == before, "an invalid body started a turn"
    assert httpx.get(f"{live.base}/healthz", timeout=10).json()["status"] == "ok"
    assert_no_handler_errors(live)


# -- httpx-sse on the native stream ----------------------------------------------------------
def test_httpx_sse_reads_every_native_event_as_json(live: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5,
            "trace": True}
    with httpx.Client(base_url=live.base, timeout=20) as http:
        with httpx_sse.connect_sse(http, "POST", "/v1/orchestrate", json=body) as source:
            live_events = [(sse.event, sse.json()) for sse in source.iter_sse()]
        request_id = live_events[0][1]["request_id"]
        with httpx_sse.connect_sse(http, "GET", f"/v1/requests/{request_id}/events",
                                   params={"trace": "true"}) as source:
            replayed = [(sse.event, sse.json()) for sse in source.iter_sse()]
        raw = http.get(f"/v1/requests/{request_id}/events", params={"trace": "true"}).content
    assert live_events == replayed
    assert [kind for kind, _ in live_events] == [data["type"] for _, data in live_events]
    assert [kind for kind, _ in live_events][:5] == [
        "request_received", "route", "memory", "llm_call", "stream_start"]
    assert live_events[-1][0] == "done" and isinstance(live_events[-1][1]["duration_ms"], int)
    assert_wire_rules(parse_sse(raw), trace=True)


# -- turn_error in a browser -----------------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]

FOLLOW = """async (url) => new Promise((resolve) => {
  const seen = [], errors = [];
  const source = new EventSource(url);
  // The common client: close on onerror. With an `event: error` frame it would stop here.
  source.onerror = () => { errors.push(seen.length); source.close(); resolve({seen, errors}); };
  for (const name of ["request_received", "stream_start", "text", "stream_end", "turn_error",
                      "error", "message", "done"]) {
    source.addEventListener(name, (msg) => {
      seen.push([name, msg.data ? JSON.parse(msg.data).type : null]);
      if (name === "done") { source.close(); resolve({seen, errors}); }
    });
  }
})"""


def _chromium() -> str:
    path = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium and playwright are required under CI")
        pytest.skip("Debian's chromium or playwright is not installed")
    return path


def test_a_failed_turn_reaches_done_in_a_browser_eventsource(tmp_path: Path) -> None:
    """A turn whose model is unreachable: EventSource gets ``turn_error`` as a named event,
    never fires ``onerror`` for it, and reaches ``stream_end`` and ``done``; the viewer page
    shows the failed request without a script error."""
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    server = launch(tmp_path / "server", openai_base_url=f"http://127.0.0.1:{free_port()}/v1",
                    openai_api_key="x", models="[\"m\"]", default_model="m",
                    model_max_retries="0", model_timeout_s="2")
    try:
        started = httpx.post(f"{server.base}/v1/orchestrate", timeout=20, json={
            "messages": [{"role": "user", "content": "Will this work?"}], "background": True})
        assert started.status_code == 202, started.text
        request_id = started.json()["request_id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.goto(f"{server.base}/healthz")
                got: dict[str, Any] = page.evaluate(FOLLOW, f"/v1/requests/{request_id}/events")
                page.goto(f"{server.base}/?request={request_id}")
                page.wait_for_function("() => document.body.dataset.done !== undefined",
                                       timeout=20_000)
                reason = page.evaluate("() => document.body.dataset.done")
                status = page.inner_text("#status")
            finally:
                browser.close()
    finally:
        assert server.stop() == 0, server.output()[-4000:]
    assert got == {"errors": [], "seen": [
        ["request_received", "request_received"], ["stream_start", "stream_start"],
        ["turn_error", "turn_error"], ["stream_end", "stream_end"], ["done", "done"]]}
    assert reason == "error" and request_id in status, status
    assert problems == []


# -- the DuckDB CLI --------------------------------------------------------------------------
def _duckdb_cli() -> Path:
    """The ``duckdb`` binary of the ``duckdb-cli`` package (dev extra), never downloaded."""
    beside = Path(sys.executable).with_name("duckdb")
    found = beside if beside.exists() else shutil.which("duckdb")
    if found is None:
        pytest.skip("the duckdb-cli package is not installed (pip install -e '.[dev]')")
    return Path(found)


def test_the_duckdb_cli_opens_the_store_the_server_wrote(tmp_path: Path) -> None:
    cli = _duckdb_cli()
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("v1."), version
    server = launch(tmp_path / "server")
    try:
        reply = httpx.post(f"{server.base}/v1/orchestrate", timeout=20, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert reply.status_code == 200
        request_id = reply.headers["X-Request-Id"]
    finally:
        assert server.stop() == 0, server.output()[-4000:]
    sql = ("SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type; "
           "SELECT request_id, status, duration_ms FROM request_latency; "
           "SELECT tags['storage_version'] AS storage FROM duckdb_databases() "
           "WHERE database_name = current_database();")
    run = subprocess.run([str(cli), "-readonly", "-json", str(server.db), "-c", sql],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    results = [json.loads(chunk) for chunk in re.findall(r"\[.*?\]\s*(?=\[|$)", run.stdout, re.S)]
    assert len(results) == 3, run.stdout
    types, latency, storage = results
    assert {row["type"]: row["n"] for row in types} == {
        "request_received": 1, "route": 1, "memory": 1, "llm_call": 1, "stream_start": 1,
        "text": 3, "token_usage": 1, "stream_end": 1, "done": 1}
    [row] = latency
    assert row["request_id"] == request_id and row["status"] == "completed"
    assert isinstance(row["duration_ms"], int)
    assert storage == [{"storage": "v1.4.0+"}]


# -- python -m pipeline sql --server ---------------------------------------------------------
def test_the_sql_prompt_goes_through_a_running_server(live: Server) -> None:
    """While the server holds the file, ``--server`` reaches it through ``/v1/query``."""
    reply = httpx.post(f"{live.base}/v1/orchestrate", timeout=20, json={
        "messages": [{"role": "user", "content": "Count me"}], "max_tokens": 2})
    request_id = reply.headers["X-Request-Id"]
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "sql", "--server", live.base, "--format", "csv"],
        input=f"SELECT request_id, status FROM requests WHERE request_id = '{request_id}';\n"
              ".tables\nSELECT 1 +;\n",
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 1, run  # the last statement is a syntax error
    assert run.stdout.startswith(f"request_id,status\n{request_id},completed\nname,kind\n"), run.stdout
    assert "request_latency,VIEW" in run.stdout and "events,BASE TABLE" in run.stdout
    assert run.stderr.startswith("error: POST /v1/query: HTTP 400"), run.stderr
    # … and --db is refused while the server holds the file, with the way out.
    held = subprocess.run([sys.executable, "-m", "pipeline", "sql", "--db", str(live.db)],
                          input="SELECT 1;\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert held.returncode == 2 and "--server" in held.stderr, held

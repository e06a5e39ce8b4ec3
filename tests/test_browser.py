"""The roundtable viewer (``GET /``) in a real headless Chromium, against a real server.

Debian's ``chromium`` package (``.ci/run`` installs it when missing), driven by Playwright
for Python with ``executable_path``: Playwright's own browser builds are never downloaded.
The server is a real ``python server.py`` process on a loopback port with the offline
model. The test starts a roundtable from the page's form, watches the columns fill live,
compares each column with the panelist's text from the native events of the same request
(the replay endpoint), shows the trace, takes a screenshot (its path is printed and
recorded as the ``screenshot`` property), then reopens the page on ``/?request=<id>``.

Without Chromium or Playwright the test is skipped, except under CI (``CI=true``), where
it fails: there the browser must be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from core.config import Settings
from tests.procs import free_port
from tests.sse_client import parse_sse

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PANEL = ["alice", "bob", "carol"]
TOKEN_DELAY_MS = 10
WAIT_MS = 30_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (required under CI: .ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        _unavailable("Debian's chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    assert path is not None
    return path


# -- a real server process ------------------------------------------------------------------
def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("browser")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(OFFLINE_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS), PYTHONUNBUFFERED="1")
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(folder / "events.duckdb")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if _get(f"{base}/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy within 20 s:\n{log.read_text()}")
            time.sleep(0.05)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
    assert code == 0, f"server exit code {code}:\n{log.read_text()[-4000:]}"


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[BrowserContext]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


# -- what the page shows, what the server says ----------------------------------------------
def native_speeches(base: str, request_id: str) -> tuple[dict[str, list[str]], str]:
    """Each panelist's speech per round, and the moderator's text, from the replay."""
    status, body = _get(f"{base}/v1/requests/{request_id}/events")
    assert status == 200
    events = [json.loads(f.data) for f in parse_sse(body) if f.data is not None]
    assert events[-1]["type"] == "done" and events[-1]["reason"] == "completed", events[-1]
    owner: dict[int, str] = {}
    speeches: dict[str, list[str]] = {}
    moderator = ""
    for event in events:
        if event["type"] == "stream_start":
            owner[event["stream_id"]] = event["agent"]
            if event["depth"] == 1:
                speeches.setdefault(event["agent"], []).append("")
        elif event["type"] == "text":
            agent = owner[event["stream_id"]]
            if agent == "moderator":
                moderator += event["delta"]
            else:
                speeches[agent][-1] += event["delta"]
    return speeches, moderator


def page_speeches(page: Page) -> dict[str, list[str]]:
    shown: dict[str, list[str]] = page.eval_on_selector_all(
        "section.column[data-agent]",
        """columns => Object.fromEntries(columns.map(c => [c.dataset.agent,
             [...c.querySelectorAll('.text .speech')].map(s => s.textContent)]))""",
    )
    return shown


def moderator_text(page: Page) -> str:
    """The moderator's own text on the page (its advisor tags left out)."""
    text: str = page.eval_on_selector("#moderator", """m => [...m.childNodes]
        .filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.textContent).join('')""")
    return text


def wait_done(page: Page) -> str:
    page.wait_for_function("() => document.body.dataset.done !== undefined", timeout=WAIT_MS)
    reason: str = page.evaluate("() => document.body.dataset.done")
    return reason


def watched(page: Page, problems: list[str]) -> Page:
    """Collect the page's script errors, console errors and failed requests in ``problems``.

    The page has no favicon: the browser's own ``/favicon.ico`` 404 is the one allowed."""
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    page.on("response", lambda resp: problems.append(f"HTTP {resp.status} {resp.url}")
            if resp.status >= 400 and not resp.url.endswith("/favicon.ico") else None)
    return page


WATCH_LIVE = """
window.__liveSpeech = 0;
new MutationObserver(() => {
  const spoken = [...document.querySelectorAll('section.column .speech')]
    .filter(s => s.textContent.length > 0).length;
  const live = document.body && !document.body.dataset.done;
  if (live && spoken > window.__liveSpeech) window.__liveSpeech = spoken;
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def test_roundtable_in_chromium(
    browser: BrowserContext, live_server: str, tmp_path: Path,
    record_property: Callable[[str, Any], None],
) -> None:
    problems: list[str] = []
    page = watched(browser.new_page(), problems)
    page.add_init_script(WATCH_LIVE)
    page.goto(f"{live_server}/")
    assert page.title().endswith("roundtable")
    assert page.inner_text("#status") == "No roundtable yet."

    page.fill("#start input[name=topic]", "Is a browser the best test client?")
    page.fill("#start input[name=panelists]", ", ".join(PANEL))
    page.fill("#start input[name=rounds]", "2")
    page.select_option("#start select[name=mode]", "parallel")
    page.click("#go")
    assert wait_done(page) == "completed"
    request_id = page.evaluate("() => new URLSearchParams(location.search).get('request')")
    assert isinstance(request_id, str) and request_id.startswith("req_")

    # Live: panelists' speeches were on screen before the table was done.
    assert page.evaluate("() => window.__liveSpeech") >= 1

    # Every column holds exactly the panelist's text of the native events, round by round.
    speeches, moderator = native_speeches(live_server, request_id)
    assert sorted(speeches) == sorted(PANEL)
    shown = page_speeches(page)
    assert shown == speeches
    for name in PANEL:
        column = page.locator(f"section.column[data-agent={name}]")
        assert column.locator(".text").inner_text().strip()
        assert all(speeches[name]) and len(speeches[name]) == 2
        assert column.locator(".round").all_text_contents() == ["round 1", "round 2"]
        assert column.locator("h2 .state").inner_text() == "done"
    assert moderator_text(page) == moderator
    assert page.locator("#moderator .advisor").all_text_contents() == ["gate_continue: round 2 of 2"]
    assert request_id in page.inner_text("#status") and "completed" in page.inner_text("#status")

    # Trace: hidden until toggled; then the trace-only events are listed too.
    assert page.locator("#trace").is_hidden()
    page.check("#show-trace")
    assert page.locator("#trace").is_visible()
    trace_lines = page.locator("#trace .trace-event").all_text_contents()
    assert sum(" llm_call " in line for line in trace_lines) == 2 * len(PANEL)
    assert any(" route " in line for line in trace_lines)

    shot = tmp_path / "roundtable.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    record_property("screenshot", str(shot))
    print(f"\nroundtable screenshot: {shot}")

    # Resume: the page opened on a finished request shows the same table.
    again = watched(browser.new_page(), problems)
    again.goto(f"{live_server}/?request={request_id}")
    assert wait_done(again) == "completed"
    assert page_speeches(again) == speeches
    assert moderator_text(again) == moderator
    again.screenshot(path=str(tmp_path / "roundtable-resumed.png"), full_page=True)
    assert not problems, problems

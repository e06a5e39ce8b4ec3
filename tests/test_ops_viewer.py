"""The viewer's fixes (issue 15), in a real headless Chromium against a real server: how
``?request=<id>`` opens a roundtable is said on the page, an unknown id is an error, a viewed
request shows its own settings, the trace pane follows and wraps, and no favicon 404."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from tests.sse_client import parse_sse
from tests.test_browser import WAIT_MS, browser, chromium, live_server, wait_done

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

__all__ = ["browser", "chromium", "live_server"]  # the fixtures, shared with test_browser


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def _events(base: str, request_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{base}/v1/requests/{request_id}/events?trace=true",
                                    timeout=30) as resp:
            events = [json.loads(f.data) for f in parse_sse(resp.read()) if f.data]
        if events and events[-1]["type"] == "done":
            return events
        assert time.monotonic() < deadline
        time.sleep(0.2)


def strictly_watched(page: Page, problems: list[str], requested: list[str],
                     expected_404: str) -> Page:
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("request", lambda req: requested.append(req.url))
    page.on("response", lambda resp: problems.append(f"HTTP {resp.status} {resp.url}")
            if resp.status >= 400 and not resp.url.endswith(expected_404) else None)
    return page


def test_viewer_opens_a_request_by_id_with_its_settings(
    browser: BrowserContext, live_server: str,
) -> None:
    answer = _post(f"{live_server}/v1/roundtable", {
        "topic": "Tabs or spaces?", "panelists": [{"name": "dora"}, {"name": "emil"}],
        "rounds": 3, "mode": "sequential", "max_tokens": 4, "background": True})
    request_id = answer["request_id"]
    events = _events(live_server, request_id)
    problems: list[str] = []
    requested: list[str] = []
    page = strictly_watched(browser.new_page(), problems, requested, "/v1/requests/req_nope")
    page.goto(f"{live_server}/")
    hint = page.inner_text("#open")
    assert "?request=<request id>" in hint and "POST /v1/roundtable" in hint

    page.fill("#open input[name=request]", request_id)
    page.click("#open button")
    assert wait_done(page) == "completed"
    form = page.evaluate("""() => Object.fromEntries(['topic', 'panelists', 'rounds', 'mode']
        .map(name => [name, document.querySelector('#start').elements[name].value]))""")
    assert form == {"topic": "Tabs or spaces?", "panelists": "dora, emil", "rounds": "3",
                    "mode": "sequential"}
    assert page.evaluate("() => new URLSearchParams(location.search).get('request')") == request_id

    page.check("#show-trace")
    pane = page.evaluate("""() => { const p = document.querySelector('#trace');
        return {lines: [...p.children].map(l => l.textContent),
                atEnd: p.scrollHeight - p.scrollTop - p.clientHeight < 24,
                scrolls: p.scrollHeight > p.clientHeight,
                wraps: p.scrollWidth <= p.clientWidth}; }""")
    # every event, whole (no cut), and the pane shows the end and does not clip sideways
    assert pane["lines"] == [f"#{e['seq']} {e['type']} {json.dumps(e, separators=(',', ':'))}"
                             for e in events]
    assert pane["scrolls"] and pane["atEnd"] and pane["wraps"]

    page.goto(f"{live_server}/?request=req_nope")
    page.wait_for_function("() => document.body.dataset.error !== undefined", timeout=WAIT_MS)
    assert page.evaluate("() => document.body.dataset.error") == "request_not_found"
    assert page.inner_text("#status") == "Cannot open req_nope: no request 'req_nope'"
    assert not [url for url in requested if "favicon" in url]
    assert not problems, problems

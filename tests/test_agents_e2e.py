"""Issue 14's "done when", end to end offline against a real ``python server.py`` process:
a model router, nested sub-agents stored and replayed identically, an advisor redirect that
changes the answer, a roundtable of offline-a/b/c on both wires, costs in events, rows and
the view, and the seeds' two wires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.config import Settings
from tests.procs import free_port
from tests.sse_client import assert_wire_rules, read_frames
from tests.test_e2e_process import START_TIMEOUT_S, ServerProcess, get_json

ROOT = Path(__file__).resolve().parents[1]
PANEL = ["offline-a/offline", "offline-b/offline", "offline-c/offline"]
PRICES = {"offline-a/offline": {"input": 1.0, "output": 2.0},
          "offline-b/offline": {"input": 3.0, "output": 4.0},
          "offline-c/offline": {"input": 5.0, "output": 6.0}}
ENV = {
    "AGENTS": json.dumps([{"name": "planner", "system": "You plan.", "model": "offline-b/offline"},
                          {"name": "writer", "system": "You write."}]),
    "ROUTER_MODEL": "offline-a/offline",
    "ADVISOR_MODEL": "offline-c/offline",
    "PRICES": json.dumps(PRICES),
    "ROUNDTABLE_PANEL": json.dumps(PANEL),
    "ROUNDTABLE_ROUNDS": "1",
    "OFFLINE_TOKEN_DELAY_MS": "1",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(scope="module")
def agents_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("agents-e2e")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(ENV)
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(folder / "events.duckdb")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = ServerProcess(proc=proc, base=f"http://127.0.0.1:{port}", db=folder / "e", log=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{running.output()}")
        try:
            if get_json(f"{running.base}/healthz", timeout=1)["status"] == "ok":
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"server not healthy:\n{running.output()}")
        time.sleep(0.05)
    yield running.base
    assert running.stop() == 0, running.output()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


async def native(base: str, path: str, body: dict[str, Any] | None = None, *, trace: bool = True
                 ) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        request = http.post(f"{base}{path}", json=body) if body is not None else http.get(
            f"{base}{path}")
        async with request as resp:
            assert resp.status == 200, await resp.text()
            return assert_wire_rules(await read_frames(resp), trace=trace)


async def data_lines(base: str, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    async with aiohttp.ClientSession() as http, http.post(f"{base}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        raw = (await resp.read()).decode()
        request_id = resp.headers["X-Request-Id"]
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return request_id, [json.loads(b.removeprefix("data: ")) for b in blocks]


async def sql(base: str, query: str) -> list[list[Any]]:
    async with aiohttp.ClientSession() as http, http.post(f"{base}/v1/query",
                                                          json={"sql": query}) as resp:
        assert resp.status == 200, await resp.text()
        return list((await resp.json())["rows"])


def stream_text(events: list[dict[str, Any]], stream_id: int) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text" and e["stream_id"] == stream_id)


async def test_models_and_providers(agents_server: str) -> None:
    models = [m["id"] for m in get_json(f"{agents_server}/v1/models")["data"]]
    assert models == ["offline", *PANEL, "roundtable"]
    health = get_json(f"{agents_server}/healthz")
    assert sorted(health["providers"]) == ["offline-a", "offline-b", "offline-c"]


async def test_delegation_nested_stored_and_replayed_identically(agents_server: str) -> None:
    events = await native(agents_server, "/v1/orchestrate", {"trace": True, "messages": [
        {"role": "user", "content": "delegate to planner: delegate to writer: a short poem"}]})
    route = [e for e in events if e["type"] == "route"]
    assert [(r["route"], r["reason"]) for r in route] == [
        ("delegate", "the message hands a task to planner; agent planner")]
    starts = [(s["stream_id"], s["agent"], s["depth"], s["parent_stream_id"])
              for s in events if s["type"] == "stream_start"]
    assert starts == [(1, "router", 0, None), (2, "assistant", 0, None), (3, "planner", 1, 2),
                      (4, "writer", 2, 3), (5, "advisor", 1, 2)]
    assert stream_text(events, 4).startswith('You said: "a short poem".')
    assert stream_text(events, 3).startswith("[offline-b] The tool agent_writer returned:")
    assert stream_text(events, 2).startswith("The tool agent_planner returned:")
    usage = {e["stream_id"]: e["model"] for e in events if e["type"] == "token_usage"}
    assert usage == {1: "offline-a/offline", 2: "offline", 3: "offline-b/offline",
                     4: "offline", 5: "offline-c/offline"}
    request_id = events[0]["request_id"]
    replayed = await native(agents_server, f"/v1/requests/{request_id}/events?trace=true")
    assert replayed == events
    top = await native(agents_server, f"/v1/requests/{request_id}/events?max_depth=0",
                       trace=False)
    assert {e["agent"] for e in top if e["type"] == "stream_start"} == {"router", "assistant"}


async def test_advisor_redirect_changes_the_answer(agents_server: str) -> None:
    events = await native(agents_server, "/v1/orchestrate", {"trace": True, "messages": [
        {"role": "user", "content": "Tell me about rivers, and redirect if needed."}]})
    advice = [e for e in events if e["type"] == "advisor"]
    assert [a["kind"] for a in advice] == ["redirect", "gate_continue"]
    response = next(s["stream_id"] for s in events
                    if s["type"] == "stream_start" and s["agent"] == "assistant")
    before = "".join(e["delta"] for e in events if e["type"] == "text"
                     and e["stream_id"] == response and e["seq"] < advice[0]["seq"])
    after = "".join(e["delta"] for e in events if e["type"] == "text"
                    and e["stream_id"] == response and e["seq"] > advice[0]["seq"])
    assert before and after and before != after


async def test_roundtable_of_three_providers_on_both_wires(agents_server: str) -> None:
    panel = [{"name": p.split("/")[0], "model": p} for p in PANEL]
    events = await native(agents_server, "/v1/roundtable",
                          {"topic": "One stream or many?", "panelists": panel}, trace=False)
    agents = {s["stream_id"]: s["agent"] for s in events if s["type"] == "stream_start"}
    said = {agents[sid]: stream_text(events, sid) for sid in agents}
    assert len({said["offline-a"], said["offline-b"], said["offline-c"]}) == 3
    async with aiohttp.ClientSession() as http, http.post(
            f"{agents_server}/v1/chat/completions",
            json={"model": "roundtable", "messages": [{"role": "user", "content": "Hi"}]}) as resp:
        body = await resp.json()
    contents = [c["message"]["content"] for c in body["choices"]]
    assert len(contents) == 4 and len(set(contents[1:])) == 3


async def test_costs_in_events_rows_and_view(agents_server: str) -> None:
    events = await native(agents_server, "/v1/orchestrate", {"trace": True, "messages": [
        {"role": "user", "content": "delegate to planner: cost me something"}]})
    usage = [e for e in events if e["type"] == "token_usage"]
    assert usage and all(e["cost_usd"] is not None for e in usage)
    for e in usage:
        model = e["model"] if "/" in e["model"] else f"offline-a/{e['model']}"
        price = PRICES[model]
        assert e["cost_usd"] == pytest.approx(
            (e["prompt_tokens"] * price["input"] + e["completion_tokens"] * price["output"]) / 1e6)
    request_id = events[0]["request_id"]
    ((row_cost,),) = await sql(agents_server,
                               f"SELECT cost_usd FROM requests WHERE request_id = '{request_id}'")
    assert row_cost == pytest.approx(sum(e["cost_usd"] for e in usage))
    ((message_cost,),) = await sql(agents_server, "SELECT cost_usd FROM messages WHERE "
                                   f"request_id = '{request_id}' AND role = 'assistant'")
    assert message_cost == pytest.approx(row_cost)
    rows = await sql(agents_server, "SELECT provider, model, requests, cost_usd FROM "
                     "costs_by_model_day ORDER BY provider NULLS FIRST")
    providers = [r[0] for r in rows]
    assert {"offline-a", "offline-b", "offline-c"} <= set(providers)
    assert all(r[3] is not None and r[3] > 0 for r in rows)


async def test_the_seed_wires(agents_server: str) -> None:
    request_id, frames = await data_lines(agents_server, "/chat/stream",
                                          {"message": "hello", "provider": "offline-b"})
    assert frames[-1] == {"type": "end", "reason": "completed"}
    tokens = [f for f in frames if f["type"] == "token"]
    assert tokens and all(set(f) == {"type", "token"} for f in tokens)
    replayed = await native(agents_server, f"/v1/requests/{request_id}/events", trace=False)
    response = next(s["stream_id"] for s in replayed
                    if s["type"] == "stream_start" and s["agent"] == "assistant")
    assert "".join(f["token"] for f in tokens) == "".join(
        e["delta"] for e in replayed if e["type"] == "text" and e["stream_id"] == response)
    request_id, turns = await data_lines(agents_server, "/api/chat/stream",
                                         {"sessionId": "e2e-001", "content": "hi"})
    assert turns[0]["status"] == "pending" and turns[-1]["status"] == "complete"
    assert all("content" in t and "status" in t for t in turns)
    replayed = await native(agents_server, f"/v1/requests/{request_id}/events", trace=False)
    assert replayed[-1]["type"] == "done" and replayed[0]["conversation_id"] == "e2e-001"


def test_a_model_no_provider_serves_stops_the_server_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update({"ROUTER_MODEL": "offline-b/not-a-model", "PYTHONUNBUFFERED": "1"})
    done = subprocess.run(
        [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(free_port()),
         "--db", str(tmp_path / "e.duckdb")],
        cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 2
    assert b"invalid settings: ROUTER_MODEL: The model 'offline-b/not-a-model'" in done.stderr

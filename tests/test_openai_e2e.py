"""The OpenAI wire end to end: real clients against a real ``python server.py`` process, which
proxies to the offline model running as its own process (the stand-in upstream, whose
``GET /stats`` counts the streams a client dropped).

Clients: openai-python (streamed and not, a client-side tool loop, ``.parse()``), LangChain's
``ChatOpenAI(...).bind_tools(...)`` (the ``dev`` extra), and LiteLLM (about 380 MB with its
dependencies, so not in the ``dev`` extra: set ``LITELLM_PYTHON`` to an interpreter that has
``litellm``, e.g. a throw-away venv, or the test is skipped and says why).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import jsonschema
import openai
import pydantic
import pytest

from pipeline.offline_model import compose_answer
from tests.procs import free_port
from tests.test_e2e_process import ROOT, ServerProcess, get_json, server_env

MODEL = "offline"
NOTES = "The launch code is 7421, keep it safe."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]


@dataclass
class Stack:
    server: ServerProcess
    upstream: subprocess.Popen[bytes]
    upstream_url: str
    workspace: Path

    @property
    def base(self) -> str:
        return self.server.base

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = get_json(f"{self.upstream_url}/stats")
        return stats


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            get_json(url, timeout=1)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{url} not up in time:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("openai-e2e")
    up_port, port = free_port(), free_port()
    up_log = folder / "upstream.log"
    with up_log.open("wb") as out:
        upstream = subprocess.Popen(
            [sys.executable, "-m", "pipeline.offline_model", "--port", str(up_port),
             "--token-delay-ms", "5"], cwd=ROOT, env=server_env(5), stdout=out,
            stderr=subprocess.STDOUT)
    upstream_url = f"http://127.0.0.1:{up_port}"
    wait_healthy(f"{upstream_url}/v1/models", upstream, up_log)
    workspace = folder / "workspace"
    workspace.mkdir()
    (workspace / "notes.txt").write_text(NOTES + "\n")
    db, log = folder / "events.duckdb", folder / "server.log"
    env = {**server_env(5), "OPENAI_BASE_URL": f"{upstream_url}/v1", "OPENAI_API_KEY": "k"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port),
             "--db", str(db)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = ServerProcess(proc=proc, base=f"http://127.0.0.1:{port}", db=db, log=log)
    wait_healthy(f"{running.base}/healthz", proc, log)
    yield Stack(server=running, upstream=upstream, upstream_url=upstream_url, workspace=workspace)
    code = running.stop()
    upstream.terminate()
    upstream.wait(timeout=10)
    assert code == 0, running.output()
    text = log.read_text(errors="replace")
    assert " ERROR " not in text and "Traceback" not in text, text[-4000:]


def sdk(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0)


async def query(stack: Stack, sql: str) -> list[list[Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{stack.base}/v1/query", json={"sql": sql}) as resp:
        assert resp.status == 200, await resp.text()
        rows: list[list[Any]] = (await resp.json())["rows"]
        return rows


async def assert_workspace_untouched(stack: Stack) -> None:
    """No server tool ran: every tool execution is a client's, and no tool_result exists."""
    await asyncio.sleep(0.3)  # one flush interval
    assert await query(stack, "SELECT count(*) FROM events WHERE type = 'tool_result'") == [[0]]
    assert await query(stack, "SELECT count(*) FROM tool_executions WHERE status <> 'client'") == [[0]]
    assert sorted(p.name for p in stack.workspace.iterdir()) == ["notes.txt"]


async def test_openai_python_streamed_and_not(stack: Stack) -> None:
    async with sdk(stack) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=ASK)  # type: ignore[arg-type]
        assert whole.choices[0].message.content == "".join(compose_answer(MODEL, ASK))
        assert whole.choices[0].message.refusal is None
        stream = await client.chat.completions.create(model=MODEL, messages=ASK, stream=True)  # type: ignore[arg-type]
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == whole.choices[0].message.content
        model = await client.models.retrieve(MODEL)
        assert model.id == MODEL


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_python_client_tool_loop(stack: Stack, stream: bool) -> None:
    async with sdk(stack) as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model=MODEL, messages=ASK, tools=[WEATHER], stream=True)]  # type: ignore[arg-type, list-item]
            heads = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
            call_id = next(t.id for t in heads if t.id)
            arguments = "".join(t.function.arguments or "" for t in heads if t.function)
            asked: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": arguments}}]}
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        else:
            first = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])  # type: ignore[arg-type, list-item]
            assert first.choices[0].finish_reason == "tool_calls"
            (call,) = first.choices[0].message.tool_calls or []
            call_id, arguments = call.id, call.function.arguments  # type: ignore[union-attr]
            asked = first.choices[0].message.model_dump(exclude_none=True)
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
        loop = [*ASK, asked, {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]
        final = await client.chat.completions.create(model=MODEL, messages=loop, tools=[WEATHER])  # type: ignore[arg-type, list-item]
        assert final.choices[0].message.content == 'The tool get_weather returned: "sunny".'
    await assert_workspace_untouched(stack)


class City(pydantic.BaseModel):
    name: str
    population: int
    capital: bool


async def test_openai_python_parse_returns_the_pydantic_model(stack: Stack) -> None:
    async with sdk(stack) as client:
        parsed = await client.chat.completions.parse(model=MODEL, messages=ASK, response_format=City)  # type: ignore[arg-type]
    assert isinstance(parsed.choices[0].message.parsed, City)


async def test_closing_the_stream_stops_the_upstream_generation(stack: Stack) -> None:
    before = stack.stats()
    async with sdk(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK, stream=True, max_tokens=2000)  # type: ignore[arg-type]
        request_id = raw.headers["X-Request-Id"]
        stream = raw.parse()
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
    deadline = time.monotonic() + 10
    while (status := get_json(f"{stack.base}/v1/requests/{request_id}"))["status"] == "running":
        assert time.monotonic() < deadline, "the turn went on after the client left"
        await asyncio.sleep(0.05)
    assert status["status"] == "cancelled"
    partial = status["response"]["content"]
    assert partial and "".join(compose_answer(MODEL, ASK, max_tokens=2000)).startswith(partial)
    deadline = time.monotonic() + 10  # the upstream notices the closed call a moment later
    while (after := stack.stats())["disconnected"] == before["disconnected"]:
        assert time.monotonic() < deadline, "the upstream generation never stopped"
        await asyncio.sleep(0.05)
    assert after["disconnected"] == before["disconnected"] + 1
    assert after["completed"] == before["completed"]  # the generation never finished


# -- LangChain --------------------------------------------------------------------------------------
async def test_langchain_bind_tools_loop_streamed_and_not(stack: Stack) -> None:
    langchain_openai = pytest.importorskip("langchain_openai", reason="the dev extra has langchain-openai")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    async with httpx.AsyncClient() as http:  # closed here (LangChain's own is cached)
        llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{stack.base}/v1", api_key="x",
                                          max_retries=0, http_async_client=http)
        await _langchain_loop(stack, llm.bind_tools([get_weather]), get_weather)


async def _langchain_loop(stack: Stack, bound: Any, get_weather: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    question = HumanMessage("What is the weather in Paris? Use get_weather.")
    asked = await bound.ainvoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    streamed = None
    async for piece in bound.astream([question]):
        streamed = piece if streamed is None else streamed + piece
    assert streamed is not None and [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    result = get_weather.invoke(call["args"])
    final = await bound.ainvoke([question, asked, ToolMessage(result, tool_call_id=call["id"])])
    assert final.content == f'The tool get_weather returned: "{result}".'
    await assert_workspace_untouched(stack)


# -- LiteLLM ------------------------------------------------------------------------------------------
LITELLM_SCRIPT = textwrap.dedent('''
    import json, sys
    import litellm
    base, ask, tools = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    kw = dict(model="openai/offline", api_base=base, api_key="x")
    out = {}
    first = litellm.completion(messages=ask, tools=tools, **kw)
    call = first.choices[0].message.tool_calls[0]
    out["finish"] = first.choices[0].finish_reason
    out["name"], out["arguments"] = call.function.name, call.function.arguments
    loop = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    out["final"] = litellm.completion(messages=loop, tools=tools, **kw).choices[0].message.content
    parts, names = [], []
    for chunk in litellm.completion(messages=ask, tools=tools, stream=True, **kw):
        for t in chunk.choices[0].delta.tool_calls or []:
            names += [t.function.name] if t.function and t.function.name else []
            parts.append(t.function.arguments or "" if t.function else "")
    out["streamed_names"], out["streamed_arguments"] = names, "".join(parts)
    print(json.dumps(out))
''')


def test_litellm_client_tool_loop_streamed_and_not(stack: Stack) -> None:
    python = os.environ.get("LITELLM_PYTHON")
    if not python:
        try:
            import litellm  # noqa: F401
            python = sys.executable
        except ImportError:
            pytest.skip("litellm (about 380 MB installed) is not in the dev extra: set "
                        "LITELLM_PYTHON to an interpreter of a venv that has it")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run(
        [python, "-c", LITELLM_SCRIPT, f"{stack.base}/v1", json.dumps(ASK), json.dumps([WEATHER])],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["finish"] == "tool_calls" and out["name"] == "get_weather"
    jsonschema.validate(json.loads(out["arguments"]), WEATHER["function"]["parameters"])  # type: ignore[index]
    assert out["final"] == 'The tool get_weather returned: "sunny".'
    assert out["streamed_names"] == ["get_weather"]
    assert json.loads(out["streamed_arguments"]) == json.loads(out["arguments"])
    asyncio.run(assert_workspace_untouched(stack))

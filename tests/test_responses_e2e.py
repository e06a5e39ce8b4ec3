"""The Responses wire against real ``python server.py`` processes: the official ``openai``
client (create, stream, the accumulating helper, retrieve, cancel, and resume with
``starting_after`` after a SIGTERM and a restart), and the Vercel AI SDK's default
``createOpenAI({baseURL})(model)`` from Node (skipped, with the reason, without node/npm)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from api.responses import client_params_supported
from pipeline.offline_model import compose_answer
from tests.test_durable_e2e import running_server, start_server

MODEL = "offline"
#: Where the AI SDK is installed once (outside the repository), keyed by the versions asked.
AI_SDK_PACKAGES = ("ai@6", "@ai-sdk/openai@3")
AI_SDK_DIR = Path(os.environ.get("AI_SDK_CACHE", "/tmp/agentflow-ai-sdk-6-3"))
NPM_TIMEOUT_S = 240
NODE_TIMEOUT_S = 60


def answer(text: str, *, max_tokens: int | None = None) -> str:
    return "".join(compose_answer(MODEL, [{"role": "user", "content": text}],
                                  max_tokens=max_tokens))


def sdk(base: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def dumped(event: Any) -> dict[str, Any]:
    return dict(event.model_dump(exclude_unset=True))


async def test_openai_client_create_stream_retrieve_cancel(tmp_path: Path) -> None:
    async with running_server(tmp_path, "a", OFFLINE_TOKEN_DELAY_MS=2) as srv:
        async with sdk(srv.base) as client:
            plain = await client.responses.create(model=MODEL, input="hi there")
            assert plain.status == "completed" and plain.output_text == answer("hi there")

            stream = await client.responses.create(model=MODEL, input="stream", stream=True)
            events = [dumped(event) async for event in stream]
            assert events[0]["type"] == "response.created"
            assert events[-1]["type"] == "response.completed"
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            assert "".join(e["delta"] for e in events
                           if e["type"] == "response.output_text.delta") == answer("stream")

            async with client.responses.stream(model=MODEL, input="helper") as helper:
                async for _ in helper:
                    pass
                final = await helper.get_final_response()
            assert final.output_text == answer("helper")
            assert (await client.responses.retrieve(final.id)).output_text == answer("helper")

            slow = await client.responses.create(model=MODEL, input="long", background=True,
                                                 max_output_tokens=20000)
            cancelled = await client.responses.cancel(slow.id)
            assert cancelled.status == "cancelled"
            assert (await client.responses.retrieve(slow.id)).status == "cancelled"


async def test_resume_with_starting_after_after_a_sigterm_and_a_restart(tmp_path: Path) -> None:
    """A background response read part-way, the server stopped (SIGTERM: the turn finishes
    in the grace period) and started again on the same DuckDB file: the events after the
    client's last ``sequence_number`` are exactly the rest, no gap, no duplicate."""
    limit = 60
    first = await start_server(tmp_path, "first", OFFLINE_TOKEN_DELAY_MS=25, SHUTDOWN_GRACE_S=30)
    try:
        async with sdk(first.base) as client:
            created = await client.responses.create(model=MODEL, input="survive a restart",
                                                    background=True, max_output_tokens=limit)
            head: list[dict[str, Any]] = []
            async with await client.responses.retrieve(created.id, stream=True) as stream:
                async for event in stream:
                    head.append(dumped(event))
                    if len(head) == 10:
                        break
    finally:
        code = await asyncio.to_thread(first.stop)
    assert code == 0, first.output()
    assert head[-1]["type"] == "response.output_text.delta"  # mid-answer when it stopped

    async with running_server(tmp_path, "second") as second, sdk(second.base) as client:
        after = head[-1]["sequence_number"]
        resumed = await client.responses.retrieve(created.id, stream=True, starting_after=after)
        tail = [dumped(event) async for event in resumed]
        everything = [dumped(event) async for event in
                      await client.responses.retrieve(created.id, stream=True)]
        stored = await client.responses.retrieve(created.id)

    assert head + tail == everything
    assert [e["sequence_number"] for e in everything] == list(range(len(everything)))
    assert tail[0]["sequence_number"] == after + 1
    assert everything[-1]["type"] == "response.incomplete"  # it ran to its token limit
    text = answer("survive a restart", max_tokens=limit)
    assert "".join(e["delta"] for e in everything
                   if e["type"] == "response.output_text.delta") == text
    assert stored.output_text == text and stored.status == "incomplete"
    assert stored.model_dump(exclude_unset=True) == everything[-1]["response"]


async def test_after_a_kill_9_the_response_is_failed_and_replays_to_its_end(
        tmp_path: Path) -> None:
    """``kill -9`` mid-response: on the next start the turn is closed as interrupted, so the
    stored response is ``failed`` and its stream, numbered from 0 without gaps, ends with
    ``response.failed`` (at most ``FLUSH_INTERVAL_MS`` of its events were lost)."""
    first = await start_server(tmp_path, "first", OFFLINE_TOKEN_DELAY_MS=25,
                               FLUSH_INTERVAL_MS=20)
    try:
        async with sdk(first.base) as client:
            created = await client.responses.create(model=MODEL, input="crash", background=True,
                                                    max_output_tokens=400)
            async with await client.responses.retrieve(created.id, stream=True) as stream:
                seen = 0
                async for _ in stream:
                    seen += 1
                    if seen == 12:
                        break
            await asyncio.sleep(0.2)  # several flush intervals: the seen events are on disk
    finally:
        await asyncio.to_thread(first.kill)

    async with running_server(tmp_path, "second") as second, sdk(second.base) as client:
        stored = await client.responses.retrieve(created.id)
        events = [dumped(e) async for e in await client.responses.retrieve(created.id, stream=True)]

    assert stored.status == "failed" and stored.error is not None
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len(events) > 12
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text and answer("crash", max_tokens=400).startswith(text)


async def _status_when_ended(client: AsyncOpenAI, response_id: str) -> str:
    for _ in range(200):  # bounded poll: about 10 s
        status = (await client.responses.retrieve(response_id)).status
        if status not in ("queued", "in_progress"):
            return str(status)
        await asyncio.sleep(0.05)
    pytest.fail(f"{response_id} still in progress")


async def test_a_foreground_stream_dies_with_its_client_a_background_one_runs_on(
        tmp_path: Path) -> None:
    async with running_server(tmp_path, "d", OFFLINE_TOKEN_DELAY_MS=20) as srv, \
            sdk(srv.base) as client:
        ids: dict[bool, str] = {}
        for background in (False, True):
            async with await client.responses.create(
                    model=MODEL, input="leave early", stream=True, background=background,
                    max_output_tokens=200) as stream:
                async for event in stream:
                    ids[background] = dumped(event)["response"]["id"]
                    break  # the client goes away after response.created
        assert await _status_when_ended(client, ids[False]) == "cancelled"
        assert await _status_when_ended(client, ids[True]) == "incomplete"  # ran to its limit


# -- the Vercel AI SDK from Node --------------------------------------------------------------
def _ai_sdk() -> Path:
    """The AI SDK installed in a cached folder under /tmp (never in the repository); skips
    with the reason when node or npm is missing or the install fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the AI SDK test")
    marker = AI_SDK_DIR / "node_modules" / "@ai-sdk" / "openai" / "package.json"
    if not marker.exists():
        AI_SDK_DIR.mkdir(parents=True, exist_ok=True)
        (AI_SDK_DIR / "package.json").write_text('{"name": "ai-sdk-cache", "private": true}')
        try:
            done = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *AI_SDK_PACKAGES],
                cwd=AI_SDK_DIR, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install of the AI SDK took over {NPM_TIMEOUT_S}s")
        if done.returncode != 0 or not marker.exists():
            pytest.skip(f"npm install of the AI SDK failed: {done.stderr[-500:]}")
    return AI_SDK_DIR


SCRIPT = """
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, streamText, tool, jsonSchema, stepCountIs } from 'ai';
const [baseURL, withTools] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey: 'unused' });
const out = {};
const g = await generateText({ model: openai('offline'), prompt: 'hello from node' });
out.generate = { text: g.text, finish: g.finishReason, usage: g.usage.totalTokens,
                 id: g.response.id };
const s = streamText({ model: openai('offline'), prompt: 'stream from node', maxOutputTokens: 7 });
const parts = [];
for await (const p of s.textStream) parts.push(p);
out.stream = { parts, finish: await s.finishReason, usage: (await s.usage).outputTokens };
if (withTools === 'tools') {
  const calls = [];
  const t = await generateText({
    model: openai('offline'), prompt: 'What is the weather in Paris?',
    toolChoice: { type: 'tool', toolName: 'get_weather' }, stopWhen: stepCountIs(2),
    tools: { get_weather: tool({
      description: 'The weather of a city',
      inputSchema: jsonSchema({ type: 'object', properties: { city: { type: 'string' } },
                                required: ['city'] }),
      execute: async (input) => { calls.push(input); return 'sunny'; } }) },
    prepareStep: ({ stepNumber }) => stepNumber > 0 ? { toolChoice: 'none' } : undefined,
  });
  out.tools = { calls, steps: t.steps.length, text: t.text, finish: t.finishReason };
}
console.log(JSON.stringify(out));
"""


async def test_the_vercel_ai_sdk_default_provider_works_unchanged(tmp_path: Path) -> None:
    folder = await asyncio.to_thread(_ai_sdk)
    script = folder / "responses_check.mjs"  # beside node_modules, so imports resolve
    script.write_text(SCRIPT)
    tools = "tools" if client_params_supported() else "none"
    async with running_server(tmp_path, "node", OFFLINE_TOKEN_DELAY_MS=2) as srv:
        done = await asyncio.to_thread(
            subprocess.run, ["node", str(script), f"{srv.base}/v1", tools], cwd=folder,
            capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["generate"]["text"] == answer("hello from node")
    assert out["generate"]["finish"] == "stop"
    assert out["generate"]["id"].startswith("resp_")
    assert out["generate"]["usage"] > 0
    assert "".join(out["stream"]["parts"]) == answer("stream from node", max_tokens=7)
    assert out["stream"]["finish"] == "length"
    assert out["stream"]["usage"] == 7
    if tools == "tools":
        assert len(out["tools"]["calls"]) == 1 and isinstance(out["tools"]["calls"][0]["city"], str)
        assert out["tools"]["steps"] == 2 and out["tools"]["text"]

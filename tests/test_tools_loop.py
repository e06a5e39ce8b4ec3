"""The agent loop and the tool harnesses with a scripted model; the provider's tool-call
accumulation against a real HTTP stream; the offline model's tool calls and audio."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import wave
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from pydantic import BaseModel

from core.config import Settings
from core.events import Event
from core.turn import ChatMessage, ToolCallSpec, TurnInput, TurnResult
from pipeline.offline_model import (
    OfflineModelServer,
    compose_answer,
    plan_tool_calls,
    synthesize_wav,
    transcribe_audio,
)
from pipeline.orchestrator import StreamingOrchestrator, Turn
from pipeline.providers import Delta, Finish, OpenAIProvider, Piece, ToolCallRequest, Usage
from pipeline.tools import Tool, ToolLimits, ToolRegistry, build_registry
from sinks.store import EventStore
from tests.test_providers import tiny_server

Step = Piece | asyncio.Event


class ToolScriptedProvider:
    """Plays one script per model call and records what each call was sent."""

    name = "scripted"

    def __init__(self, *scripts: Sequence[Step]) -> None:
        self.scripts = [list(script) for script in scripts]
        self.calls: list[list[dict[str, Any]]] = []
        self.tools: list[Any] = []

    async def stream_chat(
        self, *, model: str, messages: Sequence[dict[str, Any]], max_tokens: int | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[Piece]:
        self.calls.append(json.loads(json.dumps(list(messages))))
        self.tools.append(tools)
        for step in self.scripts.pop(0):
            if isinstance(step, asyncio.Event):
                await step.wait()
            else:
                yield step

    async def list_models(self) -> list[str]:
        return ["m"]


def usage(prompt: int = 3, completion: int = 2) -> Usage:
    return Usage(model="m", prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def call(call_id: str, name: str, arguments: Any) -> ToolCallRequest:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCallRequest(id=call_id, name=name, arguments_json=raw)


class Params(BaseModel):
    key: str = ""


class Probe:
    """Tools whose runs the tests can see and steer."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()
        self.both_started = asyncio.Event()
        self.cancelled: list[str] = []
        self.hanging = asyncio.Event()
        self.hang_cancelled = asyncio.Event()

    async def echo(self, params: Params) -> Any:
        return {"echo": params.key}

    async def meet(self, params: Params) -> Any:
        """Finishes only once two calls run at the same time (deadlocks if sequential)."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running >= 2:
            self.both_started.set()
        try:
            async with asyncio.timeout(5):
                await self.both_started.wait()
            if params.key == "slow":
                await self.release.wait()
            else:
                self.release.set()
            return {"met": params.key}
        finally:
            self.running -= 1

    async def hang(self, params: Params) -> Any:
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.append(params.key)
            self.hang_cancelled.set()


def probe_registry(probe: Probe, **limits: Any) -> ToolRegistry:
    return ToolRegistry([
        Tool(name="t.echo", description="echo the key", params=Params, run=probe.echo, family="t"),
        Tool(name="t.meet", description="meet", params=Params, run=probe.meet, family="t"),
        Tool(name="t.hang", description="hang", params=Params, run=probe.hang, family="t"),
    ], limits=ToolLimits(**limits))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "e.duckdb", flush_interval_ms=20).open()
    try:
        yield s
    finally:
        s.close()


def run(provider: ToolScriptedProvider, registry: ToolRegistry, store: EventStore | None = None,
        *, text: str = "hi", tool_calls: Sequence[ToolCallSpec] = ()) -> Turn:
    orchestrator = StreamingOrchestrator(provider=provider, store=store, default_model="m",
                                         tools=registry)
    return orchestrator.run(TurnInput(messages=[ChatMessage(role="user", content=text)],
                                      tool_calls=list(tool_calls)))


async def finish(turn: Turn) -> tuple[TurnResult, list[Event]]:
    async with asyncio.timeout(10):
        result = await turn.result
    seen: list[Event] = []
    turn.stream.subscribe(seen.append).dispose()
    return result, seen


def dump(events: Sequence[Event]) -> list[dict[str, Any]]:
    out = []
    for event in events:
        data = event.model_dump(exclude={"ts", "duration_ms", "request_id", "seq"})
        if "execution_id" in data:
            data["execution_id"] = "X"
        out.append(data)
    return out


USER = {"role": "user", "content": "hi"}


# -- the agent loop ---------------------------------------------------------------------------
async def test_one_tool_round_whole_event_list() -> None:
    probe = Probe()
    registry = probe_registry(probe)
    provider = ToolScriptedProvider(
        [Delta("Let me look."), call("c1", "t_echo", {"key": "k"}), Finish("tool_calls"), usage()],
        [Delta("Done."), Finish("stop"), usage(9, 1)],
    )
    turn = run(provider, registry)
    result, events = await finish(turn)

    asked = {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "t_echo", "arguments": '{"key": "k"}'}}]}
    answered = {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true, "data": {"echo": "k"}}'}
    assert dump(events) == [
        {"type": "request_received", "agent": "assistant", "conversation_id": turn.conversation_id},
        {"type": "route", "route": "respond", "reason": "one model answers the conversation"},
        {"type": "memory", "messages_loaded": 0},
        {"type": "llm_call", "stream_id": 1, "model": "m", "messages": [USER]},
        {"type": "stream_start", "stream_id": 1, "agent": "assistant", "depth": 0,
         "parent_stream_id": None},
        {"type": "text", "stream_id": 1, "delta": "Let me look."},
        {"type": "token_usage", "stream_id": 1, "model": "m", "prompt_tokens": 3,
         "completion_tokens": 2, "total_tokens": 5, "cost_usd": None},
        {"type": "tool_call", "stream_id": 1, "tool": "t.echo", "execution_id": "X",
         "params": {"key": "k"}},
        {"type": "tool_result", "stream_id": 1, "tool": "t.echo", "execution_id": "X", "ok": True,
         "data": {"echo": "k"}, "error": None},
        {"type": "llm_call", "stream_id": 1, "model": "m", "messages": [USER, asked, answered]},
        {"type": "text", "stream_id": 1, "delta": "Done."},
        {"type": "token_usage", "stream_id": 1, "model": "m", "prompt_tokens": 9,
         "completion_tokens": 1, "total_tokens": 10, "cost_usd": None},
        {"type": "stream_end", "stream_id": 1, "status": "ok", "finish_reason": "stop"},
        {"type": "done", "ok": True, "reason": "completed"},
    ]
    call_event, result_event = (e for e in events if e.type in ("tool_call", "tool_result"))
    assert call_event.execution_id == result_event.execution_id  # type: ignore[union-attr]
    assert provider.calls == [[USER], [USER, asked, answered]]
    assert provider.tools == [registry.offered(), registry.offered()]
    assert [spec["function"]["name"] for spec in provider.tools[0]] == ["t_echo", "t_meet", "t_hang"]
    assert (result.status, result.content) == ("completed", "Let me look.Done.")
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (12, 15)


async def test_calls_run_concurrently_and_report_as_they_finish() -> None:
    probe = Probe()
    provider = ToolScriptedProvider(
        [call("a", "t.meet", {"key": "slow"}), call("b", "t.meet", {"key": "fast"}),
         Finish("tool_calls")],
        [Delta("ok"), Finish("stop")],
    )
    _, events = await finish(run(provider, probe_registry(probe)))
    assert probe.peak == 2
    tools = [(e.type, e.params if e.type == "tool_call" else e.data)  # type: ignore[union-attr]
             for e in events if e.type in ("tool_call", "tool_result")]
    assert tools == [
        ("tool_call", {"key": "slow"}), ("tool_call", {"key": "fast"}),
        ("tool_result", {"met": "fast"}), ("tool_result", {"met": "slow"}),  # as they finished
    ]
    # The model gets the results in the order it asked for them.
    assert [(m["role"], m.get("tool_call_id")) for m in provider.calls[1][1:]] == [
        ("assistant", None), ("tool", "a"), ("tool", "b")]


async def test_the_step_limit_stops_a_runaway_loop(store: EventStore) -> None:
    probe = Probe()
    again = [call("c", "t.echo", {"key": "x"}), Finish("tool_calls"), usage()]
    provider = ToolScriptedProvider(again, again, again, [Delta("never"), Finish("stop")])
    turn = run(provider, probe_registry(probe, max_steps=2), store)
    result, events = await finish(turn)
    types = [e.type for e in events]
    assert types.count("tool_result") == 2 and types.count("llm_call") == 3
    assert len(provider.calls) == 3
    assert types[-3:] == ["turn_error", "stream_end", "done"]
    error, end, done = dump(events[-3:])
    assert error == {"type": "turn_error", "stream_id": 1, "retryable": False, "error": (
        "tool loop stopped: the model asked for tools again after 2 rounds (MAX_TOOL_STEPS=2)")}
    assert end["status"] == "error" and done == {"type": "done", "ok": False, "reason": "error"}
    assert result.status == "error" and "MAX_TOOL_STEPS" in (result.error or "")


async def test_max_steps_zero_offers_no_tools_and_runs_none() -> None:
    probe = Probe()
    provider = ToolScriptedProvider([Delta("plain"), call("c", "t.echo", {}), Finish("stop")])
    result, events = await finish(run(provider, probe_registry(probe, max_steps=0)))
    assert provider.tools == [None]
    assert "tool_call" not in [e.type for e in events]  # a call of a tool never offered
    assert (result.status, result.content) == ("completed", "plain")


async def test_malformed_unknown_and_excess_calls_are_refused_not_fatal() -> None:
    probe = Probe()
    provider = ToolScriptedProvider(
        [call("c1", "t_echo", "{not json"), call("c2", "no_such_tool", {}),
         call("c3", "t_echo", {"key": 1}), call("c4", "t_echo", {"key": "ok"}),
         call("c5", "t_echo", {"key": "too many"}), Finish("tool_calls")],
        [Delta("fine"), Finish("stop")],
    )
    result, events = await finish(run(provider, probe_registry(probe, max_calls_per_step=4)))
    calls = [e for e in dump(events) if e["type"] == "tool_call"]
    assert [c["tool"] for c in calls] == ["t.echo", "no_such_tool", "t.echo", "t.echo", "t.echo"]
    assert calls[0]["params"] == {"_unparsed_arguments": "{not json"}
    results = {e["tool"] + str(i): e for i, e in enumerate(d for d in dump(events)
                                                        if d["type"] == "tool_result")}
    errors = sorted((r["error"] or "OK") for r in results.values())
    assert errors == sorted([
        "t.echo: arguments are not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)",
        "unknown tool 'no_such_tool'; enabled tools: t.echo, t.meet, t.hang",
        "t.echo: invalid parameters: key: Input should be a valid string",
        "OK",
        "not run: more than 4 tool calls in one step (MAX_TOOL_CALLS_PER_STEP)",
    ])
    assert result.status == "completed" and result.content == "fine"
    tool_messages = [m for m in provider.calls[1] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["c1", "c2", "c3", "c4", "c5"]
    assert json.loads(tool_messages[0]["content"])["ok"] is False


async def test_cancel_during_a_tool_call_cancels_the_tool(store: EventStore) -> None:
    probe = Probe()
    provider = ToolScriptedProvider([call("c", "t.hang", {"key": "h"}), Finish("tool_calls")])
    turn = run(provider, probe_registry(probe), store)
    async with asyncio.timeout(5):
        await probe.hanging.wait()
    turn.cancel()
    result, events = await finish(turn)
    assert result.status == "cancelled"
    assert [e.type for e in events][-3:] == ["tool_call", "stream_end", "done"]
    assert dump(events[-2:-1]) == [{"type": "stream_end", "stream_id": 1, "status": "cancelled",
                                    "finish_reason": None}]
    async with asyncio.timeout(5):
        await probe.hang_cancelled.wait()
    assert probe.cancelled == ["h"]
    await store.flush()
    assert store.query("SELECT tool, status, ok FROM tool_executions") == [("t.hang", "cancelled", None)]


# -- direct tool calls --------------------------------------------------------------------------
async def test_direct_tool_calls_run_in_their_own_stream_and_reach_the_model(store: EventStore) -> None:
    probe = Probe()
    provider = ToolScriptedProvider([Delta("Seen."), Finish("stop")])
    turn = run(provider, probe_registry(probe), store, tool_calls=[
        ToolCallSpec(name="t.echo", params={"key": "direct"}), ToolCallSpec(name="nope")])
    result, events = await finish(turn)
    body = [e for e in dump(events) if e["type"] not in ("route", "memory", "request_received")]
    assert body[:6] == [
        {"type": "stream_start", "stream_id": 1, "agent": "tools", "depth": 0, "parent_stream_id": None},
        {"type": "tool_call", "stream_id": 1, "tool": "t.echo", "execution_id": "X",
         "params": {"key": "direct"}},
        {"type": "tool_call", "stream_id": 1, "tool": "nope", "execution_id": "X", "params": {}},
        {"type": "tool_result", "stream_id": 1, "tool": "nope", "execution_id": "X", "ok": False,
         "data": None, "error": "unknown tool 'nope'; enabled tools: t.echo, t.meet, t.hang"},
        {"type": "tool_result", "stream_id": 1, "tool": "t.echo", "execution_id": "X", "ok": True,
         "data": {"echo": "direct"}, "error": None},
        {"type": "stream_end", "stream_id": 1, "status": "ok", "finish_reason": None},
    ]
    assert [e["type"] for e in body[6:]] == ["llm_call", "stream_start", "text", "stream_end", "done"]
    [sent] = provider.calls
    assert sent[0] == USER
    assert sent[1]["role"] == "assistant" and [c["function"]["name"] for c in sent[1]["tool_calls"]] == [
        "t_echo", "nope"]
    assert [(m["role"], json.loads(m["content"])["ok"]) for m in sent[2:]] == [
        ("tool", True), ("tool", False)]
    assert body[6]["messages"] == sent  # llm_call has the exact messages
    assert result.content == "Seen."

    await store.flush()
    rows = store.query("SELECT tool, agent, stream_id, status, ok, params, result, error, "
                       "duration_ms >= 0, started_at <= finished_at FROM tool_executions "
                       "ORDER BY tool DESC")
    assert [(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6] and json.loads(r[6]), r[7], r[8], r[9])
            for r in rows] == [
        ("t.echo", "tools", 1, "ok", True, {"key": "direct"}, {"echo": "direct"}, None, True, True),
        ("nope", "tools", 1, "error", False, {}, None,
         "unknown tool 'nope'; enabled tools: t.echo, t.meet, t.hang", True, True),
    ]
    ids = {row[0] for row in store.query("SELECT execution_id FROM tool_executions")}
    assert ids == {e.execution_id for e in events if e.type == "tool_result"}  # type: ignore[union-attr]


# -- the provider accumulates streamed tool calls -----------------------------------------------
def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _tool_delta(index: int, *, call_id: str | None = None, name: str | None = None,
                arguments: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    item: dict[str, Any] = {"index": index, "function": function}
    if call_id is not None:
        item.update(id=call_id, type="function")
    return {"tool_calls": [item]}


@pytest.mark.parametrize("finish", ["tool_calls", None])
async def test_provider_accumulates_fragmented_tool_calls(finish: str | None) -> None:
    frames = [
        _chunk({"role": "assistant", "content": "Sure. "}),
        _chunk(_tool_delta(1, call_id="call_b", name="fs_read", arguments="")),
        _chunk(_tool_delta(0, call_id="call_a", name="git_status", arguments='{"pa')),
        _chunk(_tool_delta(1, name="fs_read", arguments='{"path": ')),  # a repeated name
        _chunk(_tool_delta(0, arguments='th": "."}')),
        _chunk(_tool_delta(1, arguments='"notes.txt"}')),
        *([_chunk({}, finish)] if finish else []),
        b"data: [DONE]\n\n",
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["tools"] == [{"type": "function", "function": {"name": "fs_read"}}]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        return response

    async with tiny_server(handler) as url:
        provider = OpenAIProvider(base_url=url, api_key="x", max_retries=0)
        try:
            pieces = [p async for p in provider.stream_chat(
                model="m", messages=[USER], tools=[{"type": "function", "function": {"name": "fs_read"}}])]
        finally:
            await provider.aclose()
    assert pieces == [
        Delta("Sure. "),
        ToolCallRequest(id="call_a", name="git_status", arguments_json='{"path": "."}'),
        ToolCallRequest(id="call_b", name="fs_read", arguments_json='{"path": "notes.txt"}'),
        *([Finish("tool_calls")] if finish else []),
    ]


# -- the offline model ----------------------------------------------------------------------------
def offered(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, "parameters": {}}} for name in names]


ALL = offered("fs_read", "fs_write", "fs_apply_patch", "git_status", "terminal_exec",
              "speech_synthesize", "speech_transcribe")


@pytest.mark.parametrize(("prompt", "calls"), [
    ("Please read the file notes.txt.", [("fs_read", {"path": "notes.txt"})]),
    ("read the file `a b`", [("fs_read", {"path": "a"})]),
    ("read file a.txt and then read the file sub/b.md", [
        ("fs_read", {"path": "a.txt"}), ("fs_read", {"path": "sub/b.md"})]),
    ('write "hello there" to greeting.txt', [
        ("fs_write", {"path": "greeting.txt", "content": "hello there"})]),
    ("list git status", [("git_status", {})]),
    ("show the git status of repo/", [("git_status", {"path": "repo/"})]),
    ("run echo hi", [("terminal_exec", {"argv": ["echo", "hi"]})]),
    ("please run `grep -n 'two words' notes.txt` for me",
     [("terminal_exec", {"argv": ["grep", "-n", "two words", "notes.txt"]})]),
    ('say "hello world" into out.wav', [("speech_synthesize", {"text": "hello world", "path": "out.wav"})]),
    ("transcribe the audio file out.wav", [("speech_transcribe", {"path": "out.wav"})]),
    ("apply this patch:\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n",
     [("fs_apply_patch", {"patch": "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"})]),
    ("how do rivers form?", []),
    ("I like to run in the morning and read books", []),
])
def test_offline_tool_plans(prompt: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert plan_tool_calls([{"role": "user", "content": prompt}], ALL) == calls


def test_offline_calls_only_offered_tools_and_only_after_a_user_message() -> None:
    ask = [{"role": "user", "content": "read the file notes.txt and run echo hi"}]
    assert plan_tool_calls(ask, None) == []
    assert plan_tool_calls(ask, offered("terminal_exec")) == []  # the run line is not a line start
    assert plan_tool_calls(ask, offered("fs.read")) == [("fs.read", {"path": "notes.txt"})]
    answered = [*ask, {"role": "assistant", "content": "ok"}]
    assert plan_tool_calls(answered, ALL) == []


def test_offline_answer_quotes_tool_results() -> None:
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "fs_read", "arguments": "{}"}},
            {"id": "2", "type": "function", "function": {"name": "terminal_exec", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1",
         "content": json.dumps({"ok": True, "data": {"content": "The code is 7421.\n"}})},
        {"role": "tool", "tool_call_id": "2", "content": json.dumps({"ok": False, "error": "nope"})},
    ]
    assert "".join(compose_answer("offline", messages)) == (
        'The tool fs_read returned: "The code is 7421.". The tool terminal_exec failed: "nope".')
    assert len(compose_answer("offline", messages, max_tokens=3)) == 3


def test_offline_speech_round_trip_functions() -> None:
    audio = synthesize_wav("héllo wörld")
    with wave.open(io.BytesIO(audio)) as parsed:
        assert (parsed.getnchannels(), parsed.getsampwidth(), parsed.getframerate()) == (1, 1, 8000)
    assert transcribe_audio(audio) == "héllo wörld"
    other = transcribe_audio(b"RIFF not really audio")
    assert other.startswith("offline transcript ") and other == transcribe_audio(b"RIFF not really audio")
    corrupted = bytearray(audio)
    corrupted[60] ^= 0xFF
    assert transcribe_audio(bytes(corrupted)).startswith("offline transcript ")


@pytest.fixture
async def offline() -> AsyncIterator[OfflineModelServer]:
    async with OfflineModelServer(token_delay_ms=0) as server:
        yield server


async def test_offline_model_tool_calls_through_the_sdk(offline: OfflineModelServer) -> None:
    async with openai.AsyncOpenAI(base_url=offline.base_url, api_key="x", max_retries=0) as client:
        ask: Any = [{"role": "user", "content": "read the file notes.txt"}]
        tools: Any = offered("fs_read")
        whole = await client.chat.completions.create(model="offline", messages=ask, tools=tools)
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [made] = choice.message.tool_calls or []
        assert made.type == "function"
        assert (made.function.name, json.loads(made.function.arguments)) == ("fs_read", {"path": "notes.txt"})
        plain = await client.chat.completions.create(model="offline", messages=ask)
        assert plain.choices[0].message.tool_calls is None
    provider = OpenAIProvider(base_url=offline.base_url, api_key="x", max_retries=0)
    try:
        pieces = [p async for p in provider.stream_chat(model="offline", messages=ask, tools=tools)]
    finally:
        await provider.aclose()
    assert [p for p in pieces if not isinstance(p, Usage)] == [
        ToolCallRequest(id=made.id, name="fs_read", arguments_json='{"path": "notes.txt"}'),
        Finish("tool_calls"),
    ]


async def test_offline_audio_endpoints_through_the_sdk(offline: OfflineModelServer) -> None:
    async with openai.AsyncOpenAI(base_url=offline.base_url, api_key="x", max_retries=0) as client:
        speech = await client.audio.speech.create(model="tts-1", voice="alloy", input="round trip",
                                                  response_format="wav")
        assert speech.content == synthesize_wav("round trip")
        text = await client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", speech.content, "audio/wav"))
        assert text.text == "round trip"
        plain = await client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", speech.content, "audio/wav"), response_format="text")
        assert plain.strip() == "round trip"
        with pytest.raises(openai.BadRequestError, match="only response_format 'wav'"):
            await client.audio.speech.create(model="tts-1", voice="alloy", input="x")


# -- speech tools through the offline model -------------------------------------------------------
async def test_speech_tools_round_trip(offline: OfflineModelServer, tmp_path: Path) -> None:
    async with openai.AsyncOpenAI(base_url=offline.base_url, api_key="x", max_retries=0) as client:
        registry = build_registry(Settings(db_path=tmp_path / "e.duckdb"), audio=client)
        said = await registry.execute("speech.synthesize", {"text": "the pipeline speaks"})
        assert said.ok, said.error
        audio = base64.b64decode(said.data["audio_base64"])
        assert audio == synthesize_wav("the pipeline speaks") and said.data["bytes"] == len(audio)
        heard = await registry.execute("speech.transcribe", {"audio_base64": said.data["audio_base64"]})
        assert heard.ok and heard.data == {"text": "the pipeline speaks", "model": "whisper-1",
                                           "bytes": len(audio)}
        saved = await registry.execute("speech.synthesize", {"text": "to a file", "path": "a/b.wav"})
        assert saved.ok and saved.data["path"] == "a/b.wav" and "audio_base64" not in saved.data
        heard = await registry.execute("speech.transcribe", {"path": "a/b.wav"})
        assert heard.ok and heard.data["text"] == "to a file"

        for params, match in [
            ({"text": "x", "format": "mp3"}, "HTTP 400: the offline model synthesizes only"),
            ({"text": "x", "path": "../out.wav"}, "contains '..'"),
            ({"text": "x", "voice": "a b"}, "voice: String should match pattern"),
            ({"text": ""}, "text: String should have at least 1 character"),
        ]:
            outcome = await registry.execute("speech.synthesize", params)
            assert not outcome.ok and match in (outcome.error or ""), (params, outcome)
        for params, match in [
            ({}, "give exactly one of audio_base64 and path"),
            ({"audio_base64": "AAAA", "path": "a/b.wav"}, "give exactly one"),
            ({"audio_base64": "not base64!"}, "not valid base64"),
            ({"audio_base64": ""}, "the audio is empty"),
            ({"path": "/etc/passwd"}, "is absolute"),
        ]:
            outcome = await registry.execute("speech.transcribe", params)
            assert not outcome.ok and match in (outcome.error or ""), (params, outcome)
    assert not (tmp_path / "out.wav").exists()

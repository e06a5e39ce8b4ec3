"""The project's offline model: an OpenAI-compatible chat server for tests and demos.

Harnesses reach it over HTTP with the official ``openai`` client exactly as they would reach a
real provider, with no network and no API key. It serves:

* ``GET /v1/models``: the configured model ids in OpenAI's list shape.
* ``GET /stats``: the `OfflineStats` counters (requests, completed, disconnected, active).
* ``POST /v1/chat/completions``: ``stream: true`` sends SSE ``data:`` frames only (the openai
  SDK's decoder breaks on ``id:``/``retry:``/comment lines), one token per content delta after a
  ``token_delay_ms`` sleep, then ``data: [DONE]``; ``stream: false`` returns one
  ``chat.completion`` object at once (no delay: nobody observes per-token timing there).

Answer rule (a pure function of the model and the full messages list, see `compose_answer`):

1. ``You said: "<last user message>".`` (first 8 words), then, when there is an earlier user
   message, ``Earlier you said: "<previous user message>".`` (first 6 words), then
   ``This is turn <number of user messages>.``
2. Filler words from a small vocabulary, picked by sha256 of the model and messages, up to a
   total length of 12..40 tokens (also picked by the hash).
3. With ``max_tokens`` / ``max_completion_tokens`` = N the answer is exactly N tokens (truncated,
   or extended with more hashed filler) and ``finish_reason`` is ``"length"``; otherwise
   ``"stop"``. N < 5 therefore streams fewer than five content deltas.

Each token is one word; every token but the first starts with a space, so ``"".join(tokens)``
is the text. ``usage.prompt_tokens`` is the number of words in all message contents plus 3 per
message; ``usage.completion_tokens`` is the number of answer tokens.

Tool calls (OpenAI function calling), see `plan_tool_calls`: when the request offers
``tools`` and its last message is a user message asking for one in these words, the model
answers with tool calls instead of text (``finish_reason: "tool_calls"``), one per request
found, in the order of the prompt, and only for tools offered (as ``fs_read`` or ``fs.read``):

* ``read the file <path>`` → ``fs.read {path}``
* ``write "<text>" to <path>`` → ``fs.write {path, content}``
* ``apply this patch:`` + a diff on the next lines → ``fs.apply_patch {patch}``
* ``git status`` [``of <path>``] → ``git.status {path?}``
* ``run `<command>``` or a line ``run <command>`` → ``terminal.exec {argv: shlex.split(command)}``
* ``say "<text>"`` [``into <path>``] → ``speech.synthesize {text, path?}``
* ``transcribe <path>`` → ``speech.transcribe {path}``

Streamed, each call is a delta with its ``id`` (``call_`` + hash), ``type`` and function
``name``, then its arguments in up to three fragments, as OpenAI sends them. Once tool
messages follow the last user message, the answer quotes them instead:
``The tool fs_read returned: "<the file's words>".`` (per result; the ``content``,
``stdout`` or ``text`` of the result's data when it has one; ``failed: "<error>"`` for
``ok: false``). A tool-call answer ignores ``max_tokens``; its ``completion_tokens`` is the
number of tool-call deltas.

Audio, deterministic and offline (any model id is accepted):

* ``POST /v1/audio/speech`` (``response_format: "wav"`` only; other formats are a 400): a
  valid 8 kHz 8-bit mono WAV whose samples *are* the text: ``OFFLINE-TTS1``, its UTF-8 length
  (4 bytes, little-endian), the UTF-8 bytes and 4 checksum bytes, then 0.1 s of silence.
  ``voice`` and ``speed`` do not change it. See `synthesize_wav`.
* ``POST /v1/audio/transcriptions`` (multipart ``file``, ``model``; ``response_format``
  ``json`` or ``text``): a WAV made by the speech endpoint is decoded back to its text
  exactly; any other audio gets ``offline transcript <8 hex>: <six words>.``, the hex and the
  words picked from sha256 of the bytes. See `transcribe_audio`.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "code", "param"}}``: invalid
JSON or body gives 400, an unknown model gives 404 with code ``model_not_found``.

Run it alone with ``python -m pipeline.offline_model --port 8081``; it prints the base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import re
import shlex
import signal
import time
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any, Self

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ADVISOR_NOTE",
    "ADVISOR_PROMPT",
    "MAX_TOKENS_CAP",
    "ROUTER_PROMPT",
    "STATS_KEY",
    "OfflineModelServer",
    "OfflineStats",
    "compose_answer",
    "count_prompt_tokens",
    "create_offline_app",
    "main",
    "plan_client_calls",
    "plan_decision",
    "plan_tool_calls",
    "route_rule",
    "schema_instance",
    "synthesize_wav",
    "token_logprobs",
    "transcribe_audio",
]

MAX_TOKENS_CAP = 100_000
"""Largest accepted ``max_tokens``; larger values get a 400 like a real provider's limit."""

_VOCABULARY = (
    "stream", "event", "token", "river", "signal", "window", "buffer", "quiet",
    "steady", "offline", "model", "answer", "pipeline", "operator", "batch", "flush",
    "merge", "filter", "scan", "replay", "store", "query", "light", "calm",
)  # fmt: skip
_LAST_QUOTE_WORDS = 8
_EARLIER_QUOTE_WORDS = 6
_MIN_NATURAL = 12
_MAX_NATURAL = 40
_MODELS_CREATED = 1_700_000_000  # fixed so /v1/models is deterministic too


@dataclass(slots=True)
class OfflineStats:
    """Counters kept on the app, for tests and for the ``/metrics`` of whoever embeds it.

    Attributes:
        requests: Chat completion requests received (valid or not).
        completed: Completions answered in full (streamed to ``[DONE]`` or returned whole).
        disconnected: Streams the client dropped before they finished.
        active_streams: Streams being sent right now.
    """

    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    active_streams: int = 0


@dataclass(frozen=True, slots=True)
class _Config:
    token_delay_ms: float
    models: tuple[str, ...]
    voice: str = ""


STATS_KEY: web.AppKey[OfflineStats] = web.AppKey("offline_stats", OfflineStats)
"""Where `create_offline_app` keeps the app's `OfflineStats`."""
_CONFIG_KEY: web.AppKey[_Config] = web.AppKey("offline_config", _Config)


# -- request body ---------------------------------------------------------------------------

# Strict ints: JSON ``true`` or ``"7"`` is a client bug, not a token budget.
_TokenBudget = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_CAP)]


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[_ContentPart] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _ChatRequest(BaseModel):
    # Real clients send many fields we ignore (temperature, tools, user, ...).
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: _StreamOptions | None = None
    max_tokens: _TokenBudget | None = None
    max_completion_tokens: _TokenBudget | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=128)] = 1
    seed: Annotated[int, Field(strict=True)] | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None


# -- the answer -----------------------------------------------------------------------------


def _flatten(content: Any) -> str:
    """Text of a message content: a string, a list of ``{"type": "text"}`` parts, or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        # Non-text parts (images, audio) carry no words for the answer.
        if isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
    return " ".join(texts)


def _seed(model: str, messages: Sequence[Mapping[str, Any]]) -> bytes:
    # Flatten content first so a string and the same text as parts give the same answer; keep
    # every other field (name, tool_calls, ...) since the answer depends on the whole list.
    normalized = [{**m, "content": _flatten(m.get("content"))} for m in messages]
    blob = json.dumps(
        {"model": model, "messages": normalized}, sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(blob.encode()).digest()


def _hashed_int(seed: bytes, index: int) -> int:
    # Counter-mode sha256 rather than `random`: stable across Python versions by construction.
    return int.from_bytes(hashlib.sha256(seed + index.to_bytes(8, "big")).digest()[:8], "big")


def _filler(seed: bytes, index: int) -> str:
    return " " + _VOCABULARY[_hashed_int(seed, index) % len(_VOCABULARY)]


def _quote(text: str, limit: int) -> list[str]:
    words = text.split()
    if not words:
        return [" (nothing)."]
    shown = words[:limit]
    if len(words) > limit:
        shown[-1] += "…"
    shown[0] = '"' + shown[0]
    shown[-1] += '".'
    return [" " + w for w in shown]


def compose_answer(
    model: str, messages: Sequence[Mapping[str, Any]], *, max_tokens: int | None = None,
    voice: str = "",
) -> list[str]:
    """Compose the offline model's answer as tokens: a pure function of its arguments.

    Args:
        model: The requested model id (part of the hash seed).
        messages: The full chat messages, as sent (``content`` a string, text parts or None).
        max_tokens: If given, the answer has exactly this many tokens (truncated or extended
            with hashed filler); otherwise its natural 12..40 tokens.
        voice: A bundled offline provider's voice (see `voiced`); "" is the plain model.

    Returns:
        The tokens; each is one word, all but the first start with a space.

    Example:
        >>> "".join(compose_answer("offline", [{"role": "user", "content": "hi"}]))[:15]
        'You said: "hi".'
    """
    seed = _seed(model, messages) if not voice else _seed(f"{model}@{voice}", messages)
    results = _tool_results(messages)
    if results:
        tokens = _tool_answer(results)
    else:
        users = [_flatten(m.get("content")) for m in messages if m.get("role") == "user"]
        tokens = ["You", " said:"]
        tokens += _quote(users[-1] if users else "", _LAST_QUOTE_WORDS)
        if len(users) >= 2:
            tokens += [" Earlier", " you", " said:", *_quote(users[-2], _EARLIER_QUOTE_WORDS)]
        tokens += [" This", " is", " turn", f" {len(users)}."]
        # The header is at most 23 tokens, so the natural length always fits in 12..40.
        spread = _MAX_NATURAL - _MIN_NATURAL + 1
        natural = max(_MIN_NATURAL + int.from_bytes(seed[:4], "big") % spread, len(tokens) + 3)
        while len(tokens) < natural:
            tokens.append(_filler(seed, len(tokens)))
        tokens[-1] += "."
    if voice:  # the voice speaks first, so even a one-token answer differs between voices
        tokens = [f"[{voice}]", " " + tokens[0], *tokens[1:]]
    if max_tokens is None:
        return tokens
    while len(tokens) < max_tokens:
        tokens.append(_filler(seed, len(tokens)))
    return tokens[:max_tokens]


# -- tools ------------------------------------------------------------------------------------

_TOOL_QUOTE_WORDS = 60
_PATH = r"[`'\"]?(?P<path>[^\s`'\"]+)"
_TOOL_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("fs.read", re.compile(r"\bread (?:the )?file\s+" + _PATH, re.I)),
    ("fs.write", re.compile(r"\bwrite\s+\"(?P<content>[^\"]*)\"\s+(?:in)?to\s+(?:the\s+file\s+)?"
                            + _PATH, re.I)),
    ("git.status", re.compile(r"\bgit status(?:\s+(?:of|in)\s+" + _PATH + ")?", re.I)),
    ("terminal.exec", re.compile(r"\brun\s+`(?P<command>[^`]+)`", re.I)),
    ("terminal.exec", re.compile(r"^\s*(?:please\s+)?run\s+(?P<command>[^`\n]+?)\s*$", re.I | re.M)),
    ("speech.synthesize", re.compile(r"\b(?:say|synthesize|speak)\s+\"(?P<text>[^\"]+)\""
                                     r"(?:\s+(?:in|into|to|as)\s+" + _PATH + ")?", re.I)),
    ("speech.transcribe", re.compile(r"\btranscribe\s+(?:the\s+)?(?:audio\s+)?(?:file\s+)?" + _PATH,
                                     re.I)),
)
_PATCH = re.compile(r"\bapply (?:this|the following) patch:?[ \t]*\n(?P<patch>.+)", re.I | re.S)


def _offered_names(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    """Offered function names by dotted tool name (``fs.read`` → ``fs_read``)."""
    names: dict[str, str] = {}
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str):
            names[name.replace("_", ".", 1) if "." not in name else name] = name
    return names


def plan_tool_calls(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[tuple[str, dict[str, Any]]]:
    """The tool calls the offline model makes: ``(function name, arguments)`` in prompt order.

    Only when the last message is a user message, and only for offered tools (see the
    module docstring for the phrases).

    Example:
        >>> plan_tool_calls([{"role": "user", "content": "read the file notes.txt"}],
        ...                 [{"type": "function", "function": {"name": "fs_read"}}])
        [('fs_read', {'path': 'notes.txt'})]
    """
    offered = _offered_names(tools)
    if not offered or not messages or messages[-1].get("role") != "user":
        return []
    text = _flatten(messages[-1].get("content"))
    found: list[tuple[int, str, dict[str, Any]]] = []
    patch = _PATCH.search(text)
    if patch is not None:
        found.append((patch.start(), "fs.apply_patch", {"patch": patch.group("patch")}))
        text = text[:patch.start()]
    ran = False
    for tool, pattern in _TOOL_PATTERNS:
        if tool == "terminal.exec" and ran:
            continue  # the backtick form wins over the line form
        for match in pattern.finditer(text):
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            if "path" in groups:
                groups["path"] = groups["path"].rstrip(".,;:!?)")
            if tool == "fs.write":
                arguments: dict[str, Any] = {"path": groups["path"], "content": groups["content"]}
            elif tool == "terminal.exec":
                command = groups["command"]
                try:
                    argv = shlex.split(command)
                except ValueError:
                    argv = command.split()
                arguments = {"argv": argv}
                ran = True
            else:
                arguments = groups
            found.append((match.start(), tool, arguments))
    found += _plan_agent_calls(text, offered)
    found.sort(key=lambda item: item[0])
    return [(offered[tool], arguments) for _, tool, arguments in found if tool in offered]


def _tool_results(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, bool]]:
    """``(function name, result text, ok)`` of the tool messages after the last user message."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    names: dict[str, str] = {}
    results: list[tuple[str, str, bool]] = []
    for message in messages[last_user + 1:]:
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or ():
                if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
                    names[str(call.get("id"))] = str(call["function"].get("name"))
        elif message.get("role") == "tool":
            name = names.get(str(message.get("tool_call_id")), "tool")
            results.append((name, *_result_text(_flatten(message.get("content")))))
    return results


def _result_text(content: str) -> tuple[str, bool]:
    try:
        body = json.loads(content)
    except ValueError:
        return content, True
    if not isinstance(body, dict) or "ok" not in body:
        return content, True
    if not body["ok"]:
        return str(body.get("error")), False
    data = body.get("data")
    if isinstance(data, dict):
        for key in ("content", "stdout", "text"):
            if isinstance(data.get(key), str):
                return data[key], True
        data = {k: v for k, v in data.items() if not (isinstance(v, str) and len(v) > 200)}
    return json.dumps(data, ensure_ascii=False, sort_keys=True), True


def _tool_answer(results: list[tuple[str, str, bool]]) -> list[str]:
    tokens: list[str] = []
    for name, text, ok in results:
        tokens += [" The", " tool", f" {name}", " returned:" if ok else " failed:"]
        tokens += _quote(text, _TOOL_QUOTE_WORDS)
    tokens[0] = tokens[0].lstrip()
    return tokens


def _tool_call_payloads(model: str, messages: Sequence[Mapping[str, Any]],
                        calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    seed = _seed(model, messages)
    return [
        {"id": "call_" + hashlib.sha256(seed + b"tool" + bytes([index % 256])).hexdigest()[:24],
         "type": "function",
         "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        for index, (name, arguments) in enumerate(calls)
    ]


def _tool_call_deltas(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The streamed deltas of tool calls: the head of each, then its arguments in ≤ 3 parts."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(payloads):
        function = call["function"]
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": function["name"], "arguments": ""}}]})
        arguments: str = function["arguments"]
        size = max(1, -(-len(arguments) // 3))
        for start in range(0, len(arguments), size):
            deltas.append({"tool_calls": [{"index": index, "function": {
                "arguments": arguments[start:start + size]}}]})
    return deltas


# -- request parameters: n, seed, stop, tool_choice, response_format, logprobs ---------------


@dataclass(slots=True)
class _Choice:
    """One choice of an answer: its streamed deltas (each with its logprobs) and its end."""

    index: int
    deltas: list[tuple[dict[str, Any], dict[str, Any] | None]]
    finish_reason: str
    completion_tokens: int
    text: str | None
    tool_calls: list[dict[str, Any]] | None
    logprobs: list[dict[str, Any]] | None

    def whole(self) -> dict[str, Any]:
        """The choice of a non-streamed ``chat.completion``."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return {"index": self.index, "message": message, "finish_reason": self.finish_reason,
                "logprobs": None if self.logprobs is None
                else {"content": self.logprobs, "refusal": None}}


def _compose_choice(
    body: _ChatRequest, messages: list[dict[str, Any]], index: int, *, voice: str = "",
) -> _Choice:
    """Choice ``index`` of the answer, honouring the request's parameters (deterministically).

    * ``seed`` and the choice index (above 0) vary the hash the answer is picked by; without
      them the answer is exactly `compose_answer`'s.
    * tools: the phrases of `plan_tool_calls`, else `plan_client_calls` (``tool_choice``);
      ``tool_choice: "none"`` always answers in text.
    * ``response_format`` ``json_object`` answers ``{"answer": <the text>}``; ``json_schema``
      an instance of the schema (`schema_instance`); both streamed in small pieces.
    * ``stop`` cuts the text before the first stop sequence (``finish_reason: "stop"``).
    * ``logprobs`` gives each delta deterministic log probabilities (`token_logprobs`), with
      ``top_logprobs`` alternatives.
    * the router's and the advisor's requests get their JSON decision (`plan_decision`);
      ``voice`` is a bundled provider's voice (`compose_answer`).
    """
    decision = plan_decision(messages)
    if decision is not None:
        return _Choice(index=index, deltas=[({"content": token}, None) for token in decision],
                       finish_reason="stop", completion_tokens=len(decision),
                       text="".join(decision), tool_calls=None, logprobs=None)
    variant = [*messages, *([{"role": "x-seed", "content": str(body.seed)}]
                            if body.seed is not None else []),
               *([{"role": "x-choice", "content": str(index)}] if index else [])]
    budget = body.max_completion_tokens or body.max_tokens
    tools = None if body.tool_choice == "none" else body.tools
    planned = plan_tool_calls(messages, tools) or plan_client_calls(
        messages, tools, body.tool_choice, seed=_seed(body.model, variant))
    if planned:
        payloads = _tool_call_payloads(body.model, variant if index else messages, planned)
        deltas = _tool_call_deltas(payloads)
        return _Choice(index=index, deltas=[(d, None) for d in deltas], finish_reason="tool_calls",
                       completion_tokens=len(deltas), text=None, tool_calls=payloads,
                       logprobs=None)
    kind = (body.response_format or {}).get("type")
    if kind in ("json_object", "json_schema"):
        if kind == "json_object":
            document: Any = {"answer": "".join(compose_answer(body.model, variant, voice=voice))}
        else:
            spec = (body.response_format or {}).get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            document = schema_instance(schema or {"type": "object"},
                                       seed=_seed(body.model, variant))
        tokens = _json_tokens(document)
        finish = "stop"
        if budget is not None and len(tokens) > budget:
            tokens, finish = tokens[:budget], "length"  # cut JSON, as a real model's is
    else:
        tokens = compose_answer(body.model, variant, max_tokens=budget, voice=voice)
        finish = "stop" if budget is None else "length"
    cut = _apply_stop(tokens, body.stop)
    if cut is not None:
        tokens, finish = cut, "stop"
    logprobs = ([token_logprobs(token, top=body.top_logprobs or 0, seed=_seed(body.model, variant),
                                position=i) for i, token in enumerate(tokens)]
                if body.logprobs else None)
    pieces: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        ({"content": token}, None if logprobs is None
         else {"content": [logprobs[i]], "refusal": None})
        for i, token in enumerate(tokens)]
    return _Choice(index=index, deltas=pieces, finish_reason=finish,
                   completion_tokens=len(tokens), text="".join(tokens), tool_calls=None,
                   logprobs=logprobs)


def plan_client_calls(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None, *, seed: bytes = b"",
) -> list[tuple[str, dict[str, Any]]]:
    """The call the offline model makes of a client's tool (when no phrase asked for one).

    Only when the last message is a user message. ``tool_choice`` naming a function calls
    it; ``"required"`` or ``"auto"`` calls the first tool named in the message (its name,
    or its name with spaces for ``_``), else the first tool; with ``tool_choice`` absent, a
    tool is called only when the message names it. The arguments are an instance of the
    tool's ``parameters`` schema (`schema_instance`), so they validate against it.

    Example:
        >>> plan_client_calls([{"role": "user", "content": "weather in Paris?"}],
        ...     [{"type": "function", "function": {"name": "get_weather", "parameters": {
        ...         "type": "object", "properties": {"city": {"type": "string"}},
        ...         "required": ["city"]}}}], "required")[0][0]
        'get_weather'
    """
    functions = [tool["function"] for tool in tools or ()
                 if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping)
                 and isinstance(tool["function"].get("name"), str)]
    if not functions or not messages or messages[-1].get("role") != "user":
        return []
    text = _flatten(messages[-1].get("content")).lower()
    named = [f for f in functions
             if f["name"].lower() in text or f["name"].lower().replace("_", " ") in text]
    chosen: Mapping[str, Any] | None = None
    if isinstance(tool_choice, Mapping):
        wanted = (tool_choice.get("function") or {}).get("name")
        chosen = next((f for f in functions if f["name"] == wanted), None)
    elif tool_choice in ("required", "auto"):
        chosen = (named or functions)[0]
    elif named:
        chosen = named[0]
    if chosen is None:
        return []
    schema = chosen.get("parameters") or {"type": "object", "properties": {}}
    arguments = schema_instance(schema, seed=seed + chosen["name"].encode())
    return [(chosen["name"], arguments if isinstance(arguments, dict) else {})]


def schema_instance(schema: Mapping[str, Any], *, seed: bytes = b"") -> Any:
    """A deterministic value that validates against a JSON schema (the subset tools and
    structured outputs use: objects, arrays, strings, numbers, booleans, null, ``enum``,
    ``const``, ``anyOf``/``oneOf``/``allOf``, local ``$ref`` to ``$defs``, and the usual
    bounds). Every property of an object is filled, so ``strict`` schemas are met too.

    Example:
        >>> schema_instance({"type": "object", "properties": {"n": {"type": "integer",
        ...                  "minimum": 3}}, "required": ["n"]})
        {'n': 3}
    """
    root = schema

    def words(path: str, count: int) -> str:
        picked = [_VOCABULARY[_hashed_int(seed + path.encode(), i) % len(_VOCABULARY)]
                  for i in range(count)]
        return " ".join(picked)

    def build(node: Any, path: str, depth: int) -> Any:
        if not isinstance(node, Mapping) or depth > 32:
            return None
        if "$ref" in node:
            target: Any = root
            for part in str(node["$ref"]).removeprefix("#/").split("/"):
                target = target.get(part, {}) if isinstance(target, Mapping) and part else target
            return build(target, path, depth + 1)
        if "const" in node:
            return node["const"]
        if node.get("enum"):
            return node["enum"][0]
        for key in ("anyOf", "oneOf"):
            options = [o for o in node.get(key) or () if not (isinstance(o, Mapping)
                                                               and o.get("type") == "null")]
            if options or node.get(key):
                return build((options or node[key])[0], path, depth + 1)
        if node.get("allOf"):
            merged: dict[str, Any] = {}
            for part in node["allOf"]:
                value = build(part, path, depth + 1)
                if isinstance(value, dict):
                    merged.update(value)
                elif not merged:
                    return value
            return merged
        kind = node.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in node else "string"
        if kind == "object":
            properties = node.get("properties") or {}
            return {name: build(sub, f"{path}.{name}", depth + 1)
                    for name, sub in properties.items()}
        if kind == "array":
            count = max(int(node.get("minItems", 1)), 1)
            if "maxItems" in node:
                count = min(count, int(node["maxItems"]))
            return [build(node.get("items") or {}, f"{path}[{i}]", depth + 1)
                    for i in range(count)]
        if kind in ("integer", "number"):
            low = node.get("minimum", node.get("exclusiveMinimum"))
            high = node.get("maximum", node.get("exclusiveMaximum"))
            value = 1 + _hashed_int(seed + path.encode(), 0) % 9
            if low is not None:
                value = int(low) + (1 if "exclusiveMinimum" in node and "minimum" not in node
                                    else 0)
                value = max(value, int(low) + (0 if "minimum" in node else 1))
            if high is not None and value > high:
                value = int(high) - (1 if "exclusiveMaximum" in node and "maximum" not in node
                                     else 0)
            return value if kind == "integer" else float(value)
        if kind == "boolean":
            return _hashed_int(seed + path.encode(), 0) % 2 == 0
        if kind == "null":
            return None
        text = words(path, 2)
        low_len, high_len = int(node.get("minLength", 0)), node.get("maxLength")
        while len(text) < low_len:
            text += " " + words(path + str(len(text)), 1)
        if high_len is not None:
            text = text[:int(high_len)]
        return text

    return build(schema, "$", 0)


def _json_tokens(value: Any) -> list[str]:
    """A JSON document as streamed pieces (about one word each)."""
    text = json.dumps(value, ensure_ascii=False)
    return [piece for piece in re.split(r"(?<=[ ,:{}\[\]])", text) if piece]


def _apply_stop(tokens: list[str], stop: str | list[str] | None) -> list[str] | None:
    """The tokens cut before the first stop sequence, or None when none occurs."""
    sequences = [stop] if isinstance(stop, str) else list(stop or ())
    text = "".join(tokens)
    cuts = [text.find(s) for s in sequences if s and s in text]
    if not cuts:
        return None
    end, out, size = min(cuts), [], 0
    for token in tokens:
        if size + len(token) > end:
            if end > size:
                out.append(token[:end - size])
            break
        out.append(token)
        size += len(token)
    return out


def token_logprobs(token: str, *, top: int, seed: bytes, position: int) -> dict[str, Any]:
    """Deterministic log probabilities of one token (OpenAI's ``logprobs.content`` item):
    the token's own, then ``top`` alternatives, each less likely (the first is the token)."""
    base = -((_hashed_int(seed + b"lp", position) % 2000) / 1000.0)
    alternatives = [{"token": token, "logprob": base, "bytes": list(token.encode())}]
    for rank in range(1, top):
        word = " " + _VOCABULARY[_hashed_int(seed + b"alt", position * 32 + rank) % len(_VOCABULARY)]
        alternatives.append({"token": word, "logprob": base - rank, "bytes": list(word.encode())})
    return {"token": token, "logprob": base, "bytes": list(token.encode()),
            "top_logprobs": alternatives[:top]}

# -- router, advisor and sub-agents (issue 14) -------------------------------------------------

ROUTER_PROMPT = "You are the router."
"""The first words of a router's system prompt; the offline model then answers a decision."""
ADVISOR_PROMPT = "You are the advisor."
"""The first words of an advisor's system prompt; the offline model then answers a verdict."""
ADVISOR_NOTE = "Advisor note:"
"""How a redirect's note starts in the messages the response model gets next."""
_DELEGATE = re.compile(r"\bdelegate to (?P<name>[A-Za-z0-9][A-Za-z0-9_\-]*)\s*:\s*(?P<task>.+)",
                       re.I | re.S)
_ROUNDTABLE = re.compile(r"\broundtable\b", re.I)
_REDIRECT = re.compile(r"\bredirect\b", re.I)


def route_rule(
    text: str, *, routes: Sequence[str], agents: Sequence[str], tools: Sequence[str],
) -> dict[str, str]:
    """The deterministic routing rule (the offline router's, and the built-in router's).

    ``delegate to <name>: <task>`` with a known agent → ``delegate``; the word
    ``roundtable`` → ``roundtable``; a tool request the offline model understands (for one of
    ``tools``, function names) → ``agent``; anything else → ``respond``. Only ``routes``
    enabled count.
    """
    delegate = _DELEGATE.search(text)
    if delegate is not None and "delegate" in routes and delegate.group("name") in agents:
        return {"route": "delegate", "agent": delegate.group("name"),
                "task": delegate.group("task").strip(),
                "reason": f"the message hands a task to {delegate.group('name')}"}
    if "roundtable" in routes and _ROUNDTABLE.search(text):
        return {"route": "roundtable", "reason": "the message asks for the roundtable"}
    offered = [{"type": "function", "function": {"name": name}} for name in tools]
    planned = plan_tool_calls([{"role": "user", "content": text}], offered) if offered else []
    if "agent" in routes and planned:
        return {"route": "agent", "reason": "the message asks for "
                + ", ".join(sorted({name for name, _ in planned}))}
    return {"route": "respond", "reason": "one model answers the conversation"}


def _listed(system: str, label: str) -> list[str]:
    for line in system.splitlines():
        if line.lower().startswith(label.lower() + ":"):
            return [item.strip() for item in line.split(":", 1)[1].split(",") if item.strip()]
    return []


def plan_decision(messages: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """The offline router's or advisor's answer (one JSON object, as tokens), or None when
    the request is neither (its system prompt starts with `ROUTER_PROMPT` or `ADVISOR_PROMPT`).

    The router's system prompt lists ``Routes:``, ``Agents:`` and ``Tools:`` lines; its
    decision is `route_rule` of the last user message. The advisor answers ``redirect``
    when a user message says the word ``redirect`` and no advisor note was given yet, else
    ``gate_continue``.
    """
    if not messages or messages[0].get("role") != "system":
        return None
    system = _flatten(messages[0].get("content"))
    users = [_flatten(m.get("content")) for m in messages if m.get("role") == "user"]
    if system.startswith(ROUTER_PROMPT):
        decision: dict[str, str] = route_rule(
            users[-1] if users else "", routes=_listed(system, "Routes"),
            agents=_listed(system, "Agents"), tools=_listed(system, "Tools"))
    elif system.startswith(ADVISOR_PROMPT):
        noted = any(ADVISOR_NOTE in text for text in users)
        asked = any(_REDIRECT.search(text) for text in users if ADVISOR_NOTE not in text)
        decision = ({"kind": "redirect", "note": "answer again from another angle, more briefly"}
                    if asked and not noted else {"kind": "gate_continue"})
    else:
        return None
    words = json.dumps(decision, ensure_ascii=False).split(" ")
    return [words[0], *(" " + word for word in words[1:])]


def _plan_agent_calls(text: str, offered: Mapping[str, str]) -> list[tuple[int, str, dict[str, Any]]]:
    """``delegate to <name>: <task>`` → a call of the offered sub-agent tool ``agent.<name>``."""
    match = _DELEGATE.search(text)
    if match is None or f"agent.{match.group('name')}" not in offered:
        return []
    return [(match.start(), f"agent.{match.group('name')}", {"task": match.group("task").strip()})]


# -- audio ------------------------------------------------------------------------------------

_TTS_MAGIC = b"OFFLINE-TTS1"
_TTS_RATE = 8000
AUDIO_MAX_BYTES = 25 * 1024 * 1024
"""Largest upload the transcription endpoint takes (OpenAI's limit)."""


def synthesize_wav(text: str) -> bytes:
    """The offline speech of ``text``: an 8 kHz 8-bit mono WAV whose samples encode it."""
    payload = text.encode("utf-8")
    samples = (_TTS_MAGIC + len(payload).to_bytes(4, "little") + payload
               + hashlib.sha256(payload).digest()[:4] + bytes([128]) * (_TTS_RATE // 10))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(_TTS_RATE)
        out.writeframes(samples)
    return buffer.getvalue()


def transcribe_audio(audio: bytes) -> str:
    """The offline transcript: the text of a `synthesize_wav` WAV, else a hash of the bytes."""
    try:
        with wave.open(io.BytesIO(audio), "rb") as source:
            frames = source.readframes(source.getnframes())
    except (wave.Error, EOFError, ValueError, OSError):
        frames = b""
    if frames.startswith(_TTS_MAGIC):
        start = len(_TTS_MAGIC) + 4
        size = int.from_bytes(frames[len(_TTS_MAGIC):start], "little")
        payload = frames[start:start + size]
        checksum = frames[start + size:start + size + 4]
        if len(payload) == size and hashlib.sha256(payload).digest()[:4] == checksum:
            return payload.decode("utf-8", errors="replace")
    digest = hashlib.sha256(audio).digest()
    words = " ".join(_VOCABULARY[b % len(_VOCABULARY)] for b in digest[:6])
    return f"offline transcript {digest.hex()[:8]}: {words}."


class _SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=4096)
    voice: str | dict[str, Any]
    response_format: str = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)


async def _audio_speech(request: web.Request) -> web.StreamResponse:
    try:
        body = _SpeechRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        return _error(400, _validation_message(exc), code="invalid_body", err_type="invalid_request_error")
    if body.response_format != "wav":
        return _error(400, f"the offline model synthesizes only response_format 'wav', not "
                      f"{body.response_format!r}", code="unsupported_format",
                      err_type="invalid_request_error")
    return web.Response(body=synthesize_wav(body.input), content_type="audio/wav")


async def _audio_transcriptions(request: web.Request) -> web.StreamResponse:
    try:
        form = await request.post()
    except ValueError as exc:
        return _error(400, f"Invalid multipart body: {exc}", code="invalid_body",
                      err_type="invalid_request_error")
    upload = form.get("file")
    model = form.get("model")
    if not isinstance(upload, web.FileField):
        return _error(400, "file: an audio file is required", code="invalid_body",
                      err_type="invalid_request_error")
    if not isinstance(model, str) or not model:
        return _error(400, "model: a model id is required", code="invalid_body",
                      err_type="invalid_request_error")
    response_format = form.get("response_format", "json")
    if response_format not in ("json", "text"):
        return _error(400, f"the offline model answers response_format 'json' or 'text', not "
                      f"{response_format!r}", code="unsupported_format",
                      err_type="invalid_request_error")
    text = transcribe_audio(upload.file.read())
    if response_format == "text":
        return web.Response(text=text)
    return web.json_response({"text": text})


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Deterministic prompt size: words in all message contents plus 3 per message."""
    return sum(len(_flatten(m.get("content")).split()) + 3 for m in messages)


# -- HTTP -----------------------------------------------------------------------------------


def _error(status: int, message: str, *, code: str | None, err_type: str) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "code": code, "param": None}}
    return web.json_response(body, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp's own 404/405/413 are text/plain; clients expect OpenAI's JSON error shape.
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason, code=None, err_type="invalid_request_error")


async def _list_models(request: web.Request) -> web.Response:
    config = request.app[_CONFIG_KEY]
    data = [
        {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "offline"}
        for m in config.models
    ]
    return web.json_response({"object": "list", "data": data})


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "Invalid request body: " + "; ".join(parts)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    config = request.app[_CONFIG_KEY]
    stats.requests += 1
    try:
        raw = json.loads(await request.read())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return _error(
            400, f"Invalid JSON body: {exc}", code="invalid_json", err_type="invalid_request_error"
        )
    try:
        body = _ChatRequest.model_validate(raw)
    except ValidationError as exc:
        return _error(
            400, _validation_message(exc), code="invalid_body", err_type="invalid_request_error"
        )
    if body.model not in config.models:
        return _error(
            404,
            f"The model `{body.model}` does not exist or you do not have access to it.",
            code="model_not_found",
            err_type="invalid_request_error",
        )
    # Hash the messages exactly as sent (validated above), not pydantic's re-dump with defaults.
    messages: list[dict[str, Any]] = raw["messages"]
    choices = [_compose_choice(body, messages, index, voice=config.voice)
               for index in range(body.n)]
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    usage = {
        "prompt_tokens": count_prompt_tokens(messages),
        "completion_tokens": completion_tokens,
        "total_tokens": count_prompt_tokens(messages) + completion_tokens,
    }
    completion_id = "chatcmpl-" + _seed(body.model, messages).hex()[:24]
    created = int(time.time())

    if not body.stream:
        stats.completed += 1
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": None,
                "choices": [choice.whole() for choice in choices],
                "usage": usage,
            }
        )

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(delta: dict[str, Any], finish: str | None, index: int = 0,
              logprobs: dict[str, Any] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    stats.active_streams += 1
    try:
        for choice in choices:
            await response.write(chunk({"role": "assistant", "content": ""}, None, choice.index))
        # Choices take turns, one delta each per step, as OpenAI interleaves them.
        for step in range(max(len(choice.deltas) for choice in choices)):
            await asyncio.sleep(config.token_delay_ms / 1000)
            for choice in choices:
                if step < len(choice.deltas):
                    delta, logprobs = choice.deltas[step]
                    await response.write(chunk(delta, None, choice.index, logprobs))
        for choice in choices:
            await response.write(chunk({}, choice.finish_reason, choice.index))
        if include_usage:
            final = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "system_fingerprint": None,
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except asyncio.CancelledError:
        # handler_cancellation=True: aiohttp cancels us as soon as the client goes away.
        # (A server shutdown mid-stream is counted here too.)
        stats.disconnected += 1
        raise
    except ConnectionResetError:
        # Without handler_cancellation the drop shows up only on the next write.
        stats.disconnected += 1
        return response
    finally:
        stats.active_streams -= 1
    stats.completed += 1
    return response


def create_offline_app(
    *, token_delay_ms: float = 20.0, models: Sequence[str] = ("offline",), voice: str = "",
) -> web.Application:
    """Build the offline model's aiohttp application.

    Serve it with ``web.AppRunner(app, handler_cancellation=True)`` so dropped clients are
    noticed at once (aiohttp's default notices them only on the next write).

    Args:
        token_delay_ms: Sleep before each streamed token (the project's
            ``OFFLINE_TOKEN_DELAY_MS``).
        models: Model ids served; others get 404 ``model_not_found``.
        voice: A voice of its own (``compose_answer``'s ``voice``): "" is the plain model.

    Returns:
        The application, with its `OfflineStats` under `STATS_KEY`.

    Raises:
        ValueError: If ``token_delay_ms`` is negative or ``models`` is empty.
    """
    if token_delay_ms < 0:
        raise ValueError(f"offline model: token_delay_ms must be >= 0, got {token_delay_ms}")
    if not models:
        raise ValueError("offline model: models must name at least one model")
    app = web.Application(middlewares=[_json_errors], client_max_size=AUDIO_MAX_BYTES + 65_536)
    app[STATS_KEY] = OfflineStats()
    app[_CONFIG_KEY] = _Config(token_delay_ms=token_delay_ms, models=tuple(models), voice=voice)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/audio/speech", _audio_speech)
    app.router.add_post("/v1/audio/transcriptions", _audio_transcriptions)
    app.router.add_get("/stats", _stats)
    return app


async def _stats(request: web.Request) -> web.Response:
    """``GET /stats``: the `OfflineStats` counters (e.g. disconnects, for tests)."""
    stats = request.app[STATS_KEY]
    return web.json_response({name: getattr(stats, name) for name in stats.__slots__})


@dataclass(slots=True)
class _Running:
    runner: web.AppRunner
    port: int
    app: web.Application = field(repr=False)


class OfflineModelServer:
    """Run the offline model on a loopback port for the duration of an ``async with``.

    Example:
        >>> async with OfflineModelServer(token_delay_ms=1) as server:  # doctest: +SKIP
        ...     client = openai.AsyncOpenAI(base_url=server.base_url, api_key="offline")
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_delay_ms: float = 20.0,
        models: Sequence[str] = ("offline",),
        shutdown_timeout: float = 1.0,
        voice: str = "",
    ) -> None:
        """Configure the server; nothing starts before ``__aenter__``.

        Args:
            host: Interface to bind.
            port: Port to bind; 0 picks a free ephemeral port.
            token_delay_ms: Sleep before each streamed token.
            models: Model ids served.
            shutdown_timeout: Seconds ``__aexit__`` lets running streams finish before they
                are cancelled (aiohttp's default of 60 s would hold tests up).
            voice: The answers' voice (see `create_offline_app`).
        """
        self._voice = voice
        self._host = host
        self._port = port
        self._token_delay_ms = token_delay_ms
        self._models = tuple(models)
        self._shutdown_timeout = shutdown_timeout
        self._running: _Running | None = None

    def _require(self) -> _Running:
        if self._running is None:
            raise RuntimeError("offline model: server is not running (use `async with`)")
        return self._running

    @property
    def port(self) -> int:
        """The bound port."""
        return self._require().port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:8081/v1``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    @property
    def app(self) -> web.Application:
        """The running application."""
        return self._require().app

    @property
    def stats(self) -> OfflineStats:
        """The live `OfflineStats` of the running application."""
        return self.app[STATS_KEY]

    async def __aenter__(self) -> Self:
        """Start the server; the port is known when this returns."""
        app = create_offline_app(token_delay_ms=self._token_delay_ms, models=self._models,
                                 voice=self._voice)
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=self._shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            # runner.addresses reads the sockname of the site's listening sockets.
            port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._running = _Running(runner=runner, port=port, app=app)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and close its connections."""
        running, self._running = self._running, None
        if running is not None:
            await running.runner.cleanup()


# -- command line ---------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows; there Ctrl-C still raises KeyboardInterrupt.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with OfflineModelServer(
        host=args.host, port=args.port, token_delay_ms=args.token_delay_ms, models=args.model
    ) as server:
        print(server.base_url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.offline_model", description="Serve the offline OpenAI model."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--token-delay-ms", type=float, default=20.0)
    parser.add_argument(
        "--model", action="append", help="model id to serve (repeatable; default: offline)"
    )
    args = parser.parse_args(argv)
    args.model = tuple(args.model or ("offline",))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

"""Native events → OpenAI ``chat.completion.chunk`` objects (a scan over the turn)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import reactivex
from reactivex import Observable, abc

from core.events import (
    Done,
    ErrorEvent,
    Event,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
    ToolCallDelta,
)

ChatChunk = dict[str, Any]


def to_chat_chunks(
    *, completion_id: str, model: str, created: int, include_usage: bool = False,
    choices: Mapping[str, int] | None = None,
) -> Callable[[Observable[Event]], Observable[ChatChunk]]:
    """Turn a request's events into the chunks an OpenAI client expects.

    ::

        events: -R-s-t("Hel")-t("lo")-u-e-D|         (u = token_usage, D = done)
        chunks: -----{role,"Hel"}-{"lo"}---{finish}-{usage}|

    - the first delta of a choice carries ``role: "assistant"`` with its first text;
    - each ``text`` becomes one content delta, in event order, on choice 0 — or, with
      ``choices`` (agent name → choice index), on the index of the agent whose stream it
      belongs to, so a multi-agent turn (a roundtable) can be rebuilt agent by agent from
      ``choice.index``, as with OpenAI's ``n > 1``; a stream opened again by the same agent
      (its next round) starts with a blank line;
    - a stream that carries one of the model's ``n`` choices (``stream_start.choice``)
      puts its deltas on that choice's index; ``text.logprobs`` go in ``choice.logprobs``;
      a ``text`` marked ``refusal`` is a ``delta.refusal``;
    - a client's tool call streams as its ``tool_call_delta`` events do: the first as
      ``tool_calls[k]`` with ``id``, ``type`` and ``function.name`` (and its first
      arguments), the others as ``tool_calls[k].function.arguments`` pieces (``k`` counts the
      choice's calls); a ``tool_call`` with ``side: "client"`` that came without deltas
      becomes the head and then its whole arguments;
    - ``done`` becomes a final chunk per choice with ``finish_reason`` (the model's, from
      the choice's last ``stream_end``; ``"stop"`` when none was given), then, when
      ``include_usage``, a chunk with ``choices: []`` and the summed ``token_usage``;
    - a ``turn_error`` event becomes ``{"error": {...}}``, which the ``openai`` SDK raises as
      an ``APIError`` in the client's loop; no finish or usage chunk follows it.

    Other events (trace, the server's tools, brackets) produce no chunk. State lives in the
    subscription.

    Example:
        >>> turn.stream.pipe(to_chat_chunks(completion_id="chatcmpl-1", model="offline",
        ...                                 created=0, include_usage=True))  # doctest: +SKIP
    """
    agent_choice = dict(choices or {})

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None,
              logprobs: list[dict[str, Any]] | None = None) -> ChatChunk:
        out: ChatChunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": index, "delta": delta, "finish_reason": finish_reason,
                 "logprobs": None if logprobs is None else {"content": logprobs,
                                                            "refusal": None}}
            ],
        }
        if include_usage:
            out["usage"] = None
        return out

    def _to_chunks(source: Observable[Event]) -> Observable[ChatChunk]:
        def subscribe(
            observer: abc.ObserverBase[ChatChunk], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            stream_choice: dict[int, int] = {}
            top_level: set[int] = set()
            spoken: dict[int, bool] = {}  # choice → has text (role sent); insertion order
            separate: set[int] = set()  # choices whose next text starts a new stream
            finish: dict[int, str] = {}
            calls: dict[int, int] = {}  # choice → client tool calls so far
            streamed: dict[tuple[int, int], int] = {}  # (stream, model's index) → k
            streamed_ids: set[str] = set()
            opened: set[int] = set()  # choices of n with a stream
            failed = False
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

            def delta(index: int, content: str | None) -> dict[str, Any]:
                out: dict[str, Any] = {}
                if index not in spoken:
                    out["role"] = "assistant"
                    spoken[index] = True
                elif content is not None and index in separate:
                    content = "\n\n" + content
                separate.discard(index)
                if content is not None:
                    out["content"] = content
                return out

            def on_next(event: Event) -> None:
                nonlocal failed
                match event:
                    case Text(stream_id=stream_id, delta=text, refusal=True):
                        index = stream_choice.get(stream_id, 0)
                        piece = delta(index, None)
                        piece["refusal"] = text
                        observer.on_next(chunk(index, piece, None))
                    case Text(stream_id=stream_id, delta=text, logprobs=logprobs):
                        index = stream_choice.get(stream_id, 0)
                        observer.on_next(chunk(index, delta(index, text), None, logprobs))
                    case ToolCallDelta(stream_id=stream_id, index=position):
                        index = stream_choice.get(stream_id, 0)
                        known = streamed.get((stream_id, position))
                        if known is None:
                            known = streamed[(stream_id, position)] = calls.get(index, 0)
                            calls[index] = known + 1
                            # The provider names an id-less call "call_<index>" (as here).
                            call_id = event.call_id or f"call_{position}"
                            streamed_ids.add(call_id)
                            piece = delta(index, None)
                            piece["tool_calls"] = [{
                                "index": known, "id": call_id, "type": "function",
                                "function": {"name": event.name or "",
                                             "arguments": event.arguments}}]
                        else:
                            piece = {"tool_calls": [{"index": known, "function": {
                                "arguments": event.arguments}}]}
                        observer.on_next(chunk(index, piece, None))
                    case ToolCall(side="client", call_id=call_id) if call_id in streamed_ids:
                        pass  # already streamed by its deltas
                    case ToolCall(side="client", stream_id=stream_id, call_id=call_id):
                        index = stream_choice.get(stream_id, 0)
                        k = calls.get(index, 0)
                        calls[index] = k + 1
                        head = delta(index, None)
                        head["tool_calls"] = [{"index": k, "id": call_id, "type": "function",
                                               "function": {"name": event.tool, "arguments": ""}}]
                        observer.on_next(chunk(index, head, None))
                        observer.on_next(chunk(index, {"tool_calls": [
                            {"index": k, "function": {"arguments": _arguments(event.params)}}]},
                            None))
                    case StreamStart(stream_id=stream_id, agent=agent, depth=depth,
                                     choice=int(choice)):
                        stream_choice[stream_id] = choice
                        opened.add(choice)
                    case StreamStart(stream_id=stream_id, agent=agent, depth=depth):
                        index = agent_choice.get(agent, 0)
                        stream_choice[stream_id] = index
                        if depth == 0:
                            top_level.add(stream_id)
                        if index and index in spoken:
                            separate.add(index)
                    case StreamEnd(stream_id=stream_id, finish_reason=reason):
                        index = stream_choice.get(stream_id, 0)
                        # Choice 0 ends as its top-level stream did, not as a sub-agent's.
                        if reason and (index or stream_id in top_level
                                       or stream_id not in stream_choice):
                            finish[index] = reason
                    case TokenUsage():
                        usage["prompt_tokens"] += event.prompt_tokens
                        usage["completion_tokens"] += event.completion_tokens
                        usage["total_tokens"] += event.total_tokens
                    case ErrorEvent(error=message):
                        failed = True
                        observer.on_next(
                            {"error": {"message": message, "type": "upstream_error",
                                       "code": "turn_failed"}}
                        )
                    case Done() if not failed:
                        for index in sorted({0, *spoken, *opened}):
                            observer.on_next(chunk(index, delta(index, None),
                                                   finish.get(index, "stop")))
                        if include_usage:
                            observer.on_next({
                                "id": completion_id, "object": "chat.completion.chunk",
                                "created": created, "model": model, "choices": [],
                                "usage": dict(usage),
                            })
                    case _:
                        pass

            return source.subscribe(
                on_next, observer.on_error, observer.on_completed, scheduler=scheduler
            )

        return reactivex.create(subscribe)

    return _to_chunks


def _arguments(params: dict[str, Any]) -> str:
    """A client tool call's arguments JSON: as the model sent it when it was no object."""
    if set(params) == {"_unparsed_arguments"}:
        return str(params["_unparsed_arguments"])
    return json.dumps(params, ensure_ascii=False)

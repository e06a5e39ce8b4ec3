"""Native events → OpenAI ``chat.completion.chunk`` objects (a scan over the turn)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable, abc

from pipeline.events import Done, ErrorEvent, Event, StreamEnd, StreamStart, Text, TokenUsage

ChatChunk = dict[str, Any]


def to_chat_chunks(
    *, completion_id: str, model: str, created: int, include_usage: bool = False
) -> Callable[[Observable[Event]], Observable[ChatChunk]]:
    """Turn a request's events into the chunks an OpenAI client expects.

    ::

        events: -R-s-t("Hel")-t("lo")-u-e-D|         (u = token_usage, D = done)
        chunks: -----{role,"Hel"}-{"lo"}---{finish}-{usage}|

    - the first delta carries ``role: "assistant"`` with the first text;
    - each ``text`` becomes one content delta (every stream's text, in event order);
    - ``done`` becomes the final chunk with ``finish_reason`` (the model's, from the
      top-level ``stream_end``; ``"stop"`` when none was given), then, when
      ``include_usage``, a chunk with ``choices: []`` and the summed ``token_usage``;
    - an ``error`` event becomes ``{"error": {...}}``, which the ``openai`` SDK raises as
      an ``APIError`` in the client's loop; no finish or usage chunk follows it.

    Other events (trace, tools, brackets) produce no chunk. State (role sent, depths,
    finish reason, usage) lives in the subscription.

    Example:
        >>> turn.stream.pipe(to_chat_chunks(completion_id="chatcmpl-1", model="offline",
        ...                                 created=0, include_usage=True))  # doctest: +SKIP
    """

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> ChatChunk:
        out: ChatChunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
        }
        if include_usage:
            out["usage"] = None
        return out

    def _to_chunks(source: Observable[Event]) -> Observable[ChatChunk]:
        def subscribe(
            observer: abc.ObserverBase[ChatChunk], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            role_sent = False
            depths: dict[int, int] = {}
            finish_reason: str | None = None
            failed = False
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

            def delta(content: str | None) -> dict[str, Any]:
                nonlocal role_sent
                out: dict[str, Any] = {}
                if not role_sent:
                    out["role"] = "assistant"
                    role_sent = True
                if content is not None:
                    out["content"] = content
                return out

            def on_next(event: Event) -> None:
                nonlocal finish_reason, failed
                match event:
                    case Text(delta=text):
                        observer.on_next(chunk(delta(text), None))
                    case StreamStart(stream_id=stream_id, depth=depth):
                        depths[stream_id] = depth
                    case StreamEnd(stream_id=stream_id, finish_reason=reason):
                        if depths.get(stream_id, 0) == 0 and reason:
                            finish_reason = reason
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
                        observer.on_next(chunk(delta(None), finish_reason or "stop"))
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

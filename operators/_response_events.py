"""Native events → the Responses API's stream events (a scan over the turn).

The Responses wire (``POST /v1/responses``) numbers its events with ``sequence_number``.
That number is a pure function of the turn's event list: :class:`ResponseFold` maps each
native event to zero or more Responses events, counting from 0, and never looks at
clocks, seqs or anything outside the events. Replaying a turn (from its live
:class:`~operators.ReplayLog` or from the store, after a restart too) therefore yields the
same events with the same numbers, so ``starting_after=N`` is exactly "every Responses
event numbered above N".
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal, TypeAlias

import reactivex
from reactivex import Observable, abc

from core.events import (
    Done,
    ErrorEvent,
    Event,
    RequestReceived,
    StreamEnd,
    StreamStart,
    Text,
    TokenUsage,
    ToolCall,
)

ResponseEvent: TypeAlias = dict[str, Any]
ResponseStatus: TypeAlias = Literal[
    "queued", "in_progress", "completed", "failed", "cancelled", "incomplete"
]
#: The event types that end a response's stream (each carries the final response object).
TERMINAL_TYPES = frozenset({"response.completed", "response.failed", "response.incomplete"})


class ResponseFold:
    """The state of one response, folded from its turn's events.

    Args:
        response: The response object's fixed fields (``id``, ``created_at``, ``model``,
            ``instructions``, ``metadata``, ``tools``, …); ``status``, ``output``,
            ``usage``, ``error`` and ``incomplete_details`` are the fold's.
        function_tools: Names of the client's function tools: a ``tool_call`` event of
            one of them becomes a ``function_call`` output item (the client runs it).
    """

    def __init__(self, response: Mapping[str, Any], *, function_tools: Collection[str] = ()) -> None:
        self.base = dict(response)
        self.function_tools = frozenset(function_tools)
        self.status: ResponseStatus = "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self._next = 0
        self._depths: dict[int, int] = {}
        self._open: int | None = None  # output index of the message being written
        self._texts: list[str] = []  # its text so far
        self._suffix = str(self.base.get("id", "resp")).removeprefix("resp_")

    # -- the fold ---------------------------------------------------------------------
    def apply(self, event: Event) -> list[ResponseEvent]:
        """The Responses events one native event produces (numbered in order)."""
        out: list[ResponseEvent] = []
        match event:
            case RequestReceived():
                out.append(self._lifecycle("response.created"))
                out.append(self._lifecycle("response.in_progress"))
            case StreamStart(stream_id=stream_id, depth=depth):
                self._depths[stream_id] = depth
            case Text(stream_id=stream_id, delta=delta) if self._top(stream_id) and delta:
                index = self._message(out)
                item = self.output[index]
                self._texts.append(delta)  # joined when the part closes (no O(n²) +=)
                out.append(self._emit({
                    "type": "response.output_text.delta", "item_id": item["id"],
                    "output_index": index, "content_index": 0, "delta": delta, "logprobs": [],
                }))
            case ToolCall(tool=tool, params=params) if self._client_call(event):
                self._close_message(out, status="completed")
                # The model's id of the call, where the event keeps it (a client call's
                # ``call_id``); else the execution id.
                call_id = getattr(event, "call_id", None) or event.execution_id
                self._function_call(out, name=tool, call_id=str(call_id),
                                    arguments=json.dumps(params, separators=(",", ":")))
            case StreamEnd(stream_id=stream_id, finish_reason=reason) if self._top(stream_id):
                if reason:
                    self.finish_reason = reason
                self._close_message(out, status="incomplete" if reason == "length" else "completed")
            case TokenUsage():
                self.usage["input_tokens"] += event.prompt_tokens
                self.usage["output_tokens"] += event.completion_tokens
                self.usage["total_tokens"] += event.total_tokens
            case ErrorEvent(error=message) if self.error is None:
                self.error = {"code": "server_error", "message": message}
            case Done(ok=ok, reason=reason):
                self._close_message(out, status="incomplete")
                if reason == "cancelled":
                    self.status = "cancelled"
                elif not ok:
                    self.status = "failed"
                    if self.error is None:
                        self.error = {"code": "server_error", "message": f"the turn ended: {reason}"}
                elif self.finish_reason == "length":
                    self.status = "incomplete"
                    self.incomplete_details = {"reason": "max_output_tokens"}
                else:
                    self.status = "completed"
                kind = {"completed": "response.completed",
                        "incomplete": "response.incomplete"}.get(self.status, "response.failed")
                out.append(self._lifecycle(kind))
            case _:
                pass
        return out

    def snapshot(self) -> dict[str, Any]:
        """The response object now (``GET /v1/responses/{id}``, and in lifecycle events)."""
        usage = None
        if self.usage["total_tokens"] or self.status != "in_progress":
            usage = {
                "input_tokens": self.usage["input_tokens"],
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": self.usage["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage["total_tokens"],
            }
        output = copy.deepcopy(self.output)
        if self._open is not None:
            output[self._open]["content"][0]["text"] = "".join(self._texts)
        return {
            **self.base,
            "object": "response",
            "status": self.status,
            "output": output,
            "usage": usage,
            "error": dict(self.error) if self.error and self.status == "failed" else None,
            "incomplete_details": self.incomplete_details,
        }

    # -- pieces -----------------------------------------------------------------------
    def _top(self, stream_id: int | None) -> bool:
        """Only the top-level streams' text is the answer (as in :class:`TurnState`)."""
        return stream_id is None or self._depths.get(stream_id, 0) == 0

    def _client_call(self, event: ToolCall) -> bool:
        """A call of one of the client's function tools (the client runs it)."""
        client = getattr(event, "side", None) == "client" or event.tool in self.function_tools
        return client and self._top(event.stream_id)

    def _emit(self, body: ResponseEvent) -> ResponseEvent:
        body["sequence_number"] = self._next
        self._next += 1
        return body

    def _lifecycle(self, kind: str) -> ResponseEvent:
        return self._emit({"type": kind, "response": self.snapshot()})

    def _item_id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self._suffix}_{index}"

    def _message(self, out: list[ResponseEvent]) -> int:
        """The open message item's output index; opens one (item, then part) when none is."""
        if self._open is not None:
            return self._open
        index = len(self.output)
        item: dict[str, Any] = {"id": self._item_id("msg", index), "type": "message",
                                "status": "in_progress", "role": "assistant", "content": []}
        self.output.append(item)
        self._open = index
        self._texts = []
        out.append(self._emit({"type": "response.output_item.added", "output_index": index,
                               "item": copy.deepcopy(item)}))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        out.append(self._emit({"type": "response.content_part.added", "item_id": item["id"],
                               "output_index": index, "content_index": 0,
                               "part": copy.deepcopy(part)}))
        return index

    def _close_message(self, out: list[ResponseEvent], *, status: str) -> None:
        if self._open is None:
            return
        index, self._open = self._open, None
        item = self.output[index]
        part = item["content"][0]
        part["text"] = "".join(self._texts)
        out.append(self._emit({"type": "response.output_text.done", "item_id": item["id"],
                               "output_index": index, "content_index": 0,
                               "text": part["text"], "logprobs": []}))
        out.append(self._emit({"type": "response.content_part.done", "item_id": item["id"],
                               "output_index": index, "content_index": 0,
                               "part": copy.deepcopy(part)}))
        item["status"] = status
        out.append(self._emit({"type": "response.output_item.done", "output_index": index,
                               "item": copy.deepcopy(item)}))

    def _function_call(self, out: list[ResponseEvent], *, name: str, call_id: str,
                       arguments: str) -> None:
        index = len(self.output)
        item: dict[str, Any] = {"id": self._item_id("fc", index), "type": "function_call",
                                "status": "in_progress", "call_id": call_id, "name": name,
                                "arguments": ""}
        self.output.append(item)
        out.append(self._emit({"type": "response.output_item.added", "output_index": index,
                               "item": copy.deepcopy(item)}))
        out.append(self._emit({"type": "response.function_call_arguments.delta",
                               "item_id": item["id"], "output_index": index,
                               "delta": arguments}))
        out.append(self._emit({"type": "response.function_call_arguments.done",
                               "item_id": item["id"], "output_index": index, "name": name,
                               "arguments": arguments}))
        item["arguments"] = arguments
        item["status"] = "completed"
        out.append(self._emit({"type": "response.output_item.done", "output_index": index,
                               "item": copy.deepcopy(item)}))


def to_response_events(
    *, response: Mapping[str, Any], function_tools: Collection[str] = ()
) -> Callable[[Observable[Event]], Observable[ResponseEvent]]:
    """Turn a request's events into the Responses API's stream events.

    ::

        events:    -R-s-t("Hel")-t("lo")-e-u-D|          (e = stream_end, u = usage)
        responses: -{created,in_progress}-{item.added,part.added,delta "Hel"}-{delta "lo"}
                   -{text.done,part.done,item.done}---{completed}|
        sequence_number:  0, 1, 2, 3, 4, 5, 6, 7, 8, 9

    - ``request_received`` opens the response: ``response.created`` and
      ``response.in_progress`` (status ``in_progress``, no output);
    - the first ``text`` of a top-level stream opens a ``message`` item (its
      ``output_item.added`` and ``content_part.added``); each ``text`` is one
      ``response.output_text.delta``; the stream's ``stream_end`` (or ``done``) closes it
      (``output_text.done``, ``content_part.done``, ``output_item.done``);
    - a ``tool_call`` of one of ``function_tools`` becomes a ``function_call`` item:
      ``output_item.added``, one ``function_call_arguments.delta`` (the whole arguments
      JSON), ``function_call_arguments.done``, ``output_item.done``;
    - ``done`` ends it with the whole response object: ``response.completed``;
      ``response.incomplete`` (``incomplete_details.reason: "max_output_tokens"``) when the
      model stopped at its token limit; ``response.failed`` when the turn failed (``error`` holds
      the first ``error`` event's message) or was cancelled (status ``cancelled``).

    Every event has a ``sequence_number`` from 0 up, a pure function of the events (see
    the module docstring): a late or replaying subscriber gets identical numbers.

    Example:
        >>> turn.stream.pipe(to_response_events(response={"id": "resp_1", "model": "offline",
        ...                                               "created_at": 0}))  # doctest: +SKIP
    """

    def _to_events(source: Observable[Event]) -> Observable[ResponseEvent]:
        def subscribe(
            observer: abc.ObserverBase[ResponseEvent], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            fold = ResponseFold(response, function_tools=function_tools)

            def on_next(event: Event) -> None:
                try:
                    produced = fold.apply(event)
                except Exception as exc:  # a bug here must reach the client as an error
                    observer.on_error(exc)
                    return
                for item in produced:
                    observer.on_next(item)

            return source.subscribe(
                on_next, observer.on_error, observer.on_completed, scheduler=scheduler
            )

        return reactivex.create(subscribe)

    return _to_events


def fold_response(
    response: Mapping[str, Any], events: Iterable[Event], *, function_tools: Collection[str] = ()
) -> tuple[dict[str, Any], list[ResponseEvent]]:
    """The response object and every Responses event of a list of native events (the
    same numbering as :func:`to_response_events`)."""
    fold = ResponseFold(response, function_tools=function_tools)
    produced: list[ResponseEvent] = []
    for event in events:
        produced.extend(fold.apply(event))
    return fold.snapshot(), produced

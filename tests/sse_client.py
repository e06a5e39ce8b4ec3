"""A tiny Server-Sent-Events parser and the native wire-rules checker, for tests.

Parsing follows the SSE spec (https://html.spec.whatwg.org/multipage/server-sent-events.html):
lines end with ``\\r\\n``, ``\\n`` or ``\\r``; ``field: value`` loses one space after the
colon; a line starting with ``:`` is a comment; ``data`` lines are joined with ``\\n``; a
blank line ends a frame. Unlike a browser we keep frames without data (comments, lone
``retry:``) so tests can assert that a stream has none.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import aiohttp

TRACE_TYPES = frozenset({"llm_call", "route", "memory"})
# Events that belong to an open stream (its stream_start seen, its stream_end not yet).
_IN_STREAM_TYPES = frozenset({"text", "tool_call", "tool_result", "token_usage", "advisor"})


@dataclasses.dataclass(slots=True)
class Frame:
    """One SSE frame as received (``data`` is None when the frame had no ``data:`` line)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = dataclasses.field(default_factory=list)
    fields: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def json(self) -> Any:
        """``data`` parsed as JSON."""
        assert self.data is not None, f"frame without data: {self}"
        return json.loads(self.data)


class SSEParser:
    """Incremental parser: :meth:`feed` bytes as they arrive, get the completed frames."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""  # text not yet split into complete lines
        self._frame = Frame()
        self._data: list[str] = []
        self._started = False  # whether the current frame has any line
        self._first = True  # a leading BOM is dropped

    def feed(self, chunk: bytes) -> list[Frame]:
        """Parse more bytes; returns the frames they completed."""
        text = self._decoder.decode(chunk)
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        return self._lines(self._pending + text, final=False)

    def close(self) -> list[Frame]:
        """End of stream: a frame not ended by a blank line is dropped (as the spec says)."""
        text = self._pending + self._decoder.decode(b"", final=True)
        frames = self._lines(text, final=True)
        self._pending = ""
        return frames

    def _lines(self, text: str, *, final: bool) -> list[Frame]:
        frames: list[Frame] = []
        start = 0
        i = 0
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == "\n" or ch == "\r":
                if ch == "\r" and i + 1 == n and not final:
                    break  # maybe the first half of \r\n: wait for more bytes
                frame = self._line(text[start:i])
                if frame is not None:
                    frames.append(frame)
                i += 2 if ch == "\r" and i + 1 < n and text[i + 1] == "\n" else 1
                start = i
            else:
                i += 1
        self._pending = text[start:]
        return frames

    def _line(self, line: str) -> Frame | None:
        if line == "":
            if not self._started:
                return None
            frame = self._frame
            if self._data:
                frame.data = "\n".join(self._data)
            self._frame, self._data, self._started = Frame(), [], False
            return frame
        self._started = True
        if line.startswith(":"):
            self._frame.comments.append(line[1:].removeprefix(" "))
            return None
        name, sep, value = line.partition(":")
        if sep:
            value = value.removeprefix(" ")
        self._frame.fields.append((name, value))
        match name:
            case "data":
                self._data.append(value)
            case "event":
                self._frame.event = value
            case "id":
                if "\0" not in value:
                    self._frame.id = value
            case "retry":
                if value.isdigit():
                    self._frame.retry = int(value)
            case _:
                pass  # unknown fields are ignored
        return None


def parse_sse(raw: bytes | str) -> list[Frame]:
    """Every frame of a complete SSE body."""
    parser = SSEParser()
    frames = parser.feed(raw.encode() if isinstance(raw, str) else raw)
    return frames + parser.close()


async def iter_frames(response: aiohttp.ClientResponse) -> AsyncIterator[Frame]:
    """Frames of a streaming aiohttp response as they arrive."""
    parser = SSEParser()
    async for chunk in response.content.iter_any():
        for frame in parser.feed(chunk):
            yield frame
    for frame in parser.close():
        yield frame


async def read_frames(response: aiohttp.ClientResponse) -> list[Frame]:
    """Every frame of a streaming aiohttp response, read to its end."""
    return parse_sse(await response.read())


def events_of(frames: Iterable[Frame]) -> list[dict[str, Any]]:
    """The ``data`` of every frame that has one, parsed."""
    return [frame.json for frame in frames if frame.data is not None]


def assert_wire_rules(frames: Sequence[Frame], *, trace: bool) -> list[dict[str, Any]]:
    """Assert the native protocol's rules (DESIGN.md "The wire"); returns the events.

    - frames without data (comments) are skipped, as clients skip them; no ``retry:``
      block stands alone (the server puts it in the first event frame of each response);
    - no ``event:`` is ``error`` or ``message`` (EventSource's own names);
    - every other frame is an event frame (``id``, ``event``, one-line JSON ``data``) whose
      ``event`` equals ``data.type`` and whose ``id`` equals ``data.seq``;
    - the first is ``request_received`` with seq 1; exactly one ``done``, and it is last;
    - ids strictly increase; ``data.request_id`` is the same everywhere;
    - every ``stream_start`` is closed by exactly one ``stream_end`` with its stream_id, and
      a stream closes after its children (siblings in any order); events of a stream come
      while it is open;
    - trace-only types (llm_call, route, memory) appear only when ``trace``; with trace on
      nothing is hidden, so the seqs are exactly 1..N.
    """
    # Comment-only frames (heartbeats) are not dispatched by clients; a lone ``retry:``
    # block is (by httpx-sse, as an empty event), so reconnect advice rides in the first
    # event's block. The rules are about the event frames.
    lone = [frame for frame in frames if frame.data is None and frame.retry is not None]
    assert not lone, f"a lone retry: block: {lone[0]}"
    frames = [frame for frame in frames if frame.data is not None]
    assert frames, "no frames"
    events: list[dict[str, Any]] = []
    for index, frame in enumerate(frames):
        assert not frame.comments, f"frame {index}: {frame}"
        assert frame.event not in ("error", "message"), f"frame {index}: EventSource's own name"
        assert "\n" not in frame.data, f"frame {index}: data spans lines"
        data = frame.json
        assert isinstance(data, dict), f"frame {index}: data is not an object"
        assert frame.event == data.get("type"), f"frame {index}: event {frame.event!r} vs {data}"
        assert frame.id is not None and frame.id == str(data.get("seq")), (
            f"frame {index}: id {frame.id!r} vs seq {data.get('seq')!r}"
        )
        events.append(data)

    first = events[0]
    assert first["type"] == "request_received" and first["seq"] == 1, first
    types = [e["type"] for e in events]
    assert types.count("done") == 1, f"{types.count('done')} done events: {types}"
    assert types[-1] == "done", f"done is not last: {types}"

    seqs = [e["seq"] for e in events]
    assert all(isinstance(s, int) for s in seqs), seqs
    assert all(a < b for a, b in itertools.pairwise(seqs)), f"ids not increasing: {seqs}"
    request_ids = {e.get("request_id") for e in events}
    assert len(request_ids) == 1 and "" not in request_ids and None not in request_ids, (
        request_ids
    )

    # Streams form a tree: a stream's parent is its parent_stream_id, else the stream
    # opened last among those still open; a stream closes only after its children (siblings,
    # such as parallel panelists, may close in any order).
    open_streams: dict[int, int | None] = {}  # stream → parent, in opening order
    closed: set[int] = set()
    for event in events:
        kind = event["type"]
        if kind == "stream_start":
            sid = event["stream_id"]
            assert sid not in open_streams and sid not in closed, f"stream {sid} started twice"
            parent = event.get("parent_stream_id")
            if parent is None and open_streams:
                parent = next(reversed(open_streams))
            assert parent is None or parent in open_streams, (
                f"stream {sid} opened under {parent}, which is not open"
            )
            open_streams[sid] = parent
        elif kind == "stream_end":
            sid = event["stream_id"]
            assert sid not in closed, f"stream {sid} ended twice"
            assert sid in open_streams, f"stream_end {sid} without its stream_start"
            children = [s for s, p in open_streams.items() if p == sid]
            assert not children, f"stream_end {sid} while its children {children} are open"
            del open_streams[sid]
            closed.add(sid)
        elif kind in _IN_STREAM_TYPES:
            assert event["stream_id"] in open_streams, f"{kind} of a stream not open: {event}"
    assert not open_streams, f"streams never ended: {list(open_streams)}"

    present = TRACE_TYPES.intersection(types)
    if trace:
        # Start-up recovery numbers its closing events after a gap (sinks/recovery.py):
        # the only gap allowed with trace on, before the last events of an interrupted turn.
        dense = seqs
        if events and events[-1].get("reason") == "interrupted":
            jumps = [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1]
            assert len(jumps) <= 1, f"interrupted turn with several gaps: {seqs}"
            dense = seqs[: jumps[0]] if jumps else seqs
        assert dense == list(range(1, len(dense) + 1)), f"trace on, yet seq gaps: {seqs}"
    else:
        assert not present, f"trace types without trace: {sorted(present)}"
    return events


# -- helpers for the durable-stream tests (replay, resume, fan-out) -----------------------
FrameKey = tuple[str | None, str | None, str | None]


def event_frames(frames: Iterable[Frame]) -> list[Frame]:
    """The frames a client dispatches: those with ``data`` (no comments, no lone ``retry:``)."""
    return [frame for frame in frames if frame.data is not None]


def frame_keys(frames: Iterable[Frame]) -> list[FrameKey]:
    """``(id, event, data)`` of every event frame: what two streams must agree on, whole."""
    return [(frame.id, frame.event, frame.data) for frame in event_frames(frames)]


def after(frames: Iterable[Frame], seq: int) -> list[Frame]:
    """The event frames a client with cursor ``seq`` has not seen (``id > seq``)."""
    return [frame for frame in event_frames(frames) if frame.id is not None and int(frame.id) > seq]


def cut_off_comments(frames: Iterable[Frame]) -> list[str]:
    """Comments telling a slow client it was disconnected and should resume."""
    return [c for frame in frames for c in frame.comments if "Last-Event-ID" in c]

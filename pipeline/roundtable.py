"""The AI roundtable (seed 004): several models in one stream, fairly interleaved.

A roundtable is a turn whose body is::

    router(route="roundtable") → memory →
      moderator opens (stream_start depth 0, a text naming the panel)
      → round 1 → [advisor] → round 2 → … → moderator closes (stream_end)

Each round is one stream per panelist (``stream_start``/``stream_end`` at depth 1, ``agent``
= the panelist's name, ``parent_stream_id`` = the moderator's stream):

- ``parallel``: the panelists of a round speak at once, merged by :func:`operators.merge_fair`
  so that, when the turn's primary client is slower than the panel, buffered events are
  released round-robin across panelists (with a fast client: arrival order);
- ``sequential``: one at a time (``concat``), each seeing what the earlier ones said this
  round.

Context sharing: the prompt of round *k* carries the transcript of the rounds before (and,
in sequential mode, of the earlier speakers of round *k*). A panelist that fails ends its
own stream with a ``turn_error`` event and status ``error``; the others go on, and ``done``
reports ``ok: false``. Between rounds the advisor emits an ``advisor`` event: continue
(``gate_continue``) or end early (``end_early``, when every panelist of the round failed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import reactivex
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from reactivex import Observable, abc
from reactivex import operators as ops
from reactivex.disposable import Disposable

from core.errors import ProviderError
from core.events import (
    Advisor,
    ErrorEvent,
    Event,
    LlmCall,
    Route,
    StreamEnd,
    StreamStart,
    Text,
)
from core.turn import ChatMessage, TurnContext
from operators import from_async_iterable, merge_fair, sequence
from pipeline.harnesses import Harness, ModelReply
from pipeline.providers import ChatProvider

MODERATOR = "moderator"
UNLIMITED = 1 << 60


class Panelist(BaseModel):
    """One seat at the table."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w .\-]+$")
    model: str | None = None
    system: str | None = Field(default=None, max_length=20_000)


class RoundtableRequest(BaseModel):
    """Body of ``POST /v1/roundtable``: a topic or messages, a panel, rounds and a mode."""

    model_config = ConfigDict(extra="forbid")

    topic: str | None = Field(default=None, min_length=1, max_length=20_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    panelists: list[Panelist] = Field(min_length=1)
    rounds: StrictInt = Field(default=1, ge=1)
    mode: Literal["parallel", "sequential"] = "parallel"
    trace: StrictBool = False
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=100_000)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=200)
    background: StrictBool = False
    on_disconnect: Literal["continue", "cancel"] = "continue"

    @model_validator(mode="after")
    def _check(self) -> RoundtableRequest:
        if (self.topic is None) == (self.messages is None):
            raise ValueError("give exactly one of topic or messages")
        names = [p.name for p in self.panelists]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"panelist names must be unique; repeated: {', '.join(duplicates)}")
        if MODERATOR in names:
            raise ValueError(f"{MODERATOR!r} is the table's own name")
        return self

    def opening_messages(self) -> list[ChatMessage]:
        if self.messages is not None:
            return self.messages
        assert self.topic is not None
        return [ChatMessage(role="user", content=self.topic)]


class Pacer:
    """The demand of a roundtable's primary client, for :func:`operators.merge_fair`.

    The client acknowledges each event it has written (:meth:`ack` with its seq); the
    panel may run at most ``window`` events ahead of it. Without a primary client (a
    background roundtable) or once it leaves, :meth:`unlimited` lets events through in
    arrival order. Rounds subscribe one after another, so a new subscriber first gets the
    credit not yet used.
    """

    def __init__(self, *, window: int = 8, paced: bool = True) -> None:
        self.window = window
        self.allowed = window if paced else UNLIMITED
        self.released = 0
        self._observers: list[abc.ObserverBase[int]] = []

    def ack(self, seq: int) -> None:
        """The primary client has written every event up to ``seq``."""
        self._grant(seq + self.window)

    def unlimited(self) -> None:
        """Stop pacing: the primary client left (or there is none)."""
        self._grant(UNLIMITED)

    def on_release(self, _: object) -> None:
        self.released += 1

    def _grant(self, allowed: int) -> None:
        if allowed <= self.allowed:
            return
        extra = allowed - self.allowed
        self.allowed = allowed
        for observer in tuple(self._observers):
            observer.on_next(extra)

    @property
    def demand(self) -> Observable[int]:
        def subscribe(observer: abc.ObserverBase[int], _: abc.SchedulerBase | None = None
                      ) -> abc.DisposableBase:
            self._observers.append(observer)
            credit = self.allowed - self.released
            if credit > 0:
                observer.on_next(credit)
            return Disposable(lambda: self._observers.remove(observer))

        return reactivex.create(subscribe)


@dataclasses.dataclass
class _Table:
    """Per-turn state of a roundtable: the transcript and the advisor's decision."""

    ctx: TurnContext
    spec: RoundtableRequest
    moderator: int = 0
    transcript: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    failures: dict[int, int] = dataclasses.field(default_factory=dict)
    ended_early: bool = False


class RoundtableHarness:
    """Builds a roundtable's body for the orchestrator (``run(input, body=...)``).

    Args:
        provider: The model provider every panelist is called through.
        spec: The validated request.
        pacer: The primary client's demand (see :class:`Pacer`).
        max_buffer_per_panelist: Bound of each panelist's queue while the client is behind.
        memory: Loads the conversation's earlier messages (the usual memory harness).
    """

    def __init__(
        self, *, provider: ChatProvider, spec: RoundtableRequest, pacer: Pacer,
        memory: Harness, max_buffer_per_panelist: int = 100_016,
    ) -> None:
        self.provider = provider
        self.spec = spec
        self.pacer = pacer
        self.memory = memory
        self.max_buffer = max_buffer_per_panelist

    def body(self, ctx: TurnContext, *, route: bool = True) -> Observable[Event]:
        """The roundtable's events; ``route=False`` when the router already chose it."""
        table = _Table(ctx, self.spec)
        rounds = [self._round(table, k) for k in range(1, self.spec.rounds + 1)]
        between = [self._advise(table, k) for k in range(1, self.spec.rounds)]
        steps: list[Observable[Event]] = [
            *([from_async_iterable(lambda: _route(self.spec))] if route else []),
            from_async_iterable(lambda: self.memory(ctx)),
            from_async_iterable(lambda: self._open(table)),
        ]
        for k, round_ in enumerate(rounds):
            steps.append(round_)
            if k < len(between):
                steps.append(between[k])
        steps.append(from_async_iterable(lambda: self._close(table)))
        return sequence(*steps)

    # -- moderator -------------------------------------------------------------------------
    async def _open(self, table: _Table) -> AsyncIterator[Event]:
        table.moderator = table.ctx.next_stream_id()
        names = ", ".join(p.name for p in self.spec.panelists)
        yield StreamStart(stream_id=table.moderator, agent=MODERATOR, depth=0)
        yield Text(stream_id=table.moderator,
                   delta=f"Roundtable with {names}: {self.spec.rounds} round(s), "
                         f"{self.spec.mode}.")

    async def _close(self, table: _Table) -> AsyncIterator[Event]:
        spoke = len(table.transcript)
        failed = sum(table.failures.values())
        ending = " ended early" if table.ended_early else ""
        yield Text(stream_id=table.moderator,
                   delta=f" The table{ending} closes: {spoke} contribution(s), "
                         f"{failed} failure(s).")
        yield StreamEnd(stream_id=table.moderator, status="ok", finish_reason="stop")

    def _advise(self, table: _Table, k: int) -> Observable[Event]:
        async def advise() -> AsyncIterator[Event]:
            if table.ended_early:
                return
            if table.failures.get(k, 0) == len(self.spec.panelists):
                table.ended_early = True
                yield Advisor(stream_id=table.moderator, kind="end_early",
                              note=f"every panelist failed in round {k}")
            else:
                yield Advisor(stream_id=table.moderator, kind="gate_continue",
                              note=f"round {k + 1} of {self.spec.rounds}")

        return from_async_iterable(advise)

    # -- rounds ----------------------------------------------------------------------------
    def _round(self, table: _Table, k: int) -> Observable[Event]:
        def build(_: abc.SchedulerBase | None) -> Observable[Event]:
            if table.ended_early:
                return reactivex.empty()
            voices = [
                from_async_iterable(_bind(self._speak, table, k, panelist))
                for panelist in self.spec.panelists
            ]
            if self.spec.mode == "sequential":
                return sequence(*voices)
            return merge_fair(
                *voices, demand=self.pacer.demand, max_buffer_per_key=self.max_buffer,
            ).pipe(ops.do_action(self.pacer.on_release))

        return reactivex.defer(build)

    async def _speak(self, table: _Table, k: int, panelist: Panelist) -> AsyncIterator[Event]:
        ctx = table.ctx
        stream_id = ctx.next_stream_id()
        model = panelist.model or ctx.model
        messages = self._prompt(table, k, panelist)
        yield LlmCall(stream_id=stream_id, model=model, messages=messages)
        yield StreamStart(stream_id=stream_id, agent=panelist.name, depth=1,
                          parent_stream_id=table.moderator)
        reply = ModelReply(max_tokens=ctx.max_tokens)
        try:
            pieces = self.provider.stream_chat(model=model, messages=messages,
                                               max_tokens=ctx.max_tokens)
            async for event in reply.events(pieces, stream_id=stream_id):
                yield event
        except ProviderError as exc:
            # One panelist failing ends its own stream; the table goes on.
            table.failures[k] = table.failures.get(k, 0) + 1
            table.transcript.append((k, panelist.name, "(no answer: failed)"))
            yield ErrorEvent(stream_id=stream_id, error=str(exc), retryable=exc.retryable)
            yield StreamEnd(stream_id=stream_id, status="error")
            return
        table.transcript.append((k, panelist.name, "".join(reply.text)))
        yield StreamEnd(stream_id=stream_id, status="ok", finish_reason=reply.finish)

    def _prompt(self, table: _Table, k: int, panelist: Panelist) -> list[dict[str, Any]]:
        spec = self.spec
        others = ", ".join(p.name for p in spec.panelists if p.name != panelist.name)
        system = panelist.system or (
            f"You are {panelist.name}, a panelist at a roundtable"
            + (f" with {others}" if others else "") + ". Give your own view, briefly."
        )
        earlier = [
            f"[round {r}] {name}: {text}" for r, name, text in table.transcript
            if r < k or (spec.mode == "sequential" and r == k)
        ]
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
        messages += table.ctx.history
        messages += table.ctx.messages
        if earlier:
            messages.append({
                "role": "user",
                "content": "The table so far:\n" + "\n".join(earlier)
                           + f"\nRound {k}: your turn, {panelist.name}.",
            })
        return messages


def _bind(
    speak: Callable[[_Table, int, Panelist], AsyncIterator[Event]],
    table: _Table, k: int, panelist: Panelist,
) -> Callable[[], AsyncIterator[Event]]:
    return lambda: speak(table, k, panelist)


async def _route(spec: RoundtableRequest) -> AsyncIterator[Event]:
    yield Route(route="roundtable",
                reason=f"{len(spec.panelists)} panelists, {spec.rounds} round(s), {spec.mode}")


def panel_of(entries: Sequence[str]) -> list[Panelist]:
    """``ROUNDTABLE_PANEL`` entries as panelists: ``name``, ``name=provider/model``, or
    ``provider/model`` (seated under the provider's name, e.g. ``offline-b``)."""
    panel: list[Panelist] = []
    for entry in entries:
        name, equals, model = entry.partition("=")
        if equals:
            panel.append(Panelist(name=name.strip(), model=model.strip()))
        elif "/" in entry:
            panel.append(Panelist(name=entry.split("/", 1)[0], model=entry))
        else:
            panel.append(Panelist(name=entry))
    return panel


def panel_names(spec: RoundtableRequest) -> Sequence[str]:
    """The panelists' names in seat order (choice 1, 2, … on the OpenAI wire)."""
    return [p.name for p in spec.panelists]

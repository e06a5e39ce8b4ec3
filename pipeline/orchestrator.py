"""The streaming orchestrator: router → memory → response as one ordered, shared stream.

The flow of one turn (DESIGN.md "The flow")::

    sequence(router, memory, response)       each harness a cold Observable (concat)
      .pipe(turn_envelope(...),              request_received … done, streams closed
            number_events(request_id))       one seq per request, assigned here only
      .subscribe(ReplayLog())                one hot stream per request, replayed to late
                                             subscribers
      ├──► TurnRecorder                      every event → DuckDB; request and messages
      │      └──► result                     the final TurnState → Turn.result
      └──► clients: .pipe(visible(trace=…)) → SSE frames or chat chunks

``run`` starts the turn at once; it runs to its end whether or not anyone listens,
unless :meth:`Turn.cancel` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar, overload

import reactivex
from reactivex import Observable, Observer
from reactivex.scheduler.eventloop import AsyncIOScheduler
from reactivex.subject import Subject

from core.errors import StoreError
from core.events import Event
from core.logs import bind_request_id
from core.turn import TurnContext, TurnInput, TurnResult, new_id
from operators import (
    ReplayLog,
    durable_done,
    from_async_iterable,
    number_events,
    price_usage,
    sequence,
    turn_deadline,
    turn_envelope,
    visible,
)
from operators._price_usage import Cost
from pipeline.agents import AgentTeam
from pipeline.harnesses import (
    Archivist,
    Harness,
    MemoryHarness,
    ResponseHarness,
    Reviewer,
    RouterHarness,
    ToolHarness,
)
from pipeline.providers import ChatProvider
from pipeline.tools import ToolRegistry
from sinks.async_iter import to_async_batches, to_async_iterator
from sinks.event_log import RedisEventLog
from sinks.recorder import TurnRecorder, turn_meta
from sinks.store import EventStore

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Turn:
    """A running turn: its hot event stream and the awaitable final result.

    Attributes:
        request_id: The request's id (``X-Request-Id``).
        conversation_id: The conversation it belongs to.
        stream: Every event of the turn, trace included, from ``request_received`` to
            ``done``; a late subscriber first gets what it missed.
        result: Resolves to the final :class:`TurnResult` (never raises for a failed
            turn: look at ``status``).
    """

    def __init__(
        self, *, ctx: TurnContext, stream: Observable[Event], result: asyncio.Future[TurnResult],
        cancel: Subject[None], recorder: TurnRecorder, subject: ReplayLog[Event], taps: int = 0,
    ) -> None:
        self.ctx = ctx
        self._taps = taps
        self._subject = subject
        self._recorder = recorder
        self.request_id = ctx.request_id
        self.conversation_id = ctx.conversation_id
        self.stream = stream
        self.result = result
        self._cancel = cancel

    @property
    def done(self) -> bool:
        return self.result.done()

    def cancel(self) -> None:
        """Stop the turn: the model call is closed, open streams end ``cancelled``, then
        ``done`` with ``reason: "cancelled"``. A no-op once the turn has finished."""
        if not self.result.done():
            self._cancel.on_next(None)

    @property
    def subscribers(self) -> int:
        """How many observers follow the turn's hot stream now (recorder included; the
        orchestrator's ``taps``, e.g. metrics and traces, not counted)."""
        return len(self._subject.observers) - self._taps

    @property
    def last_seq(self) -> int:
        """The seq of the newest event so far."""
        return self._recorder.state.last_seq

    @overload
    def events(self, *, trace: bool = ..., max_buffer: int = ..., idle_s: None = None
               ) -> AsyncGenerator[Event]: ...

    @overload
    def events(self, *, trace: bool = ..., max_buffer: int = ..., idle_s: float
               ) -> AsyncGenerator[Event | None]: ...

    def events(self, *, trace: bool = False, max_buffer: int = 4096, idle_s: float | None = None
               ) -> AsyncGenerator[Event] | AsyncGenerator[Event | None]:
        """The turn's events as an async iterator (use under ``contextlib.aclosing``);
        with ``idle_s``, ``None`` marks each silence of that length (for heartbeats)."""
        if idle_s is None:
            return self.view(visible(trace=trace), max_buffer=max_buffer)
        return self.view(visible(trace=trace), max_buffer=max_buffer, idle_s=idle_s)

    @overload
    def view(self, transform: Callable[[Observable[Event]], Observable[_T]], *,
             max_buffer: int = ..., idle_s: None = None) -> AsyncGenerator[_T]: ...

    @overload
    def view(self, transform: Callable[[Observable[Event]], Observable[_T]], *,
             max_buffer: int = ..., idle_s: float) -> AsyncGenerator[_T | None]: ...

    def view(
        self, transform: Callable[[Observable[Event]], Observable[_T]], *, max_buffer: int = 4096,
        idle_s: float | None = None,
    ) -> AsyncGenerator[_T] | AsyncGenerator[_T | None]:
        """``stream.pipe(transform)`` as a bounded async iterator.

        A subscriber that joins late is replayed everything so far in one burst; that
        history does not count against ``max_buffer``, which bounds only how far the
        consumer may fall behind the live turn. (It subscribes, and measures the history,
        on the first ``__anext__``.)
        """
        def history() -> int:
            return self.last_seq

        source = self.stream.pipe(transform)
        if idle_s is None:
            return to_async_iterator(source, max_buffer=max_buffer, replayed=history)
        return to_async_iterator(source, max_buffer=max_buffer, replayed=history, idle_s=idle_s)

    def batches(
        self, transform: Callable[[Observable[Event]], Observable[_T]], *, max_buffer: int = 4096,
        idle_s: float | None = None,
    ) -> AsyncGenerator[list[_T]]:
        """:meth:`view`, each step yielding every item ready (``[]`` for each silence of
        ``idle_s``), so a writer sends what is ready in one socket write."""
        def history() -> int:
            return self.last_seq

        return to_async_batches(self.stream.pipe(transform), max_buffer=max_buffer,
                                replayed=history, idle_s=idle_s)


class StreamingOrchestrator:
    """Runs turns: sequences the harnesses, numbers, shares and records the events.

    Args:
        provider: The model provider the default response harness calls.
        store: The event store (also the archivist for memory); None keeps nothing.
        default_model: The model used when a turn names none.
        history_limit: How many earlier messages memory loads.
        agent: The agent named in ``request_received`` and the response stream.
        harnesses: Replace the default ``(router, memory, response)`` sequence.
        tools: The tool registry: the default sequence becomes ``(router, memory, tools,
            response)``, the tool harness running a request's direct ``tool_calls`` and the
            response harness offering the enabled tools to the model (the agent loop).
        taps: Observers of every turn's whole stream besides the recorder (metrics, traces):
            each factory makes one per turn, subscribed after the recorder and before any
            client. A tap must not raise.
        router: Replaces the default router (e.g. :class:`pipeline.router.ModelRouter`).
        agents: Sub-agents offered to the response model (:mod:`pipeline.agents`).
        advisor: Reviews each top-level answer (:mod:`pipeline.advisor`).
        roundtable: The body of a turn the router sends to ``roundtable``: after the router,
            it replaces memory, tools and response.
        cost: Prices each ``token_usage`` (``cost_usd``, :func:`operators.price_usage`).
        event_log: The distributed log (``EVENT_LOG=redis://…``): every numbered event of
            every turn is also appended there; None (``memory``) keeps the turn in-process.
        announce: Announce each turn on the log's discovery stream with its meta, so the
            recorder process records it (the worker role: ``store`` is then None and
            nothing is written here).
        durable: The durability barrier of ``done`` in place of a flush of ``store``:
            called with the request id and the seq of the last event before ``done`` (the
            worker role: the recorder has committed the turn up to there).
    """

    def __init__(
        self,
        *,
        provider: ChatProvider,
        store: EventStore | None,
        default_model: str,
        history_limit: int = 200,
        agent: str = "assistant",
        archivist: Archivist | None = None,
        harnesses: Sequence[Harness] | None = None,
        tools: ToolRegistry | None = None,
        taps: Sequence[Callable[[TurnContext], Observer[Event]]] = (),
        durable_done: bool = True,
        deadline_s: float | None = None,
        router: Harness | None = None,
        agents: AgentTeam | None = None,
        advisor: Reviewer | None = None,
        roundtable: Callable[[TurnContext], Observable[Event]] | None = None,
        cost: Cost | None = None,
        event_log: RedisEventLog | None = None,
        announce: bool = False,
        durable: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self.taps = tuple(taps)
        self.announce = announce and event_log is not None
        self.durable = durable
        self.provider = provider
        self.durable_done = durable_done
        self.deadline_s = deadline_s
        self.event_log = event_log
        self.tools = tools
        self.store = store
        self.default_model = default_model
        self.agent = agent
        archivist = archivist or store or _NoHistory()
        self.harnesses: tuple[Harness, ...] = tuple(harnesses) if harnesses else (
            router or RouterHarness(),
            MemoryHarness(archivist, limit=history_limit),
            *((ToolHarness(tools),) if tools is not None else ()),
            ResponseHarness(provider, agent=agent, tools=tools, agents=agents, advisor=advisor),
        )
        self.roundtable = roundtable if not harnesses else None
        self.cost = cost
        self.live: dict[str, Turn] = {}

    def run(
        self, turn_input: TurnInput, *, body: Callable[[TurnContext], Observable[Event]] | None = None
    ) -> Turn:
        """Start a turn now and return it. Must be called on the running event loop.

        ``body`` replaces the default harness sequence (router → memory → response) with
        another composition over the same context, e.g. a roundtable; the envelope,
        numbering, sharing and recording are the same for every turn.
        """
        loop = asyncio.get_running_loop()
        ctx = TurnContext(
            request_id=new_id("req"),
            conversation_id=turn_input.conversation_id or new_id("conv"),
            messages=[message.as_openai() for message in turn_input.messages],
            trace=turn_input.trace,
            model=turn_input.model or self.default_model,
            max_tokens=turn_input.max_tokens,
            kind=turn_input.kind,
            tool_calls=list(turn_input.tool_calls),
            new_conversation=turn_input.conversation_id is None,
            model_params=dict(turn_input.model_params),
            server_tools=turn_input.server_tools,
        )
        cancel: Subject[None] = Subject()
        result: asyncio.Future[TurnResult] = loop.create_future()
        # Every line logged for this turn from here on carries its id: the harness tasks
        # are created below, with this context copied into them.
        bind_request_id(ctx.request_id)
        log.info("turn started", extra={"kind": ctx.kind, "model": ctx.model,
                                        "conversation_id": ctx.conversation_id})

        def finished(final: TurnResult) -> None:
            self.live.pop(ctx.request_id, None)
            log.info("turn %s", final.status, extra={
                "request_id": ctx.request_id, "kind": ctx.kind, "status": final.status,
                "duration_ms": final.duration_ms, "model": final.model})
            if not result.done():
                result.set_result(final)

        steps = body(ctx) if body is not None else self._steps(ctx)
        if self.cost is not None:
            steps = steps.pipe(price_usage(self.cost))
        if self.deadline_s is not None:
            steps = steps.pipe(turn_deadline(self.deadline_s, scheduler=AsyncIOScheduler(loop)))
        enveloped = steps.pipe(
            turn_envelope(agent=self.agent, conversation_id=ctx.conversation_id, cancel=cancel))
        if (self.store is not None or self.durable is not None) and self.durable_done:
            enveloped = enveloped.pipe(durable_done(self._barrier(
                ctx.request_id, lambda: recorder.state.last_seq)))
        numbered = enveloped.pipe(number_events(ctx.request_id))
        shared: ReplayLog[Event] = ReplayLog()
        recorder = TurnRecorder(ctx, store=self.store, on_done=finished)
        recorder.start()
        shared.subscribe(recorder)  # first, so the store sees each event before any client
        for tap in self.taps:
            shared.subscribe(tap(ctx))
        if self.event_log is not None:  # the distributed log (issue 13), batched per tick
            meta = turn_meta(ctx, started_at=recorder.started_at) if self.announce else None
            shared.subscribe(self.event_log.writer(ctx.request_id, history=lambda: shared.items,
                                                   meta=meta))
        turn = Turn(ctx=ctx, stream=shared, result=result, cancel=cancel, recorder=recorder,
                    subject=shared, taps=len(self.taps))
        self.live[ctx.request_id] = turn
        numbered.subscribe(shared)  # starts the turn: the harness pumps begin on the loop
        return turn

    def _barrier(self, request_id: str, last_seq: Callable[[], int]
                 ) -> Callable[[], Observable[None]]:
        """The turn's durability barrier, for ``durable_done``: a flush of the store (or
        ``durable``, up to the last seq before ``done``)."""
        store = self.store
        durable = self.durable

        async def flushed() -> None:
            try:
                if durable is not None:
                    await durable(request_id, last_seq())
                else:
                    assert store is not None
                    await store.flush(request_id=request_id, events_only=True)
            except Exception as exc:  # a StoreError, or the barrier's timeout under load
                log.error("turn %s: its events are not durable: %s", request_id,
                          exc if isinstance(exc, StoreError) else repr(exc))
                raise

        return lambda: reactivex.from_future(asyncio.ensure_future(flushed()))

    def _steps(self, ctx: TurnContext) -> Observable[Event]:
        """The harnesses in order; with a roundtable, the router's decision picks the rest."""
        first, *rest = (from_async_iterable(_bind(harness, ctx)) for harness in self.harnesses)
        roundtable = self.roundtable
        if roundtable is None:
            return sequence(first, *rest)

        def after_route(_: object) -> Observable[Event]:
            return roundtable(ctx) if ctx.route == "roundtable" else sequence(*rest)

        return sequence(first, reactivex.defer(after_route))

    async def drain(self, *, grace_s: float) -> int:
        """Let live turns finish within ``grace_s``, then cancel the rest.

        Returns how many turns had to be cancelled.
        """
        pending = [turn.result for turn in self.live.values()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        late = [turn for turn in self.live.values() if not turn.done]
        for turn in late:
            turn.cancel()
        if late:
            # Cancelling is synchronous in the pipeline; this lets recorders settle.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(turn.result for turn in late)), timeout=5
                )
        return len(late)


def _bind(harness: Harness, ctx: TurnContext):  # type: ignore[no-untyped-def]
    return lambda: harness(ctx)


class _NoHistory:
    async def load_history(
        self, conversation_id: str, *, limit: int, exclude_request_id: str | None = None
    ) -> list[dict[str, str]]:
        return []

"""The streaming orchestrator: a scripted provider for the unit tests, the real offline model
over HTTP for the integration tests. Whole event lists are asserted (ts/duration_ms aside)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import pytest

from core.errors import ProviderError
from core.events import Event
from core.turn import ChatMessage, TurnInput, TurnResult, TurnUsage
from pipeline.offline_model import OfflineModelServer, compose_answer, count_prompt_tokens
from pipeline.orchestrator import StreamingOrchestrator, Turn
from pipeline.providers import Delta, Finish, OpenAIProvider, Piece, Usage
from sinks.store import EventStore

# -- a scripted provider --------------------------------------------------------------------

Step: TypeAlias = Piece | asyncio.Event | Exception
"""A piece to yield, an event to wait for (holds the stream open), or an error to raise."""


class ScriptedProvider:
    """A :class:`ChatProvider` that plays one script per call, in order."""

    name = "scripted"

    def __init__(self, *scripts: Sequence[Step]) -> None:
        self.scripts = [list(script) for script in scripts]
        self.calls: list[list[dict[str, Any]]] = []
        self.holding = asyncio.Event()  # set while a script waits on an asyncio.Event
        self.closed = 0  # how many streams ran their `finally`

    async def stream_chat(
        self, *, model: str, messages: Sequence[dict[str, Any]], max_tokens: int | None = None
    ) -> AsyncIterator[Piece]:
        self.calls.append([dict(m) for m in messages])
        script = self.scripts.pop(0)
        try:
            for step in script:
                if isinstance(step, asyncio.Event):
                    self.holding.set()
                    await step.wait()
                elif isinstance(step, Exception):
                    raise step
                else:
                    yield step
        finally:
            self.closed += 1

    async def list_models(self) -> list[str]:
        return ["m"]


def usage(prompt: int = 3, completion: int = 2) -> Usage:
    return Usage(model="m", prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def boom(*, retryable: bool) -> ProviderError:
    return ProviderError("boom", provider="scripted", model="m", status=503, retryable=retryable)


HELLO: list[Step] = [Delta("Hel"), Delta("lo"), Finish("stop"), usage()]

# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "e.duckdb", flush_interval_ms=20).open()
    try:
        yield s
    finally:
        s.close()


def orchestrator(provider: ScriptedProvider, store: EventStore | None) -> StreamingOrchestrator:
    return StreamingOrchestrator(provider=provider, store=store, default_model="m")


def ask(text: str = "hi", *, conversation_id: str | None = None, **kw: Any) -> TurnInput:
    return TurnInput(
        messages=[ChatMessage(role="user", content=text)], conversation_id=conversation_id, **kw
    )


def collect(turn: Turn) -> list[Event]:
    """Every event of the turn so far (the stream replays to a new subscriber)."""
    seen: list[Event] = []
    turn.stream.subscribe(seen.append).dispose()
    return seen


def dump(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [event.model_dump(exclude={"ts", "duration_ms"}) for event in events]


async def finish(turn: Turn, timeout_s: float = 5.0) -> TurnResult:
    async with asyncio.timeout(timeout_s):
        return await turn.result


async def wait_for(predicate: Callable[[], bool], *, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return predicate()


def expected(
    turn: Turn, body: list[dict[str, Any]], *, done_ok: bool, reason: str,
    messages: list[dict[str, str]] | None = None, loaded: int = 0,
) -> list[dict[str, Any]]:
    """The whole event list of a one-response turn, numbered."""
    messages = messages if messages is not None else [{"role": "user", "content": "hi"}]
    events: list[dict[str, Any]] = [
        {"type": "request_received", "agent": "assistant",
         "conversation_id": turn.conversation_id},
        {"type": "route", "route": "respond", "reason": "one model answers the conversation"},
        {"type": "memory", "messages_loaded": loaded},
        {"type": "llm_call", "stream_id": 1, "model": "m", "messages": messages},
        {"type": "stream_start", "stream_id": 1, "agent": "assistant", "depth": 0,
         "parent_stream_id": None},
        *body,
        {"type": "done", "ok": done_ok, "reason": reason},
    ]
    return [
        {"request_id": turn.request_id, "seq": seq, **event}
        for seq, event in enumerate(events, start=1)
    ]


def text(delta: str) -> dict[str, Any]:
    return {"type": "text", "stream_id": 1, "delta": delta}


def end(status: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"type": "stream_end", "stream_id": 1, "status": status, "finish_reason": finish_reason}


USAGE_EVENT = {"type": "token_usage", "stream_id": 1, "model": "m", "prompt_tokens": 3,
               "completion_tokens": 2, "total_tokens": 5, "cost_usd": None}


# -- a turn, start to end -------------------------------------------------------------------


@pytest.mark.parametrize("with_store", [True, False], ids=["store", "no-store"])
async def test_a_turn_end_to_end(tmp_path: Path, with_store: bool) -> None:
    store = EventStore(tmp_path / "e.duckdb").open() if with_store else None
    try:
        provider = ScriptedProvider(HELLO)
        orch = orchestrator(provider, store)
        turn = orch.run(ask())
        assert orch.live == {turn.request_id: turn}
        result = await finish(turn)
        events = collect(turn)
    finally:
        if store is not None:
            store.close()

    assert dump(events) == expected(
        turn, [text("Hel"), text("lo"), USAGE_EVENT, end("ok", "stop")], done_ok=True,
        reason="completed",
    )
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert provider.calls == [[{"role": "user", "content": "hi"}]]
    assert provider.closed == 1
    assert result.request_id == turn.request_id
    assert result.conversation_id == turn.conversation_id
    assert (result.status, result.content, result.finish_reason, result.model) == (
        "completed", "Hello", "stop", "m"
    )
    assert result.usage == TurnUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert result.error is None
    assert result.last_seq == len(events)
    assert result.duration_ms is not None and result.first_token_ms is not None
    assert orch.live == {}
    assert turn.done


async def test_events_iterator_hides_trace_unless_asked(store: EventStore) -> None:
    turn = orchestrator(ScriptedProvider(HELLO), store).run(ask())
    async with contextlib.aclosing(turn.events()) as public:
        plain = [event async for event in public]
    async with contextlib.aclosing(turn.events(trace=True)) as traced:
        full = [event async for event in traced]
    assert [e.type for e in plain] == [
        "request_received", "stream_start", "text", "text", "token_usage", "stream_end", "done"
    ]
    assert [e.seq for e in plain] == [1, 5, 6, 7, 8, 9, 10]  # trace events leave gaps
    assert dump(full) == dump(collect(turn))


async def test_the_turn_is_recorded(store: EventStore) -> None:
    turn = orchestrator(ScriptedProvider(HELLO), store).run(ask(model="m"))
    result = await finish(turn)
    await store.flush()
    rows = store.query("SELECT seq, type, visibility FROM events WHERE request_id = ? "
                       "ORDER BY seq", [turn.request_id])
    assert [row[1] for row in rows] == [e.type for e in collect(turn)]
    assert rows[1][2] == "trace" and rows[0][2] == "public"
    assert store.query(
        "SELECT conversation_id, status, model, total_tokens, last_seq FROM requests"
    ) == [(turn.conversation_id, "completed", "m", 5, result.last_seq)]
    assert store.query("SELECT role, content, status FROM messages ORDER BY ordinal") == [
        ("user", "hi", "complete"), ("assistant", "Hello", "complete")
    ]


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("retryable", [True, False])
async def test_provider_error_mid_stream(store: EventStore, retryable: bool) -> None:
    error = boom(retryable=retryable)
    provider = ScriptedProvider([Delta("Hel"), Delta("lo"), error])
    turn = orchestrator(provider, store).run(ask())
    result = await finish(turn)

    assert dump(collect(turn)) == expected(
        turn,
        [text("Hel"), text("lo"),
         {"type": "turn_error", "stream_id": 1, "error": str(error), "retryable": retryable},
         end("error")],
        done_ok=False, reason="error",
    )
    assert (result.status, result.content, result.error) == ("error", "Hello", str(error))
    assert result.finish_reason is None
    assert provider.closed == 1
    await store.flush()
    assert store.query("SELECT status, error FROM requests") == [("error", str(error))]
    assert store.query("SELECT content, status FROM messages WHERE role = 'assistant'") == [
        ("Hello", "error")
    ]


async def test_provider_error_before_any_piece(store: EventStore) -> None:
    turn = orchestrator(ScriptedProvider([boom(retryable=True)]), store).run(ask())
    result = await finish(turn)
    assert [e.type for e in collect(turn)] == [
        "request_received", "route", "memory", "llm_call", "stream_start", "turn_error",
        "stream_end", "done",
    ]
    assert (result.status, result.content) == ("error", "")


# -- cancellation ---------------------------------------------------------------------------


async def test_cancel_while_the_provider_holds(store: EventStore) -> None:
    hold = asyncio.Event()
    provider = ScriptedProvider([Delta("Hel"), hold, Delta("never"), Finish("stop")])
    orch = orchestrator(provider, store)
    turn = orch.run(ask())
    async with asyncio.timeout(2):
        await provider.holding.wait()

    turn.cancel()
    result = await finish(turn)

    assert dump(collect(turn)) == expected(
        turn, [text("Hel"), end("cancelled")], done_ok=False, reason="cancelled"
    )
    assert (result.status, result.content) == ("cancelled", "Hel")
    # The scripted generator was closed (its `finally` ran): the model call stopped.
    assert await wait_for(lambda: provider.closed == 1)
    assert orch.live == {}
    await store.flush()
    assert store.query("SELECT status FROM requests") == [("cancelled",)]
    assert store.query("SELECT content, status FROM messages WHERE role = 'assistant'") == [
        ("Hel", "cancelled")
    ]


async def test_cancel_right_after_run(store: EventStore) -> None:
    provider = ScriptedProvider(HELLO)
    turn = orchestrator(provider, store).run(ask())
    turn.cancel()
    result = await finish(turn)
    assert [e.type for e in collect(turn)] == ["request_received", "done"]
    assert result.status == "cancelled"
    await asyncio.sleep(0.01)
    assert provider.calls == []  # the model was never called


async def test_cancel_after_done_is_a_no_op(store: EventStore) -> None:
    turn = orchestrator(ScriptedProvider(HELLO), store).run(ask())
    result = await finish(turn)
    before = dump(collect(turn))
    turn.cancel()
    turn.cancel()
    await asyncio.sleep(0.01)
    assert dump(collect(turn)) == before
    assert turn.result.result() == result
    assert result.status == "completed"


# -- sharing --------------------------------------------------------------------------------


async def test_late_subscriber_gets_every_event(store: EventStore) -> None:
    turn = orchestrator(ScriptedProvider(HELLO), store).run(ask())
    async with contextlib.aclosing(turn.events(trace=True)) as early:
        live = [event async for event in early]
    await finish(turn)

    async with contextlib.aclosing(turn.events(trace=True)) as late:
        replayed = [event async for event in late]
    assert dump(replayed) == dump(live)
    assert replayed[0].type == "request_received" and replayed[-1].type == "done"
    assert len(replayed) == 10


async def test_late_subscriber_during_the_turn(store: EventStore) -> None:
    hold = asyncio.Event()
    provider = ScriptedProvider([Delta("Hel"), hold, Delta("lo"), Finish("stop"), usage()])
    turn = orchestrator(provider, store).run(ask())
    async with asyncio.timeout(2):
        await provider.holding.wait()
    async with contextlib.aclosing(turn.events(trace=True)) as joined:
        hold.set()
        events = [event async for event in joined]
    assert dump(events) == dump(collect(turn))
    assert [e.seq for e in events] == list(range(1, 11))


async def test_concurrent_turns_have_independent_seqs(store: EventStore) -> None:
    hold = asyncio.Event()
    provider = ScriptedProvider(
        [Delta("a"), hold, Delta("b"), Finish("stop"), usage()],
        [Delta("x"), hold, Delta("y"), Finish("stop"), usage()],
    )
    orch = orchestrator(provider, store)
    first, second = orch.run(ask("one")), orch.run(ask("two"))
    assert len(orch.live) == 2
    assert await wait_for(lambda: len(provider.calls) == 2)
    hold.set()
    results = await asyncio.gather(finish(first), finish(second))

    for turn, content in zip((first, second), ("ab", "xy"), strict=True):
        events = collect(turn)
        assert [e.seq for e in events] == list(range(1, 11))
        assert {e.request_id for e in events} == {turn.request_id}
        assert "".join(getattr(e, "delta", "") for e in events) == content
    assert [r.content for r in results] == ["ab", "xy"]
    assert first.request_id != second.request_id
    assert first.conversation_id != second.conversation_id
    assert orch.live == {}


# -- memory ---------------------------------------------------------------------------------


async def test_second_turn_gets_the_conversation_history(store: EventStore) -> None:
    provider = ScriptedProvider(HELLO, [Delta("again"), Finish("stop"), usage()])
    orch = orchestrator(provider, store)
    first = orch.run(ask("hi", conversation_id="c1"))
    await finish(first)
    second = orch.run(ask("more", conversation_id="c1"))
    await finish(second)

    sent = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "more"},
    ]
    assert provider.calls == [[{"role": "user", "content": "hi"}], sent]
    assert dump(collect(second)) == expected(
        second, [text("again"), USAGE_EVENT, end("ok", "stop")], done_ok=True,
        reason="completed", messages=sent, loaded=2,
    )
    assert second.conversation_id == first.conversation_id == "c1"


async def test_history_leaves_out_a_failed_answer(store: EventStore) -> None:
    provider = ScriptedProvider([Delta("half"), boom(retryable=True)], HELLO)
    orch = orchestrator(provider, store)
    await finish(orch.run(ask("hi", conversation_id="c1")))
    await finish(orch.run(ask("retry", conversation_id="c1")))
    assert provider.calls[1] == [
        {"role": "user", "content": "hi"}, {"role": "user", "content": "retry"}
    ]


async def test_without_a_store_there_is_no_history() -> None:
    provider = ScriptedProvider(HELLO, HELLO)
    orch = orchestrator(provider, None)
    await finish(orch.run(ask("hi", conversation_id="c1")))
    await finish(orch.run(ask("more", conversation_id="c1")))
    assert provider.calls[1] == [{"role": "user", "content": "more"}]


# -- drain ----------------------------------------------------------------------------------


async def test_drain_cancels_a_held_turn(store: EventStore) -> None:
    hold = asyncio.Event()
    provider = ScriptedProvider([Delta("Hel"), hold, Finish("stop")], HELLO)
    orch = orchestrator(provider, store)
    held = orch.run(ask())
    quick = orch.run(ask())
    async with asyncio.timeout(2):
        await provider.holding.wait()

    # The grace covers the quick turn's end, its done barrier (a store write) included.
    assert await orch.drain(grace_s=1.0) == 1
    assert held.result.done() and quick.result.done()
    assert held.result.result().status == "cancelled"
    assert quick.result.result().status == "completed"
    assert orch.live == {}
    assert await wait_for(lambda: provider.closed == 2)


async def test_drain_with_nothing_live() -> None:
    assert await orchestrator(ScriptedProvider(), None).drain(grace_s=0.05) == 0


# -- integration: the real offline model over HTTP ------------------------------------------


@contextlib.asynccontextmanager
async def offline_orchestrator(
    *, token_delay_ms: float, store: EventStore | None,
) -> AsyncIterator[tuple[OfflineModelServer, StreamingOrchestrator]]:
    async with OfflineModelServer(token_delay_ms=token_delay_ms) as srv:
        provider = OpenAIProvider(base_url=srv.base_url, api_key="x", timeout_s=5, max_retries=0)
        try:
            yield srv, StreamingOrchestrator(
                provider=provider, store=store, default_model="offline"
            )
        finally:
            await provider.aclose()


async def test_offline_model_turn_text(store: EventStore) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    async with offline_orchestrator(token_delay_ms=1, store=store) as (srv, orch):
        turn = orch.run(TurnInput.model_validate({"messages": messages}))
        result = await finish(turn)
        stats = (srv.stats.completed, srv.stats.disconnected)

    tokens = compose_answer("offline", messages)
    prompt = count_prompt_tokens(messages)
    events = collect(turn)
    assert result.status == "completed"
    assert result.content == "".join(tokens)
    assert [e.delta for e in events if e.type == "text"] == tokens
    assert result.finish_reason == "stop"
    assert result.usage == TurnUsage(
        prompt_tokens=prompt, completion_tokens=len(tokens), total_tokens=prompt + len(tokens)
    )
    llm_call = next(e for e in events if e.type == "llm_call")
    assert llm_call.messages == messages
    assert stats == (1, 0)


async def test_offline_second_turn_remembers(store: EventStore) -> None:
    async with offline_orchestrator(token_delay_ms=1, store=store) as (_, orch):
        first = await finish(orch.run(ask("my name is Ada", conversation_id="c9")))
        second = await finish(orch.run(ask("what is it?", conversation_id="c9")))
    history = [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": "what is it?"},
    ]
    assert second.content == "".join(compose_answer("offline", history))
    assert 'Earlier you said: "my name is Ada".' in second.content


async def test_cancelling_a_turn_disconnects_the_model(store: EventStore) -> None:
    async with offline_orchestrator(token_delay_ms=20, store=store) as (srv, orch):
        turn = orch.run(ask("a long answer please"))
        async with contextlib.aclosing(turn.events()) as events:
            async for event in events:
                if event.type == "text":
                    turn.cancel()
            # The iterator ends with `done` after the cancel.
        result = await finish(turn)
        assert result.status == "cancelled"
        assert await wait_for(lambda: srv.stats.disconnected == 1), srv.stats
        assert srv.stats.completed == 0
    types = [e.type for e in collect(turn)]
    assert types[-2:] == ["stream_end", "done"]
    assert collect(turn)[-2].model_dump()["status"] == "cancelled"


async def test_leaving_the_consumer_side_does_not_stop_the_turn(store: EventStore) -> None:
    async with offline_orchestrator(token_delay_ms=5, store=store) as (srv, orch):
        turn = orch.run(ask())
        async with contextlib.aclosing(turn.events()) as events:
            async for event in events:
                if event.type == "text":
                    break
        assert not turn.done  # the hot stream goes on without this consumer
        result = await finish(turn)
        assert result.status == "completed"
        assert result.content == "".join(
            compose_answer("offline", [{"role": "user", "content": "hi"}])
        )
        assert (srv.stats.completed, srv.stats.disconnected) == (1, 0)


async def test_an_exception_in_the_consumer_does_not_stop_the_turn(store: EventStore) -> None:
    async with offline_orchestrator(token_delay_ms=1, store=store) as (srv, orch):
        turn = orch.run(ask())
        with pytest.raises(RuntimeError):
            async with contextlib.aclosing(turn.events()) as events:
                async for event in events:
                    if event.type == "text":
                        raise RuntimeError("consumer failed")
        assert (await finish(turn)).status == "completed"
        assert srv.stats.disconnected == 0


async def test_unreachable_model_ends_the_turn_with_a_retryable_error(
    store: EventStore,
) -> None:
    async with OfflineModelServer(token_delay_ms=1) as srv:
        url = srv.base_url
    # The server is gone: its port refuses connections now.
    provider = OpenAIProvider(base_url=url, api_key="x", timeout_s=2, max_retries=0)
    try:
        orch = StreamingOrchestrator(provider=provider, store=store, default_model="offline")
        turn = orch.run(ask())
        result = await finish(turn)
    finally:
        await provider.aclose()
    events = collect(turn)
    assert result.status == "error"
    error = next(e for e in events if e.type == "turn_error")
    assert error.model_dump(include={"stream_id", "retryable"}) == {
        "stream_id": 1, "retryable": True
    }
    assert [e.type for e in events][-3:] == ["turn_error", "stream_end", "done"]


async def test_late_subscriber_of_a_long_turn_gets_every_event() -> None:
    provider = ScriptedProvider([*(Delta(f" w{i}") for i in range(5000)), Finish("stop")])
    turn = orchestrator(provider, None).run(ask())
    assert (await finish(turn)).status == "completed"
    total = len(collect(turn))  # 5000 text events + 9 others, trace included
    async with contextlib.aclosing(turn.events(trace=True)) as late:
        replayed = [event async for event in late]
    assert len(replayed) == total

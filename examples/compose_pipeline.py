"""Compose your own pipeline from harnesses and operators, offline.

A router decides, then two voices answer the same question at once (``merge_panel``);
the turn envelope, numbering and the trace filter make it a well-formed native stream.

Run it (no API key, no network: it starts the bundled offline model)::

    .venv/bin/python examples/compose_pipeline.py "What is a cold observable?"
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from core.events import Text
from core.turn import TurnContext, new_id
from operators import (
    from_async_iterable,
    merge_panel,
    number_events,
    sequence,
    turn_envelope,
    visible,
)
from pipeline.harnesses import ResponseHarness, RouterHarness
from pipeline.offline_model import OfflineModelServer
from pipeline.providers import OpenAIProvider
from sinks.async_iter import to_async_iterator
from sinks.sse import event_frame


async def main(question: str) -> None:
    async with OfflineModelServer(token_delay_ms=5) as model:
        provider = OpenAIProvider(base_url=model.base_url, api_key="offline")
        ctx = TurnContext(
            request_id=new_id("req"), conversation_id=new_id("conv"),
            messages=[{"role": "user", "content": question}],
            trace=False, model="offline", max_tokens=12, kind="example",
        )
        router = RouterHarness()
        alice = ResponseHarness(provider, agent="alice", system="You are Alice.", depth=1)
        bob = ResponseHarness(provider, agent="bob", system="You are Bob.", depth=1)

        turn = sequence(
            from_async_iterable(lambda: router(ctx)),
            merge_panel(
                from_async_iterable(lambda: alice(ctx)),
                from_async_iterable(lambda: bob(ctx)),
            ),
        ).pipe(
            turn_envelope(agent="panel", conversation_id=ctx.conversation_id),
            number_events(ctx.request_id),
            visible(trace=False),
        )

        texts: dict[int, list[str]] = {}
        async with contextlib.aclosing(to_async_iterator(turn, max_buffer=1024)) as events:
            async for event in events:
                sys.stdout.write(event_frame(event).decode())
                if isinstance(event, Text):
                    texts.setdefault(event.stream_id, []).append(event.delta)
        for stream_id, parts in sorted(texts.items()):
            print(f"# stream {stream_id}: {''.join(parts)}")
        await provider.aclose()


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "What is a cold observable?"))

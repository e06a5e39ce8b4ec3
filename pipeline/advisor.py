"""The advisor (issue 14, seed 002): after each response step, a model judges the answer.

With ``ADVISOR_MODEL`` set, the response harness asks the advisor after each answer it
finishes. The advisor's own call is a stream of its own (``agent: "advisor"``, depth + 1,
``parent_stream_id`` = the response stream) with its ``llm_call`` and ``token_usage``
(naming the advisor's model); its verdict is an ``advisor`` event on the response stream:

* ``gate_continue``: the answer stands;
* ``redirect`` with a ``note``: the response model is called again with the answer and
  the note (``Advisor note: …``) appended, at most ``ADVISOR_MAX_REDIRECTS`` times;
* ``end_early``: the response ends here.

The advisor answers one JSON object ``{"kind": …, "note": …}``; anything else, or a failed
call, reads as ``gate_continue`` with an ``error`` event saying so (never a dead turn).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from core.errors import ProviderError
from core.events import Advisor, ErrorEvent, Event, LlmCall, StreamEnd, StreamStart, TokenUsage
from core.turn import TurnContext
from pipeline.harnesses import ModelReply, Verdict
from pipeline.offline_model import ADVISOR_PROMPT
from pipeline.providers import ChatProvider

KINDS = ("gate_continue", "redirect", "end_early")
_SYSTEM = (
    f"{ADVISOR_PROMPT} Judge the assistant's last answer to the conversation. Answer with one "
    'JSON object: {"kind": "gate_continue" | "redirect" | "end_early", "note": "<for redirect: '
    'what to change>"}.'
)


class AdvisorStep:
    """Asks the advisor model about one answer (see the module doc)."""

    def __init__(self, provider: ChatProvider, *, model: str, max_redirects: int = 1) -> None:
        self.provider = provider
        self.model = model
        self.max_redirects = max_redirects

    async def review(
        self, ctx: TurnContext, *, messages: Sequence[dict[str, Any]], answer: str,
        stream_id: int, depth: int, verdict: Verdict,
    ) -> AsyncIterator[Event]:
        """The advisor's stream and its ``advisor`` event; the verdict lands in ``verdict``."""
        own = ctx.next_stream_id()
        prompt: list[dict[str, Any]] = [{"role": "system", "content": _SYSTEM}]
        prompt += [{"role": m["role"], "content": m.get("content") or ""}
                   for m in messages if m.get("role") in ("user", "assistant")]
        prompt.append({"role": "assistant", "content": answer})
        yield StreamStart(stream_id=own, agent="advisor", depth=depth + 1, parent_stream_id=stream_id)
        yield LlmCall(stream_id=own, model=self.model, messages=prompt)
        reply = ModelReply()
        status = "ok"
        try:
            async for event in reply.events(self.provider.stream_chat(
                    model=self.model, messages=prompt, max_tokens=200), stream_id=own):
                if isinstance(event, TokenUsage):
                    yield event
            parsed = _parse("".join(reply.text))
            verdict.kind, verdict.note = parsed.kind, parsed.note
        except (ProviderError, ValueError) as exc:
            status = "error"
            verdict.kind, verdict.note = "gate_continue", None
            yield ErrorEvent(stream_id=own, error=f"advisor {self.model}: {exc}; the answer stands",
                             retryable=getattr(exc, "retryable", False))
        yield StreamEnd(stream_id=own, status=status)  # type: ignore[arg-type]
        yield Advisor(stream_id=stream_id, kind=verdict.kind, note=verdict.note)


def _parse(text: str) -> Verdict:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"the advisor answered no JSON object: {text[:120]!r}")
    body = json.loads(text[start:end + 1])
    kind = body.get("kind") if isinstance(body, dict) else None
    if kind not in KINDS:
        raise ValueError(f"the advisor answered an unknown kind {kind!r}")
    note = body.get("note")
    return Verdict(kind=kind, note=str(note) if note else None)

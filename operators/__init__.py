"""Named Rx operators for agent event streams, one per module.

Each is a factory returning ``Callable[[Observable[A]], Observable[B]]`` for
``source.pipe(...)``, except the creation functions :func:`sequence`,
:func:`merge_panel`, :func:`merge_fair` and :func:`from_async_iterable`, and
:class:`ReplayLog`, the subject that shares a turn.
"""

from operators._agent_view import agent_filter, agent_view
from operators._chat_chunks import ChatChunk, to_chat_chunks
from operators._deadline import turn_deadline
from operators._durable_done import durable_done
from operators._fair_merge import merge_fair
from operators._from_async_iterable import from_async_iterable
from operators._numbering import number_events
from operators._panel import alongside, merge_panel
from operators._price_usage import price_usage
from operators._replay_log import ReplayLog
from operators._response_events import (
    TERMINAL_TYPES,
    ResponseEvent,
    ResponseFold,
    fold_response,
    to_response_events,
)
from operators._resume import resume_after
from operators._seed_frames import SeedFrame, to_seed_frames
from operators._sequence import sequence, then
from operators._turn_envelope import turn_envelope
from operators._turn_updates import TurnUpdate, turn_updates
from operators._visibility import visible

__all__ = [
    "TERMINAL_TYPES",
    "ChatChunk",
    "ReplayLog",
    "ResponseEvent",
    "ResponseFold",
    "SeedFrame",
    "TurnUpdate",
    "agent_filter",
    "agent_view",
    "alongside",
    "durable_done",
    "fold_response",
    "from_async_iterable",
    "merge_fair",
    "merge_panel",
    "number_events",
    "price_usage",
    "resume_after",
    "sequence",
    "then",
    "to_chat_chunks",
    "to_response_events",
    "to_seed_frames",
    "turn_deadline",
    "turn_envelope",
    "turn_updates",
    "visible",
]

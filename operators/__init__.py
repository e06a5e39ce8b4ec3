"""Named Rx operators for agent event streams, one per module.

Each is a factory returning ``Callable[[Observable[A]], Observable[B]]`` for
``source.pipe(...)``, except the creation functions :func:`sequence`,
:func:`merge_panel`, :func:`merge_fair` and :func:`from_async_iterable`, and
:class:`ReplayLog`, the subject that shares a turn.
"""

from operators._chat_chunks import ChatChunk, to_chat_chunks
from operators._deadline import turn_deadline
from operators._durable_done import durable_done
from operators._fair_merge import merge_fair
from operators._from_async_iterable import from_async_iterable
from operators._numbering import number_events
from operators._panel import alongside, merge_panel
from operators._replay_log import ReplayLog
from operators._resume import resume_after
from operators._sequence import sequence, then
from operators._turn_envelope import turn_envelope
from operators._turn_updates import TurnUpdate, turn_updates
from operators._visibility import visible

__all__ = [
    "ChatChunk",
    "ReplayLog",
    "TurnUpdate",
    "alongside",
    "durable_done",
    "from_async_iterable",
    "merge_fair",
    "merge_panel",
    "number_events",
    "resume_after",
    "sequence",
    "then",
    "to_chat_chunks",
    "turn_deadline",
    "turn_envelope",
    "turn_updates",
    "visible",
]

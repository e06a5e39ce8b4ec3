"""The recent conversations' messages in memory, so memory reads no disk on a turn's path.

Loading a conversation's history from DuckDB needs a flush barrier first (the previous
turn's last rows may still be queued) and a query: about 15 ms on a busy server, most of
it the writer thread waiting for the GIL, all of it before the first token (issue 12). The
store is the only writer of its file, so what it has been asked to write, on top of what
it read once, is exactly what a query would find once flushed: :class:`ConversationCache`
keeps that for the conversations used lately and answers :meth:`history` from it.

A conversation enters the cache on its first load: :meth:`begin` marks it (from then on
every message written for it is kept), then the rows read from the store (after a flush)
are merged under the ones written meanwhile, which are newer (:meth:`fill`). Bounded by
bytes of content (``HISTORY_CACHE_MAX_BYTES``); the least recently used conversation goes
first, and a conversation larger than the whole bound is simply not kept.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

# Rough per-row overhead on top of the content, so many short messages still count.
_ROW_BYTES = 200


@dataclasses.dataclass(slots=True)
class _Conversation:
    # message_id -> (sort key: created_at in µs as the store has it, the MessageRow)
    rows: dict[str, tuple[int, Any]] = dataclasses.field(default_factory=dict)
    ready: bool = False  # filled from the store: the rows are all of the conversation's
    size: int = 0


def _size(row: Any) -> int:
    return _ROW_BYTES + len(row.content)


def _micros(epoch_s: float) -> int:
    return int(epoch_s * 1_000_000)  # as the store writes it: ties sort as in SQL


class ConversationCache:
    """Messages of recent conversations, kept as the store writes them (thread-safe).

    Args:
        max_bytes: The bound on the content kept (0 keeps nothing).
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._conversations: collections.OrderedDict[str, _Conversation] = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def put(self, row: Any) -> None:
        """A message row the store was asked to write (kept if its conversation is)."""
        if not self.max_bytes:
            return
        with self._lock:
            conversation = self._conversations.get(row.conversation_id)
            if conversation is None:
                return
            old = conversation.rows.get(row.message_id)
            conversation.rows[row.message_id] = (_micros(row.created_at), row)
            grown = _size(row) - (_size(old[1]) if old is not None else 0)
            conversation.size += grown
            self._bytes += grown
            self._conversations.move_to_end(row.conversation_id)
            self._trim()

    def begin(self, conversation_id: str) -> None:
        """Start keeping a conversation's writes, before the store is read for it."""
        if not self.max_bytes:
            return
        with self._lock:
            if conversation_id not in self._conversations:
                self._conversations[conversation_id] = _Conversation()

    def fill(self, conversation_id: str, rows: list[tuple[int, Any]]) -> None:
        """The conversation's rows as read from the store after :meth:`begin` and a flush
        (each with its ``created_at`` in µs); rows written since (kept already) are newer
        and win."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:  # evicted meanwhile, or the cache is off
                return
            for key, row in rows:
                if row.message_id not in conversation.rows:
                    conversation.rows[row.message_id] = (key, row)
                    conversation.size += _size(row)
                    self._bytes += _size(row)
            conversation.ready = True
            self._conversations.move_to_end(conversation_id)
            self._trim()

    def forget(self, conversation_id: str | None) -> None:
        """Drop a conversation (e.g. one of its rows could not be written)."""
        with self._lock:
            conversation = self._conversations.pop(conversation_id or "", None)
            if conversation is not None:
                self._bytes -= conversation.size

    def history(self, conversation_id: str, *, limit: int,
                exclude_request_id: str | None = None) -> list[dict[str, str]] | None:
        """What :meth:`EventStore.load_history` would read, or None when not kept."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None or not conversation.ready:
                self.misses += 1
                return None
            self._conversations.move_to_end(conversation_id)
            self.hits += 1
            rows = [(key, row.ordinal, row) for key, row in conversation.rows.values()
                    if row.request_id != exclude_request_id
                    and (row.role != "assistant"
                         or (row.status in ("complete", "cancelled") and row.content != ""))]
        rows.sort(key=lambda item: (item[0], item[1]))
        kept = rows[max(0, len(rows) - limit):] if limit > 0 else []
        return [{"role": row.role, "content": row.content} for _, _, row in kept]

    def _trim(self) -> None:
        while self._bytes > self.max_bytes and self._conversations:
            _, conversation = self._conversations.popitem(last=False)
            self._bytes -= conversation.size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"conversations": len(self._conversations), "bytes": self._bytes,
                    "hits": self.hits, "misses": self.misses}

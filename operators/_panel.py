"""Merging panel streams that run at once (``merge``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import reactivex
from reactivex import Observable

_T = TypeVar("_T")


def merge_panel(*sources: Observable[_T]) -> Observable[_T]:
    """Run sources concurrently and interleave their events in arrival order.

    ::

        alice: -a---a|
        bob:   --b-b--|
        merge: -ab-ba-|

    Completes when every source has completed; an error from any source errors the merge
    (wrap a panelist that may fail so its failure becomes events, not an error). There is
    no order across sources beyond arrival order.

    Example:
        >>> merge_panel(alice_stream, bob_stream, carol_stream)  # doctest: +SKIP
    """
    return reactivex.merge(*sources)


def alongside(*others: Observable[_T]) -> Callable[[Observable[_T]], Observable[_T]]:
    """Pipeable form of :func:`merge_panel`: ``alice.pipe(alongside(bob, carol))``."""

    def _alongside(source: Observable[_T]) -> Observable[_T]:
        return reactivex.merge(source, *others)

    return _alongside

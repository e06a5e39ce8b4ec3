"""Sequencing harnesses one after another (``concat``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import reactivex
from reactivex import Observable

_T = TypeVar("_T")


def sequence(*sources: Observable[_T]) -> Observable[_T]:
    """Run sources one after another: the delegate sequencer of the orchestrator.

    ::

        router:   -r|
        memory:      -m|          (subscribed only when router completes)
        response:       -a-b|
        sequence: -r--m--a-b|

    Each source is subscribed only when the previous one completes, so a later harness can
    rely on what an earlier one left in the turn context (memory loads history before the
    response harness builds its prompt). An error stops the sequence.

    Example:
        >>> sequence(router, memory, response)  # doctest: +SKIP
    """
    return reactivex.concat(*sources)


def then(*sources: Observable[_T]) -> Callable[[Observable[_T]], Observable[_T]]:
    """Pipeable form of :func:`sequence`: ``router.pipe(then(memory, response))``.

    ::

        source: -a|
        then(x):  -b|  →  -a-b|
    """

    def _then(source: Observable[_T]) -> Observable[_T]:
        return reactivex.concat(source, *sources)

    return _then

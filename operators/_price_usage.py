"""Costs on ``token_usage`` events (``map``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from reactivex import Observable
from reactivex import operators as ops

from core.events import EventBase, TokenUsage

_E = TypeVar("_E", bound=EventBase)

Cost = Callable[[str, int, int], float | None]
"""``cost(model, prompt_tokens, completion_tokens)`` in USD, None when unpriced."""


def price_usage(cost: Cost) -> Callable[[Observable[_E]], Observable[_E]]:
    """Stamp ``cost_usd`` on every ``token_usage`` event by its own model; pass the rest.

    ::

        source:            -s-t-u-e-|     (u = token_usage, cost_usd None)
        price_usage(cost): -s-t-U-e-|     (U = the same usage, cost_usd = cost(model, p, c))

    Each usage is priced by the model it names, so a sub-agent's, a panelist's, the
    router's and the advisor's calls cost what their own models cost. An exception of
    ``cost`` is passed on as ``on_error``.

    Example:
        >>> steps.pipe(price_usage(prices.cost))  # doctest: +SKIP
    """

    def stamp(event: _E) -> _E:
        if isinstance(event, TokenUsage) and event.cost_usd is None:
            priced = cost(event.model, event.prompt_tokens, event.completion_tokens)
            if priced is not None:
                return event.model_copy(update={"cost_usd": priced})
        return event

    def _price(source: Observable[_E]) -> Observable[_E]:
        return source.pipe(ops.map(stamp))

    return _price

"""Prices per ``provider/model`` and the cost of a call (issue 14).

A bundled table (:data:`BUNDLED`, ``pipeline/prices.json``: USD per million input and output
tokens of well-known models) is overlaid with ``PRICES_FILE`` and then ``PRICES``
(``{"<provider>/<model>": {"input": …, "output": …, "cached_input"?: …}}``). A model id is
looked up as the registry names it (``provider/model``; a bare id means the default
provider); an unpriced model costs ``None``, never 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from core.agent_settings import PriceConfig

BUNDLED = Path(__file__).with_name("prices.json")


def load_prices(*, file: Path | None = None, overrides: Mapping[str, PriceConfig] | None = None
                ) -> dict[str, PriceConfig]:
    """The bundled table, then ``file`` (if given), then ``overrides``."""
    table: dict[str, PriceConfig] = {}
    for path in (BUNDLED, file):
        if path is not None:
            raw = json.loads(Path(path).read_text())
            table.update({k: PriceConfig.model_validate(v) for k, v in raw.items()
                          if not k.startswith("_")})
    table.update(overrides or {})
    return table


class PriceTable:
    """``cost(model, prompt_tokens, completion_tokens)`` in USD, or None when unpriced.

    Args:
        prices: ``provider/model`` → price.
        qualify: Turns a model id as a turn names it into ``provider/model``.
    """

    def __init__(self, prices: Mapping[str, PriceConfig], *,
                 qualify: Callable[[str], str] = lambda model: model) -> None:
        self.prices = dict(prices)
        self.qualify = qualify

    def price_of(self, model: str) -> PriceConfig | None:
        return self.prices.get(self.qualify(model)) or self.prices.get(model)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        price = self.price_of(model)
        if price is None:
            return None
        return round((prompt_tokens * price.input + completion_tokens * price.output) / 1e6, 10)

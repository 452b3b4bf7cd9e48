"""Token and cost estimates of a batch before it runs (EstimateBatch, and budget reservations).

Each line's tokens come from `service.domain.tokens` (how they are counted, and how exact that
is, is said there); this module prices them at the line's batch price and sums them per part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.domain.model import Price
from service.domain.tokens import DEFAULT_OUTPUT_BOUND, METHOD, BodyTokens, body_tokens, whole_number
from service.providers.routing import Route, Router

__all__ = ["METHOD", "Estimator", "PartTally"]


@dataclass
class PartTally:
    """The sums over one part's lines."""

    lines: int = 0
    input_min: int = 0
    input_estimate: int = 0
    input_max: int = 0
    output_max: int = 0
    unbounded: int = 0
    cost_min: float = 0.0
    cost_max: float = 0.0
    prices: set[Price] = field(default_factory=set)


@dataclass
class Estimator:
    """Tallies each checked line into its part (LineValidator calls `add`)."""

    router: Router
    parts: dict[int, PartTally] = field(default_factory=dict)
    # route -> (the provider's default output bound, the price): looked up once per route, not per line
    _terms: dict[Route, tuple[int, Price]] = field(default_factory=dict, repr=False)

    def add(self, part_no: int, route: Route, url: str, body: dict[str, Any]) -> None:
        self.add_tokens(part_no, route, body_tokens(url, body))

    def add_tokens(self, part_no: int, route: Route, counted: BodyTokens) -> None:
        """`add`, for a line whose body was counted before (at its upload)."""
        terms = self._terms.get(route)
        if terms is None:
            entry = self.router.entry(route.provider)
            default = whole_number(entry.provider.options.get("default_max_tokens")) or DEFAULT_OUTPUT_BOUND
            terms = self._terms[route] = (default, entry.price(route.model))
        default, price = terms
        output_max = counted.output_max(default)
        tally = self.parts.setdefault(part_no, PartTally())
        tally.lines += 1
        tally.input_min += counted.input_min
        tally.input_estimate += counted.input_estimate
        tally.input_max += counted.input_max
        tally.output_max += output_max
        tally.unbounded += 0 if counted.own_output is not None else 1
        tally.cost_min += price.total_cost(counted.input_min)
        tally.cost_max += price.total_cost(counted.input_max, output_max)
        tally.prices.add(price)

    @property
    def cost_max(self) -> float:
        return sum(t.cost_max for t in self.parts.values())

"""Which provider serves a model, under which name, at which price.

A line's `model` picks its provider by, in order: a `provider/model` prefix naming a configured
provider, an alias, or a provider's declared model list. While no real provider is configured,
every model goes to the built-in `sim` provider (and `sim/...` always does).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from adapters.base import Capabilities, Provider
from service.domain.model import Price

SIM = "sim"
DEFAULT_SIM_PRICE = Price(input_per_mtok=0.15, output_per_mtok=0.60, batch_discount=0.5)


class UnknownModel(LookupError):
    pass


@dataclass
class ProviderEntry:
    """A configured provider: its adapter, the models it declares, aliases, prices."""

    provider: Provider
    models: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> provider model
    prices: dict[str, Price] = field(default_factory=dict)  # provider model -> price
    default_price: Price = field(default_factory=Price)
    # Lower per-batch limits than the adapter declares (the providers file's `batch_limits`), e.g.
    # for an account tier that takes less.
    max_lines: int | None = None
    max_bytes: int | None = None
    # Shared limits on what Sluice sends an executor provider (the providers file's `capacity`).
    capacity: CapacityLimits | None = None

    def price(self, model: str) -> Price:
        return self.prices.get(model, self.default_price)

    @property
    def capabilities(self) -> Capabilities:
        """What one provider batch can hold: the adapter's declaration, with the configured limits."""
        caps = self.provider.capabilities
        return replace(caps, max_lines=_lowest(caps.max_lines, self.max_lines),
                       max_bytes=_lowest(caps.max_bytes, self.max_bytes))


@dataclass(frozen=True)
class CapacityLimits:
    """What all replicas together may send one executor provider: requests at once, and requests
    and tokens per minute (None: no limit)."""

    concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def _lowest(a: int | None, b: int | None) -> int | None:
    return min(x for x in (a, b) if x is not None) if a is not None or b is not None else None


@dataclass(frozen=True)
class Route:
    provider: str  # the configured provider's name
    model: str  # the provider's own model name

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class Router:
    def __init__(self, entries: dict[str, ProviderEntry]) -> None:
        self.entries = entries

    @property
    def real_providers(self) -> list[str]:
        return [name for name in self.entries if name != SIM]

    def resolve(self, model: str) -> Route:
        prefix, sep, rest = model.partition("/")
        if sep and prefix in self.entries and rest:
            entry = self.entries[prefix]
            return Route(prefix, entry.aliases.get(rest, rest))
        for name, entry in self.entries.items():
            if model in entry.aliases:
                return Route(name, entry.aliases[model])
        for name, entry in self.entries.items():
            if model in entry.models:
                return Route(name, model)
        if not self.real_providers and SIM in self.entries:
            return Route(SIM, model)
        raise UnknownModel(model)

    def entry(self, provider: str) -> ProviderEntry:
        try:
            return self.entries[provider]
        except KeyError:
            raise UnknownModel(provider) from None

    def price(self, route: Route) -> Price:
        return self.entry(route.provider).price(route.model)

    async def aclose(self) -> None:
        for entry in self.entries.values():
            await entry.provider.aclose()

"""Which provider serves a model, under which name, at which price.

A line's `model` picks its provider by, in order: a `provider/model` prefix naming a configured
provider, an alias, or a provider's declared model list. While no real provider is configured,
every model goes to the built-in `sim` provider (and `sim/...` always does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.base import Provider
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

    def price(self, model: str) -> Price:
        return self.prices.get(model, self.default_price)


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

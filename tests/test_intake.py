"""Intake checks every line against what its provider declares it can take (adapters.base.Capabilities),
so a batch the provider cannot run is refused at create, naming the line, never failed at submit."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.base import Capabilities
from adapters.sim import SimProvider
from service.intake.validation import LineProblem, LineValidator
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router


class LimitedSim(SimProvider):
    capabilities = Capabilities(endpoints=frozenset({"/v1/chat/completions"}), one_model_per_job=True,
                                max_lines=3, max_bytes=1000)


def validator() -> LineValidator:
    router = Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                     "limited": ProviderEntry(provider=LimitedSim("limited"), models={"m1", "m2"})})
    return LineValidator(endpoint="/v1/chat/completions", router=router)


def line(custom_id: str, model: str = "m1", url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": model, "messages": []}}


def test_routes_are_resolved_once_and_kept_with_the_line() -> None:
    v = validator()
    req = v.check(line("a", "limited/m1"))
    assert req.provider_model == "m1" and v.provider == "limited" and v.provider_model == "m1"


def test_an_endpoint_the_provider_cannot_batch_is_refused() -> None:
    v = LineValidator(endpoint="/v1/embeddings", router=validator().router)
    with pytest.raises(LineProblem) as problem:
        v.check(line("a", url="/v1/embeddings"))
    assert (problem.value.code, problem.value.field) == ("unsupported_endpoint", "url")


def test_a_second_model_for_a_one_model_provider_is_refused() -> None:
    v = validator()
    v.check(line("a", "m1"))
    with pytest.raises(LineProblem) as problem:
        v.check(line("b", "m2"))
    assert (problem.value.code, problem.value.field) == ("mixed_models", "body.model")


def test_the_providers_line_and_byte_limits_hold() -> None:
    v = validator()
    for i in range(3):
        v.check(line(f"r{i}"), size=10)
    with pytest.raises(LineProblem) as problem:
        v.check(line("r3"), size=10)
    assert problem.value.code == "too_many_requests"

    v = validator()
    v.check(line("a"), size=600)
    with pytest.raises(LineProblem) as problem:
        v.check(line("b"), size=600)
    assert problem.value.code == "batch_too_large"


def test_the_sim_provider_takes_any_endpoint_and_mixed_models() -> None:
    v = LineValidator(endpoint="/v1/embeddings", router=validator().router)
    v.check(line("a", "sim/x", url="/v1/embeddings"))
    v.check(line("b", "sim/y", url="/v1/embeddings"))
    assert v.provider == SIM and v.provider_model is None and v.model is None

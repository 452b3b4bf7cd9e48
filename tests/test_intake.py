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


def test_a_providers_line_and_byte_limits_split_the_batch_into_parts() -> None:
    """More lines (or bytes) than the provider takes in one batch are not refused: they make
    several parts, each one provider batch within the limits."""
    v = validator()
    assert [v.check(line(f"r{i}"), size=10).part_no for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [(p.part_no, p.provider, p.provider_model, p.total) for p in v.parts] == [
        (0, "limited", "m1", 3), (1, "limited", "m1", 3), (2, "limited", "m1", 1)]
    assert v.provider == "limited" and v.lines == 7

    v = validator()
    assert [v.check(line(f"b{i}"), size=400).part_no for i in range(5)] == [0, 0, 1, 1, 2]
    assert [p.bytes for p in v.parts] == [800, 800, 400]
    # One request larger than a whole provider batch fits in no part.
    with pytest.raises(LineProblem) as problem:
        v.check(line("huge"), size=1001)
    assert problem.value.code == "batch_too_large"
    assert "b5" not in v.seen and v.lines == 5


def test_lines_for_several_providers_make_one_part_per_provider() -> None:
    v = validator()
    placed = [v.check(line(cid, model)) for cid, model in
              (("a", "limited/m1"), ("b", "sim/x"), ("c", "limited/m1"), ("d", "sim/y"))]
    assert [(r.provider, r.part_no) for r in placed] == [("limited", 0), (SIM, 1), ("limited", 0), (SIM, 1)]
    assert [(p.part_no, p.provider, p.provider_model, p.total) for p in v.parts] == [
        (0, "limited", "m1", 2), (1, SIM, None, 2)]
    assert v.provider == "mixed" and v.provider_model is None and v.model is None
    assert [v.part_of(n) for n in range(4)] == [0, 1, 0, 1]


def test_the_sim_provider_takes_any_endpoint_and_mixed_models() -> None:
    v = LineValidator(endpoint="/v1/embeddings", router=validator().router)
    v.check(line("a", "sim/x", url="/v1/embeddings"))
    v.check(line("b", "sim/y", url="/v1/embeddings"))
    assert v.provider == SIM and v.provider_model is None and v.model is None

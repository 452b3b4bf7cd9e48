"""Fast tests of service/intake/ (validation, JSONL lines, the upload's line index, batches from an
uploaded file, estimates), written against mutmut's survivors: no server, a real `Store` on SQLite
(and PostgreSQL in `make test`) where files are involved. They pin what a caller sees: exact error
messages, codes and params, limits at N and N+1, the parts a batch splits into, what the line
index stores and what a batch created from a file is made of."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from adapters.base import Capabilities
from adapters.sim import SimProvider
from service.domain.errors import InvalidRequest, NotFound, PayloadTooLarge
from service.domain.model import (
    DEFAULT_LIMITS,
    MAX_JSON_DEPTH,
    MAX_LINE_BYTES,
    MAX_LINE_VALUES,
    BatchError,
    BatchStatus,
    FileStatus,
    Limits,
    Price,
    now,
)
from service.domain.tokens import DEFAULT_OUTPUT_BOUND, BodyTokens, body_tokens
from service.intake import line_index
from service.intake.estimate import Estimator, PartTally
from service.intake.file_inputs import BatchInputs
from service.intake.jsonl import (
    LineChecks,
    check_lines,
    check_upload,
    count_values_at_most,
    numbered_lines,
    parse_line,
)
from service.intake.line_index import LineIndexWriter, index_blocks, tokens_of, whole_index
from service.intake.validation import (
    LineProblem,
    LineValidator,
    check_expires_after,
    check_metadata,
    is_object_id,
    is_text,
    json_shape_problem,
)
from service.providers.routing import SIM, ProviderEntry, Route, Router
from service.storage.repository import NewPart, NewRequest, Store
from service.storage.tables import BatchRow, FileRow

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
ENDPOINTS = "/v1/chat/completions, /v1/embeddings, /v1/completions, /v1/responses"


# --------------------------------------------------------------------------- routers


class TwoLines(SimProvider):
    """A provider batch of at most 2 lines and 3 MB, chat and completions only, one model per batch."""

    capabilities = Capabilities(endpoints=frozenset({CHAT, "/v1/completions"}), one_model_per_job=True,
                                max_lines=2, max_bytes=3 * 2**20)


class Small(SimProvider):
    """A provider batch of at most 1,000 bytes, any number of lines and models."""

    capabilities = Capabilities(max_bytes=1000)


PRICE_A = Price(input_per_mtok=1.0, output_per_mtok=2.0, batch_discount=0.5)
PRICE_B = Price(input_per_mtok=3.0, output_per_mtok=5.0, batch_discount=0.0)


def router() -> Router:
    return Router({
        SIM: ProviderEntry(provider=SimProvider(SIM)),
        "two": ProviderEntry(provider=TwoLines("two", options={"default_max_tokens": 77}), models={"m1", "m2"},
                             aliases={"alias": "m1"}, prices={"m1": PRICE_A}, default_price=PRICE_B),
        "small": ProviderEntry(provider=Small("small"), models={"s1", "s2"}),
    })


def line(custom_id: str = "a", model: str = "two/m1", url: str = CHAT, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": "hi there"}], **body}}


def problem_of(validator: LineValidator, raw: Any, size: int = 0) -> tuple[str, str | None, str]:
    with pytest.raises(LineProblem) as info:
        validator.check(raw, size)
    return info.value.code, info.value.field, info.value.message


# --------------------------------------------------------------------------- text, ids, JSON shape


def test_is_text_refuses_nul_and_lone_surrogates_only() -> None:
    assert is_text("abc") and is_text("") and is_text("héllo ✓")
    assert not is_text("a\x00b") and not is_text("\x00") and not is_text("é\x00")
    assert not is_text("\ud800") and not is_text("é\udfff")


def test_is_object_id() -> None:
    assert is_object_id("batch_0aZ-9") and is_object_id("a" * 64) and is_object_id("file-x")
    assert not is_object_id("") and not is_object_id("a" * 65) and not is_object_id("a b")
    assert not is_object_id("ü") and not is_object_id("a\x00")


def nested(depth: int, kind: str) -> Any:
    value: Any = {} if kind == "object" else []
    for _ in range(depth - 1):
        value = {"k": value} if kind == "object" else [value]
    return value


@pytest.mark.parametrize("kind", ["object", "array"])
def test_json_shape_depth_is_exact_at_the_default_limit(kind: str) -> None:
    assert json_shape_problem(nested(MAX_JSON_DEPTH, kind)) is None
    assert json_shape_problem(nested(MAX_JSON_DEPTH + 1, kind)) == f"nests deeper than {MAX_JSON_DEPTH} levels"
    assert json_shape_problem(nested(3, kind), max_depth=3) is None
    assert json_shape_problem(nested(4, kind), max_depth=3) == "nests deeper than 3 levels"
    # a deep scalar does not count as a level: only containers do
    assert json_shape_problem({"a": {"b": 1}}, max_depth=2) is None
    assert json_shape_problem({"a": [["x"]]}, max_depth=2) == "nests deeper than 2 levels"


def test_json_shape_value_count_is_exact() -> None:
    assert json_shape_problem([1, 2, 3], max_values=4) is None
    assert json_shape_problem([1, 2, 3, 4], max_values=4) == "has more than 4 JSON values"
    assert json_shape_problem({"a": 1, "b": [2]}, max_values=4) is None
    assert json_shape_problem({"a": 1, "b": [2, 3]}, max_values=4) == "has more than 4 JSON values"
    assert json_shape_problem(list(range(1999)), max_values=2000) is None
    assert json_shape_problem(list(range(2000)), max_values=2000) == "has more than 2,000 JSON values"
    # the default: MAX_LINE_VALUES (the list itself is one value)
    assert json_shape_problem([0] * (MAX_LINE_VALUES - 1)) is None
    assert json_shape_problem([0] * MAX_LINE_VALUES) == f"has more than {MAX_LINE_VALUES:,} JSON values"


def test_json_shape_strings_and_keys_must_be_text() -> None:
    assert json_shape_problem({"é": ["ü", 1, 2.5, None, True, {"k": "ø"}]}) is None
    key = "has a key that is not valid Unicode text (a lone surrogate)"
    string = "has a string that is not valid Unicode text (a lone surrogate)"
    assert json_shape_problem({"a": {"\ud800": 1}}) == key
    assert json_shape_problem({"\udfff": 1}) == key
    assert json_shape_problem(["ok", ["\ud800"]]) == string
    assert json_shape_problem({"a": "x\udfff"}) == string
    assert json_shape_problem("\ud800") == string


# --------------------------------------------------------------------------- batch-level fields


def test_expires_after_bounds_and_messages() -> None:
    assert check_expires_after("created_at", 3600, "expires_after") == 3600
    assert check_expires_after("created_at", " 2592000 ", "expires_after") == 30 * 24 * 3600
    assert check_expires_after("created_at", "7200", "output_expires_after") == 7200
    for anchor, shown in ((None, "''"), ("", "''"), ("updated_at", "'updated_at'")):
        with pytest.raises(InvalidRequest) as info:
            check_expires_after(anchor, 3600, "expires_after")
        assert (info.value.param, info.value.code, info.value.message) == (
            "expires_after.anchor", "invalid_expires_after",
            f"expires_after[anchor] must be 'created_at', got {shown}.")
    for seconds, shown in ((3599, "'3599'"), (2592001, "'2592001'"), ("soon", "'soon'"), (None, "'None'"),
                           ("", "''"), ("1.5e4", "'1.5e4'")):
        with pytest.raises(InvalidRequest) as info:
            check_expires_after("created_at", seconds, "output_expires_after")
        assert (info.value.param, info.value.code, info.value.message) == (
            "output_expires_after.seconds", "invalid_output_expires_after",
            "output_expires_after[seconds] must be an integer from 3600 (1 hour) to 2592000 (30 days), "
            f"got {shown}.")


def test_metadata_keys_and_values_must_be_text() -> None:
    assert check_metadata({"é": "ü"}) == {"é": "ü"}
    with pytest.raises(InvalidRequest) as info:
        check_metadata({"a\x00": "v"})
    assert (info.value.param, info.value.code, info.value.message) == (
        "metadata", "invalid_metadata", "metadata key 'a\\x00' must be text of at most 64 characters.")
    with pytest.raises(InvalidRequest) as info:
        check_metadata({"ok": "v", "k": "\ud800"})
    assert (info.value.param, info.value.code, info.value.message) == (
        "metadata.k", "invalid_metadata", "metadata value of 'k' must be a string of at most 512 characters.")


# --------------------------------------------------------------------------- one line


def test_line_problems_the_earlier_tests_do_not_name() -> None:
    v = LineValidator(endpoint=CHAT, router=router())
    assert problem_of(v, {"custom_id": "a\x00"}) == (
        "invalid_custom_id", "custom_id", "custom_id must be valid Unicode text without NUL characters")
    assert problem_of(v, {"custom_id": "\ud800"})[0] == "invalid_custom_id"
    assert problem_of(v, {"custom_id": "a", "method": "POSTPOSTPOSTPOSTPOST"}) == (
        "invalid_method", "method", "method must be 'POST', got 'POSTPOSTPOSTPOST…'")
    assert problem_of(v, {"custom_id": "a", "method": None})[2] == "method must be 'POST', got 'None'"
    assert problem_of(v, {"custom_id": "a", "method": "POST", "url": "/x" * 40})[2] == (
        f"url '{('/x' * 40)[:64]}…' is not a supported endpoint ({ENDPOINTS})")
    assert problem_of(v, {**line(), "body": "text"}) == ("invalid_body", "body", "body must be a JSON object")
    assert problem_of(v, {**line(), "body": {"model": ""}}) == ("missing_model", "body.model",
                                                                 "body.model is required")
    too_long = ("invalid_model", "body.model",
                "body.model must be text of at most 256 characters without NUL characters")
    assert problem_of(v, line(model="m" * 257)) == too_long
    assert problem_of(v, line(model="m\x00")) == too_long
    assert problem_of(v, line(model="\ud800")) == too_long
    assert problem_of(v, line(deep=nested(MAX_JSON_DEPTH - 1, "array"))) == (
        "invalid_json_line", "body", f"the request line nests deeper than {MAX_JSON_DEPTH} levels")
    assert problem_of(v, line(text="\ud800")) == (
        "invalid_json_line", "body", "the request line has a string that is not valid Unicode text (a lone surrogate)")
    assert problem_of(v, line(values=[0] * MAX_LINE_VALUES)) == (
        "line_too_complex", "body", f"the request line has more than {MAX_LINE_VALUES:,} JSON values")
    assert v.seen == set() and v.lines == 0 and v.models == set()  # nothing refused is remembered
    # the longest model, and one level short of the depth limit, are fine
    assert v.check(line("ok", model="sim/" + "m" * 252, deep=nested(MAX_JSON_DEPTH - 2, "array"))).model == \
        "sim/" + "m" * 252


def test_a_routed_line_names_its_provider_model_and_part() -> None:
    v = LineValidator(endpoint=CHAT, router=router())
    a = v.check(line("a", "alias"), size=10)
    assert a == NewRequest(custom_id="a", model="alias", body=line("a", "alias")["body"], provider_model="m1",
                           provider="two", part_no=0)
    b = v.check(line("b", "sim/x"), size=5)
    assert (b.provider, b.provider_model, b.part_no) == (SIM, "x", 1)
    assert v.route_of("alias") == Route("two", "m1") and v.route_of("sim/x") == Route(SIM, "x")
    assert (v.lines, v.size, v.endpoint) == (2, 15, CHAT)
    unrouted = LineValidator(endpoint=None).check(line("a", "anything"), size=99)
    assert (unrouted.provider, unrouted.provider_model, unrouted.part_no) == (None, None, 0)


def test_endpoint_is_set_by_the_first_line_then_held() -> None:
    v = LineValidator(endpoint=None, router=router())
    v.check(line("a", "sim/x", url=EMBED))
    assert v.endpoint == EMBED
    assert problem_of(v, line("b", "sim/x")) == (
        "url_mismatch", "url", f"url '{CHAT}' differs from the batch endpoint '{EMBED}'")


def test_capability_problems_name_the_provider_and_what_it_takes() -> None:
    v = LineValidator(endpoint=EMBED, router=router())
    assert problem_of(v, line("a", "two/m1", url=EMBED)) == (
        "unsupported_endpoint", "url",
        "provider 'two' cannot batch /v1/embeddings (it serves /v1/chat/completions, /v1/completions)")
    v = LineValidator(endpoint=CHAT, router=router())
    v.check(line("a", "m1"))
    assert problem_of(v, line("b", "m2")) == (
        "mixed_models", "body.model",
        "provider 'two' runs one model per batch; this line uses 'm2' and an earlier one 'm1': split the batch "
        "by model")
    v.check(line("c", "alias"))  # the same provider model under another name
    v.check(line("d", "s1"))
    v.check(line("e", "s2"))  # a provider that takes several models per batch
    assert problem_of(v, line("f", "small/s1"), size=1001) == (
        "batch_too_large", None, "this request alone is larger than the 0 MB provider 'small' takes per batch")
    assert v.check(line("g", "small/s1"), size=1000).part_no == 1  # exactly the limit still fits (0 + 1000)
    assert v.check(line("h", "small/s1"), size=1).part_no == 2  # one byte more starts a part
    big = LineValidator(endpoint=CHAT, router=router())
    assert problem_of(big, line("a"), size=3 * 2**20 + 1)[2] == (
        "this request alone is larger than the 3 MB provider 'two' takes per batch")
    assert big.check(line("a"), size=3 * 2**20).part_no == 0


def test_capabilities_are_read_once_per_provider() -> None:
    r = router()
    reads: list[str] = []

    class Counting(ProviderEntry):
        @property
        def capabilities(self) -> Capabilities:
            reads.append(self.provider.name)
            return super().capabilities

    r.entries["two"] = Counting(provider=TwoLines("two"), models={"m1"})
    v = LineValidator(endpoint=CHAT, router=r)
    for i in range(5):
        v.check(line(f"r{i}"))
    assert reads == ["two"]


def test_a_model_is_routed_once_per_batch() -> None:
    resolved: list[str] = []

    class Counting(Router):
        def resolve(self, model: str) -> Route:
            resolved.append(model)
            return super().resolve(model)

    r = router()
    v = LineValidator(endpoint=CHAT, router=Counting(r.entries))
    for i in range(4):
        v.check(line(f"r{i}", "alias" if i % 2 else "sim/x"))
    assert resolved == ["sim/x", "alias"]
    assert v.check(line("z", "alias")).provider_model == "m1" and resolved == ["sim/x", "alias"]


def test_parts_split_at_the_line_and_byte_limits_and_are_numbered_in_order() -> None:
    v = LineValidator(endpoint=CHAT, router=router())
    placed = [v.check(line(cid, model), size=size).part_no for cid, model, size in (
        ("a", "m1", 1), ("b", "s1", 400), ("c", "m1", 2), ("d", "m1", 3), ("e", "s1", 600), ("f", "s2", 1),
        ("g", "m1", 4), ("h", "m1", 5))]
    # two: 2 lines a part; small: 1,000 bytes a part (exactly 1,000 fits)
    assert placed == [0, 1, 0, 2, 1, 3, 2, 4]
    assert [v.part_of(n) for n in range(8)] == placed
    assert v.parts == [NewPart(0, "two", "m1", 2, 3), NewPart(1, "small", "s1", 2, 1000),
                       NewPart(2, "two", "m1", 2, 7), NewPart(3, "small", "s2", 1, 1), NewPart(4, "two", "m1", 1, 5)]
    assert (v.lines, v.size) == (8, 1016)
    assert v.provider == "mixed" and v.model is None and v.provider_model is None


def test_a_part_with_several_models_has_no_provider_model() -> None:
    v = LineValidator(endpoint=CHAT, router=router())
    v.check(line("a", "small/s1"))
    v.check(line("b", "small/s2"))
    assert v.parts == [NewPart(0, "small", None, 2, 0)]
    assert (v.provider, v.model, v.provider_model) == ("small", None, None)


def test_batch_level_provider_and_models() -> None:
    v = LineValidator(endpoint=CHAT, router=router())
    assert (v.provider, v.model, v.provider_model, v.parts) == ("", None, None, [])
    v.check(line("a", "alias"))
    assert (v.provider, v.model, v.provider_model) == ("two", "alias", "m1")
    v.check(line("b", "two/m1"))  # another name, the same provider model
    assert (v.provider, v.model, v.provider_model) == ("two", None, "m1")
    w = LineValidator(endpoint=CHAT, router=router())
    w.check(line("a", "sim/x"))
    w.check(line("b", "small/x"))  # the same provider model name on another provider
    assert (w.provider, w.provider_model) == ("mixed", None)


def test_again_rebuilds_a_checked_line_as_check_made_it() -> None:
    v = LineValidator(endpoint=CHAT, router=router())
    made = [v.check(line(f"r{i}", "alias" if i % 2 else "sim/x")) for i in range(6)]
    again = [v.again(i, f"r{i}", line(f"r{i}", "alias" if i % 2 else "sim/x")["body"]) for i in range(6)]
    assert again == made
    assert [r.part_no for r in made] == [0, 1, 0, 1, 0, 2]


def test_check_indexed_applies_the_batch_checks_to_what_the_upload_recorded() -> None:
    tokens = BodyTokens(2, 3, 9, None, 2)
    v = LineValidator(endpoint=CHAT, router=router(), estimator=Estimator(router()))
    v.check_indexed(CHAT, "alias", 10, tokens)
    v.check_indexed(CHAT, "sim/x", 20, BodyTokens(1, 1, 1, 5, 1))
    v.check_indexed(CHAT, "alias", 30, tokens)
    v.check_indexed(CHAT, "two/m1", 40, tokens)
    assert [v.part_of(n) for n in range(4)] == [0, 1, 0, 2]
    assert v.models == {"alias", "sim/x", "two/m1"} and (v.lines, v.size) == (4, 100)
    assert v.route_of("alias") == Route("two", "m1")
    assert v.seen == set()  # uniqueness was checked at the upload
    assert v.estimator is not None
    assert v.estimator.parts[0] == PartTally(lines=2, input_min=4, input_estimate=6, input_max=18,
                                             output_max=2 * 77 * 2, unbounded=2,
                                             cost_min=2 * PRICE_A.total_cost(2),
                                             cost_max=2 * PRICE_A.total_cost(9, 154), prices={PRICE_A})
    assert v.estimator.parts[1].output_max == 5 and v.estimator.parts[1].unbounded == 0
    with pytest.raises(LineProblem) as info:
        v.check_indexed(EMBED, "sim/x", 1, tokens)
    assert (info.value.code, info.value.message) == (
        "url_mismatch", f"url '{EMBED}' differs from the batch endpoint '{CHAT}'")
    with pytest.raises(LineProblem) as info:
        v.check_indexed(CHAT, "nope", 1, tokens)
    assert (info.value.code, info.value.field) == ("model_not_found", "body.model")
    with pytest.raises(LineProblem) as info:
        v.check_indexed(CHAT, "two/m2", 1, tokens)
    assert info.value.code == "mixed_models"
    assert v.lines == 4 and len(v.estimator.parts) == 3
    plain = LineValidator(endpoint=None)
    plain.check_indexed(EMBED, "m", 5, tokens)
    assert (plain.endpoint, plain.models, plain.lines, list(plain.line_parts)) == (EMBED, {"m"}, 0, [])


# --------------------------------------------------------------------------- estimates


def test_the_estimator_prices_each_line_at_its_route_and_sums_per_part() -> None:
    est = Estimator(router())
    body = {"model": "x", "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 10}
    counted = body_tokens(CHAT, body)
    est.add(0, Route("two", "m1"), CHAT, body)
    est.add(0, Route("two", "m1"), CHAT, {"model": "x", "messages": [], "n": 3})  # unbounded: 77 x 3
    est.add(1, Route("two", "m9"), CHAT, body)  # a model without its own price: the provider's default
    est.add(2, Route(SIM, "x"), CHAT, {"model": "x", "messages": []})  # no default_max_tokens: 4096
    empty = body_tokens(CHAT, {"messages": []})
    a = est.parts[0]
    assert (a.lines, a.input_min, a.input_estimate, a.input_max) == (
        2, counted.input_min + empty.input_min, counted.input_estimate + empty.input_estimate,
        counted.input_max + empty.input_max)
    assert (a.output_max, a.unbounded, a.prices) == (10 + 77 * 3, 1, {PRICE_A})
    assert a.cost_min == pytest.approx(PRICE_A.total_cost(counted.input_min) + PRICE_A.total_cost(empty.input_min))
    assert a.cost_max == pytest.approx(PRICE_A.total_cost(counted.input_max, 10)
                                       + PRICE_A.total_cost(empty.input_max, 231))
    b = est.parts[1]
    assert (b.lines, b.output_max, b.unbounded, b.prices) == (1, 10, 0, {PRICE_B})
    assert b.cost_max == pytest.approx(PRICE_B.total_cost(counted.input_max, 10)) and b.cost_max > 0
    assert b.cost_min == pytest.approx(PRICE_B.total_cost(counted.input_min)) and b.cost_min > 0
    c = est.parts[2]
    assert (c.output_max, c.unbounded) == (DEFAULT_OUTPUT_BOUND, 1)
    assert est.cost_max == pytest.approx(a.cost_max + b.cost_max + c.cost_max)
    assert Estimator(router()).cost_max == 0


def test_the_estimator_looks_a_route_up_once() -> None:
    r = router()
    looked: list[str] = []
    entry = r.entry

    def counting(provider: str) -> ProviderEntry:
        looked.append(provider)
        return entry(provider)

    r.entry = counting  # type: ignore[method-assign]
    est = Estimator(r)
    for _ in range(3):
        est.add_tokens(0, Route("two", "m1"), BodyTokens(1, 1, 1, None, 1))
    est.add_tokens(0, Route("two", "m2"), BodyTokens(1, 1, 1, None, 1))
    assert looked == ["two", "two"] and est.parts[0].output_max == 4 * 77


def test_a_zero_or_invalid_default_max_tokens_falls_back_to_the_default_bound() -> None:
    for value in (0, -5, "lots", None, True):
        r = Router({"p": ProviderEntry(provider=SimProvider("p", options={"default_max_tokens": value}))})
        est = Estimator(r)
        est.add_tokens(0, Route("p", "m"), BodyTokens(1, 1, 1, None, 2))
        assert est.parts[0].output_max == 2 * DEFAULT_OUTPUT_BOUND, value


# --------------------------------------------------------------------------- JSONL


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def numbered(*parts: bytes) -> list[list[tuple[int, int, bytes]]]:
    return [lines async for lines in numbered_lines(_chunks(*parts))]


async def test_numbered_lines_give_numbers_offsets_and_a_chunks_lines_together() -> None:
    data = b'ab\n\n  \ncd\r\nef'
    expected = [(1, 0, b"ab"), (4, 7, b"cd\r"), (5, 11, b"ef")]
    assert await numbered(data) == [expected[:2], expected[2:]]
    for cut in range(len(data) + 1):
        flat = [item for lines in await numbered(data[:cut], data[cut:]) for item in lines]
        assert flat == expected, cut
    assert await numbered(b"a\nb\n", b"", b"c\n", b"\n") == [[(1, 0, b"a"), (2, 2, b"b")], [(3, 4, b"c")]]
    assert await numbered(b"x", b"y", b"\nz\n") == [[(1, 0, b"xy"), (2, 3, b"z")]]
    assert await numbered(b"\n", b" \t\n") == []


async def test_the_line_length_limit_is_exact_whether_or_not_the_line_is_split() -> None:
    limit = b"y" * MAX_LINE_BYTES
    assert await numbered(limit + b"\n") == [[(1, 0, limit)]]
    assert await numbered(limit[:-1], b"y\nz") == [[(1, 0, limit)], [(2, MAX_LINE_BYTES + 1, b"z")]]
    assert await numbered(b"a\n", limit) == [[(1, 0, b"a")], [(2, 2, limit)]]
    assert await numbered(b"a\n" + limit + b"\nb") == [[(1, 0, b"a"), (2, 2, limit)], [(3, MAX_LINE_BYTES + 3, b"b")]]
    for parts in ((b"a\n" + limit + b"y\n",), (b"a\n", limit, b"y\n"), (b"a\n" + limit[:-1], b"yy\n"),
                  (b"a\n", limit + b"y")):
        with pytest.raises(PayloadTooLarge) as info:
            await numbered(*parts)
        assert (info.value.code, info.value.param, info.value.message) == (
            "line_too_long", "file", "Line 2 is longer than 16 MiB.")


def test_count_values_at_most() -> None:
    assert count_values_at_most(b"1") == 1
    assert count_values_at_most(b'{"a":[1,2],"b":{}}') == 6
    # many commas inside strings: counted again without the strings, exactly
    inside = b'["' + b"," * MAX_LINE_VALUES + b'", "[{"]'
    assert count_values_at_most(inside) == 3
    assert count_values_at_most(b'[{"a": "' + b"," * MAX_LINE_VALUES + b'"}, {}]') == 5
    real = b"[" + b"0," * MAX_LINE_VALUES + b"0]"
    assert count_values_at_most(real) == MAX_LINE_VALUES + 2
    escaped = b'["\\",' + b"," * MAX_LINE_VALUES + b'"]'  # an escaped quote does not end the string
    assert count_values_at_most(escaped) == 2
    at_limit = b"[" + b"0," * (MAX_LINE_VALUES - 2) + b"0]"  # exactly MAX_LINE_VALUES
    assert count_values_at_most(at_limit) == MAX_LINE_VALUES
    # a first count within the limit is taken as it is, commas in strings included (a bound)
    strings_at_limit = b'["' + b"," * (MAX_LINE_VALUES - 2) + b'"]'
    assert count_values_at_most(strings_at_limit) == MAX_LINE_VALUES
    assert count_values_at_most(b'["' + b"," * (MAX_LINE_VALUES - 1) + b'"]') == 2


def test_parse_line_messages() -> None:
    assert parse_line(b'{"a": 1.5, "b": [true, null]}') == {"a": 1.5, "b": [True, None]}
    for raw, message in (
            (b'{"a": NaN}', "is not valid JSON (NaN is not a JSON number)"),
            (b'{"a": -Infinity}', "is not valid JSON (-Infinity is not a JSON number)"),
            (b'{"a": 1e400}', "is not valid JSON (the number 1e400 is too large for JSON)"),
            (b'[12345678901234567890.5e999]',
             "is not valid JSON (the number 12345678901234567890 is too large for JSON)")):
        with pytest.raises(LineProblem) as info:
            parse_line(raw)
        assert (info.value.code, info.value.message, info.value.field) == ("invalid_json_line", message, None)
    with pytest.raises(LineProblem) as info:
        parse_line(b"[" * 200_000 + b"]" * 200_000)
    assert (info.value.code, info.value.message) == ("invalid_json_line", "nests too deeply to be parsed")
    with pytest.raises(LineProblem) as info:
        parse_line(b'{"a": "' + b"x" * 300 + b"\\q\"}")
    assert info.value.message.startswith("is not valid JSON (Invalid \\escape")
    assert parse_line(b"[" + b"0," * (MAX_LINE_VALUES - 2) + b"0]") == [0] * (MAX_LINE_VALUES - 1)
    with pytest.raises(PayloadTooLarge) as too_many:
        parse_line(b"[" + b"0," * (MAX_LINE_VALUES - 1) + b"0]")
    assert (too_many.value.code, too_many.value.param, too_many.value.message) == (
        "line_too_complex", "file", "A request line holds more than 500,000 JSON values.")


def good(custom_id: str, model: str = "m", url: str = CHAT) -> bytes:
    return json.dumps(line(custom_id, model, url)).encode()


def test_line_checks_count_number_and_keep_the_first_problems() -> None:
    checks = LineChecks(LineValidator(endpoint=None), max_requests=25)
    assert checks.check(3, good("a")) == LineValidator(endpoint=None).check(line("a", "m"))
    for n in range(24):
        assert checks.check(10 + n, b"{bad") is None
    assert checks.count == 25 and len(checks.problems) == 20
    assert [p.line for p in checks.problems] == list(range(10, 30))
    assert str(checks.problems[0]).startswith("line 10: is not valid JSON (")
    with pytest.raises(PayloadTooLarge) as info:
        checks.check(99, good("b"))
    assert (info.value.code, info.value.param, info.value.message) == (
        "too_many_requests", "file", "The file has more than 25 requests (line 99).")


def test_a_line_with_too_many_values_is_a_413_naming_its_line() -> None:
    checks = LineChecks(LineValidator(endpoint=None))
    checks.check(1, good("a"))
    with pytest.raises(PayloadTooLarge) as info:
        checks.check(2, b"[" + b"0," * MAX_LINE_VALUES + b"0]")
    assert (info.value.code, info.value.param, info.value.message) == (
        "line_too_complex", "file", "Line 2: A request line holds more than 500,000 JSON values.")


def test_line_checks_of_indexed_lines() -> None:
    checks = LineChecks(LineValidator(endpoint=CHAT, router=router()), max_requests=3)
    tokens = BodyTokens(1, 1, 1, None, 1)
    checks.check_indexed(1, CHAT, "sim/x", 10, tokens)
    checks.check_indexed(4, EMBED, "sim/x", 10, tokens)
    checks.check_indexed(5, CHAT, "nope", 10, tokens)
    assert checks.count == 3 and checks.validator.lines == 1
    assert [(p.line, p.problem.code) for p in checks.problems] == [(4, "url_mismatch"), (5, "model_not_found")]
    with pytest.raises(PayloadTooLarge) as info:
        checks.check_indexed(7, CHAT, "sim/x", 10, tokens)
    assert info.value.message == "The file has more than 3 requests (line 7)."
    many = LineChecks(LineValidator(endpoint=CHAT, router=router()))
    for n in range(30):
        many.check_indexed(n + 1, CHAT, "nope", 1, tokens)
    assert len(many.problems) == 20 and many.problems[-1].line == 20


async def test_check_lines_uses_its_limit() -> None:
    async def source() -> AsyncIterator[tuple[int, bytes]]:
        for i in range(4):
            yield i + 1, good(f"c{i}")

    assert await check_lines(source(), LineValidator(endpoint=None), max_requests=4) == (4, [])
    with pytest.raises(PayloadTooLarge) as info:
        await check_lines(source(), LineValidator(endpoint=None), max_requests=3)
    assert info.value.message == "The file has more than 3 requests (line 4)."


# --------------------------------------------------------------------------- uploads and their line index


async def new_file(store: Store, file_id: str, content: bytes, purpose: str = "batch",
                   index: bool = True, max_requests: int = 50_000) -> tuple[int, list[Any]]:
    """What UploadFile does with a file: its row, its content, its lines checked and indexed."""
    await store.begin_file(FileRow(id=file_id, project="p", filename="in.jsonl", purpose=purpose, bytes=0,
                                   line_count=0, status=FileStatus.UPLOADING, created_at=now()))
    size = await store.blobs.put(file_id, _chunks(content))
    writer = LineIndexWriter(store, file_id) if index else _NoIndex(store, file_id)
    count, problems = await check_upload(numbered_lines(_chunks(content[:7], content[7:])),
                                         LineValidator(endpoint=None), max_requests, writer)
    await store.finish_file(file_id, size, count)
    return count, problems


class _NoIndex(LineIndexWriter):
    """A file uploaded before the index existed."""

    async def add(self, number: int, offset: int, length: int, url: str, request: NewRequest) -> None:
        pass

    async def close(self) -> None:
        pass


async def blocks(store: Store, file_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(data) async for data in store.file_index_blocks(file_id)]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + (b"\r\n\n" if i % 2 else b"\n") for i, item in enumerate(lines))


async def test_an_upload_indexes_each_line_with_its_offset_and_tokens(store: Store) -> None:
    lines = [line("a", "sim/x", max_tokens=9), line("b", "m2", url=CHAT, n=2), line("c", "alias")]
    content = jsonl(lines)
    assert await new_file(store, "file-1", content) == (3, [])
    found = await blocks(store, "file-1")
    assert len(found) == 1 and found[0]["url"] == CHAT and found[0]["total"] == 3
    entries = found[0]["lines"]
    assert [e[:5] for e in entries] == [[1, 0, len(json.dumps(lines[0])), "a", "sim/x"],
                                        [2, len(json.dumps(lines[0])) + 1, len(json.dumps(lines[1])) + 1, "b", "m2"],
                                        [4, content.index(b'{"custom_id": "c"'), len(json.dumps(lines[2])), "c",
                                         "alias"]]
    for entry, item in zip(entries, lines, strict=True):
        assert content[entry[1]:entry[1] + entry[2]].rstrip(b"\r") == json.dumps(item).encode()
        assert tokens_of(entry) == body_tokens(CHAT, item["body"])
    assert [e[8] for e in entries] == [9, -1, -1] and [e[9] for e in entries] == [1, 2, 1]
    assert await whole_index(store, "file-1", 3)
    assert not await whole_index(store, "file-1", 4) and not await whole_index(store, "file-1", 2)
    assert [(url, len(e)) async for url, e in index_blocks(store, "file-1")] == [(CHAT, 3)]


async def test_an_upload_is_held_to_the_configured_request_limit(store: Store) -> None:
    content = jsonl([line(f"r{i}", "sim/x") for i in range(3)])
    assert (await new_file(store, "file-3", content, max_requests=3))[0] == 3
    with pytest.raises(PayloadTooLarge) as info:
        await new_file(store, "file-2", content, max_requests=2)
    assert (info.value.code, info.value.message) == ("too_many_requests",
                                                     "The file has more than 2 requests (line 4).")


def test_tokens_of_an_entry() -> None:
    assert tokens_of([1, 0, 5, "a", "m", 1, 2, 3, -1, 4]) == BodyTokens(1, 2, 3, None, 4)
    assert tokens_of([1, 0, 5, "a", "m", 7, 8, 9, 0, 1]) == BodyTokens(7, 8, 9, 0, 1)
    assert tokens_of([1, 0, 5, "a", "m", 7, 8, 9, 12, 1]) == BodyTokens(7, 8, 9, 12, 1)


async def test_the_index_is_stored_a_block_at_a_time_and_the_last_says_the_total(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(line_index, "BLOCK_LINES", 3)
    content = jsonl([line(f"r{i}", "sim/x", url=EMBED) for i in range(7)])
    assert (await new_file(store, "file-7", content))[0] == 7
    found = await blocks(store, "file-7")
    assert [len(b["lines"]) for b in found] == [3, 3, 1]
    assert [b.get("total") for b in found] == [None, None, 7] and {b["url"] for b in found} == {EMBED}
    assert [e[3] for b in found for e in b["lines"]] == [f"r{i}" for i in range(7)]
    assert await whole_index(store, "file-7", 7)
    content = jsonl([line(f"r{i}", "sim/x") for i in range(6)])
    await new_file(store, "file-6", content)
    assert [(len(b["lines"]), b.get("total")) for b in await blocks(store, "file-6")] == [(3, None), (3, None),
                                                                                        (0, 6)]


async def test_a_refused_or_empty_upload_gets_no_whole_index(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(line_index, "BLOCK_LINES", 2)
    content = jsonl([line("a", "m"), line("b", "m")]) + b"{bad\n" + jsonl([line(f"c{i}", "m") for i in range(5)])
    count, problems = await new_file(store, "file-bad", content)
    assert count == 8 and [(p.line, p.problem.code) for p in problems] == [(4, "invalid_json_line")]
    found = await blocks(store, "file-bad")
    assert [[e[3] for e in b["lines"]] for b in found] == [["a", "b"]]  # nothing after the problem, no total
    assert not await whole_index(store, "file-bad", 8)
    assert await new_file(store, "file-empty", b"\n \n") == (0, [])
    assert await store.last_file_index_block("file-empty") is None
    assert not await whole_index(store, "file-empty", 0)


# --------------------------------------------------------------------------- batches from an uploaded file


def batch_row(file_id: str) -> BatchRow:
    return BatchRow.new(id="batch_1", project="p", endpoint=CHAT, completion_window="24h", created_at=now(),
                        input_file_id=file_id)


async def prepared(store: Store, file_id: str, validator: LineValidator | None = None,
                   limits: Limits = DEFAULT_LIMITS) -> tuple[BatchRow, list[NewRequest] | None]:
    row = batch_row(file_id)
    lines = await BatchInputs(store, limits).prepare("p", file_id, validator or
                                                      LineValidator(endpoint=CHAT, router=router()), row)
    return row, None if lines is None else [r async for r in lines]


FILE_LINES = [line("a", "alias", max_tokens=5), line("b", "sim/x"), line("c", "two/m1"), line("d", "sim/y"),
              line("e", "m1")]


@pytest.mark.parametrize("index", [True, False], ids=["indexed", "parsed"])
async def test_a_good_file_gives_its_lines_routed_and_placed(store: Store, index: bool) -> None:
    content = jsonl(FILE_LINES)
    await new_file(store, "file-g", content, index=index)
    validator = LineValidator(endpoint=CHAT, router=router(), estimator=Estimator(router()))
    row, lines = await prepared(store, "file-g", validator)
    assert row.status == BatchStatus.VALIDATING and not row.errors
    assert lines is not None
    parts = [0, 1, 0, 1, 2]
    routes = [("two", "m1"), (SIM, "x"), ("two", "m1"), (SIM, "y"), ("two", "m1")]
    assert [(r.custom_id, r.model, (r.provider, r.provider_model), r.part_no) for r in lines] == [
        (item["custom_id"], item["body"]["model"], route, part)
        for item, route, part in zip(FILE_LINES, routes, parts, strict=True)]
    if index:  # by reference to the line's bytes in the file, no body copied
        assert all(r.body == {} for r in lines)
        assert [content[r.line_offset:r.line_offset + r.line_length].rstrip(b"\r")  # type: ignore[operator]
                for r in lines] == [json.dumps(item).encode() for item in FILE_LINES]
    else:
        assert [r.body for r in lines] == [item["body"] for item in FILE_LINES]
        assert all(r.line_offset is None and r.line_length is None for r in lines)
    sizes = [len(json.dumps(item)) + (1 if i % 2 else 0) for i, item in enumerate(FILE_LINES)]  # "\r" kept
    assert [(p.part_no, p.provider, p.total, p.bytes) for p in validator.parts] == [
        (0, "two", 2, sizes[0] + sizes[2]), (1, SIM, 2, sizes[1] + sizes[3]), (2, "two", 1, sizes[4])]
    assert validator.estimator is not None
    assert [t.lines for _, t in sorted(validator.estimator.parts.items())] == [2, 2, 1]
    assert validator.estimator.parts[0].output_max == 5 + 77
    counted = [body_tokens(CHAT, item["body"]) for item in FILE_LINES]
    assert [t.input_max for _, t in sorted(validator.estimator.parts.items())] == [
        counted[0].input_max + counted[2].input_max, counted[1].input_max + counted[3].input_max, counted[4].input_max]


@pytest.mark.parametrize("index", [True, False], ids=["indexed", "parsed"])
async def test_a_file_with_bad_lines_fails_the_batch_naming_them(store: Store, index: bool) -> None:
    content = jsonl([line("a", "sim/x"), line("b", "nope"), line("c", "sim/x", url=EMBED)])
    await new_file(store, "file-b", content, index=index)
    row, lines = await prepared(store, "file-b")
    assert lines is None
    assert row.status == BatchStatus.FAILED and row.total == 0 and row.failed_at is not None
    assert row.failed_at >= row.created_at
    assert row.errors == [
        BatchError("model_not_found", "model 'nope' is not served by any configured provider", "body.model", 2),
        BatchError("url_mismatch", f"url '{EMBED}' differs from the batch endpoint '{CHAT}'", "url", 4)]


async def test_a_file_without_lines_fails_the_batch_as_empty(store: Store) -> None:
    await new_file(store, "file-e", b"\n  \n")
    row, lines = await prepared(store, "file-e")
    assert lines is None and row.status == BatchStatus.FAILED and row.total == 0
    assert row.errors == [BatchError("empty_file", "The input file has no request lines.")]


@pytest.mark.parametrize("index", [True, False], ids=["indexed", "parsed"])
async def test_the_configured_request_limit_applies_to_a_file(store: Store, index: bool) -> None:
    await new_file(store, "file-l", jsonl([line(f"r{i}", "sim/x") for i in range(3)]), index=index)
    _, lines = await prepared(store, "file-l", limits=Limits(max_requests=3))
    assert lines is not None and len(lines) == 3
    with pytest.raises(PayloadTooLarge) as info:
        await prepared(store, "file-l", limits=Limits(max_requests=2))
    assert (info.value.code, info.value.message) == ("too_many_requests",
                                                     "The file has more than 2 requests (line 4).")


async def test_an_unknown_or_wrong_purpose_file_is_refused(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        await prepared(store, "file-none")
    assert (info.value.param, info.value.code, info.value.message) == (
        "input_file_id", "file_not_found", "No such File object: file-none")
    await new_file(store, "file-o", jsonl([line("a", "sim/x")]), purpose="batch_output")
    with pytest.raises(InvalidRequest) as refused:
        await prepared(store, "file-o")
    assert (refused.value.param, refused.value.code, refused.value.message) == (
        "input_file_id", "invalid_file_purpose", "File file-o has purpose 'batch_output'; a batch input needs 'batch'.")


async def test_a_file_whose_content_changed_size_is_gone(store: Store) -> None:
    """A file without its index is read whole: content that is not the size the file says (swept
    and gone meanwhile) fails the create instead of making a batch of what is left."""
    content = jsonl([line("a", "sim/x"), line("b", "sim/x")])
    await new_file(store, "file-s", content, index=False)
    await store.blobs.put("file-s", _chunks(content[:-3]))
    with pytest.raises(NotFound) as info:
        await prepared(store, "file-s")
    assert (info.value.param, info.value.code, info.value.message) == (
        "input_file_id", "file_not_found",
        "No such File object: file-s (it was deleted while the batch was being created)")


async def test_a_file_that_lost_lines_between_the_passes_is_gone(store: Store) -> None:
    content = jsonl([line("a", "sim/x"), line("b", "sim/x"), line("c", "sim/x")])
    await new_file(store, "file-p", content, index=False)
    row = batch_row("file-p")
    lines = await BatchInputs(store).prepare("p", "file-p", LineValidator(endpoint=CHAT, router=router()), row)
    assert lines is not None
    await store.blobs.put("file-p", _chunks(jsonl([line("a", "sim/x"), line("b", "sim/x")])))
    got: list[str] = []
    with pytest.raises(NotFound) as info:
        async for r in lines:
            got.append(r.custom_id)
    assert got == ["a", "b"] and "file-p (it was deleted while the batch was being created)" in info.value.message


async def test_a_file_of_several_stored_chunks_without_its_index_is_read_whole(store: Store) -> None:
    """The size check counts every chunk read (the content is stored in 1 MiB chunks)."""
    lines = [line(f"r{i}", "sim/x", text="word " * 150_000) for i in range(3)]
    content = jsonl(lines)
    assert len(content) > 2 * 2**20
    await new_file(store, "file-big", content, index=False)
    _, requests = await prepared(store, "file-big")
    assert requests is not None and [r.custom_id for r in requests] == ["r0", "r1", "r2"]

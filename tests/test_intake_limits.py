"""Intake rules on generated inputs (Hypothesis): what a line may hold, how far it may nest, how
many values it may have, which strings are text. No server: the same functions judge uploads,
batch creates from files and inline requests."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from service.domain.errors import MAX_MESSAGE_CHARS, InvalidRequest, PayloadTooLarge, clip
from service.domain.model import MAX_JSON_DEPTH, MAX_LINE_BYTES, MAX_LINE_VALUES, MAX_MODEL_LEN
from service.intake.jsonl import count_values_at_most, parse_line, split_lines
from service.intake.validation import LineProblem, LineValidator, is_object_id, is_text, json_shape_problem

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)


def line(custom_id: Any = "a", model: Any = "m", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, **body}}


def nested(depth: int, kind: str = "object") -> Any:
    """`depth` containers one inside the other (the innermost empty), built without recursion."""
    value: Any = {} if kind == "object" else []
    for _ in range(depth - 1):
        value = {"k": value} if kind == "object" else [value]
    return value


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- text and ids


@FAST
@given(st.text())
@example("a\x00b")
@example("\ud800")
@example("ok\udfff")
def test_custom_id_is_accepted_exactly_when_it_is_storable_text(custom_id: str) -> None:
    """NUL (PostgreSQL refuses it, SQLite stored it) and lone surrogates (JSON's \\ud800) are
    refused at intake, the same for every backend; every other non-empty id up to 512 is kept."""
    try:
        custom_id.encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    assert is_text(custom_id) == ("\x00" not in custom_id and encodable)
    storable = custom_id != "" and len(custom_id) <= 512 and is_text(custom_id)
    try:
        LineValidator(endpoint=None).check(line(custom_id))
        accepted = True
    except LineProblem as p:
        accepted = False
        assert p.field == "custom_id" and len(p.message) < 300
    assert accepted == storable


@FAST
@given(st.text(min_size=1, max_size=400))
def test_model_is_accepted_when_it_fits_its_column(model: str) -> None:
    fits = len(model) <= MAX_MODEL_LEN and is_text(model)
    try:
        LineValidator(endpoint=None).check(line(model=model))
        accepted = True
    except LineProblem as p:
        accepted = False
        assert p.field == "body.model"
    assert accepted == fits


@FAST
@given(st.text(max_size=200))
@example("batch_" + "0" * 32)
@example("file-abc")
@example("a" * 65)
def test_object_ids_have_one_shape(value: str) -> None:
    assert is_object_id(value) == (0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-")
                                                                  for c in value))


@FAST
@given(st.text(max_size=10_000) | st.binary(max_size=100).map(repr))
def test_clip_bounds_every_echo(value: str) -> None:
    out = clip(value)
    assert len(out) <= 64 * 4 + 8  # repr may escape each kept character
    assert "\x00" not in out and "\n" not in out
    err = InvalidRequest("x" * 5000 + value, param="p" * 500)
    assert len(err.message) <= MAX_MESSAGE_CHARS and err.param is not None and len(err.param) <= 200
    assert err.envelope()["error"]["message"] == err.message


# --------------------------------------------------------------------------- JSON on a line


@FAST
@given(st.integers(1, 200), st.sampled_from(["object", "array"]))
def test_nesting_limit_is_exact_and_never_a_recursion_error(depth: int, kind: str) -> None:
    """Levels are containers: the line object is level 1 and its body level 2, so `depth`
    containers inside the body make the line `depth + 2` deep."""
    raw = line(deep=nested(depth, kind))
    line_depth = depth + 2
    try:
        LineValidator(endpoint=None).check(json.loads(json.dumps(raw)))
        accepted = True
    except LineProblem as p:
        accepted = False
        assert "deeper than" in p.message
    assert accepted == (line_depth <= MAX_JSON_DEPTH)


def test_very_deep_lines_are_a_line_problem_not_a_crash() -> None:
    for depth in (1_000, 100_000):
        raw = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","x":' + \
            b"[" * depth + b"]" * depth + b"}}"
        with pytest.raises(LineProblem):
            LineValidator(endpoint=None).check(parse_line(raw))


@FAST
@given(json_values)
def test_value_count_bound_never_undercounts(value: Any) -> None:
    raw = json.dumps(value).encode()
    exact = 0
    stack = [value]
    while stack:
        item = stack.pop()
        exact += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    assert count_values_at_most(raw) >= exact
    assert json_shape_problem(value, max_depth=10_000, max_values=exact) is None
    if exact > 1:
        assert json_shape_problem(value, max_depth=10_000, max_values=exact - 1) is not None


def test_a_line_with_too_many_values_is_refused_before_it_is_parsed() -> None:
    """The 22 MB line of 7.3 million `{}`: refused by counting, without building 7.3 million dicts."""
    raw = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","x":[' + \
        b",".join([b"{}"] * (MAX_LINE_VALUES + 1)) + b"]}}"
    with pytest.raises(PayloadTooLarge) as info:
        parse_line(raw)
    assert info.value.code == "line_too_complex" and info.value.http_status == 413
    # Commas inside strings do not count: a long prompt full of commas is fine.
    prose = json.dumps(line(messages=[{"role": "user", "content": "a, " * (MAX_LINE_VALUES + 10)}])).encode()
    assert isinstance(parse_line(prose), dict)


@FAST
@given(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]), st.booleans())
def test_nan_and_infinity_are_not_json(constant: str, in_body: bool) -> None:
    head = '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"'
    raw = (head + f',"t":{constant}}}}}' if in_body else head + f'}},"x":{constant}}}').encode()
    with pytest.raises(LineProblem) as info:
        parse_line(raw)
    assert info.value.code == "invalid_json_line"


@FAST
@given(json_values)
def test_every_finite_json_value_parses_back(value: Any) -> None:
    assume(not (isinstance(value, float) and not math.isfinite(value)))
    raw = json.dumps({"custom_id": "a", "v": value}).encode()
    assert parse_line(raw) == {"custom_id": "a", "v": value}


# --------------------------------------------------------------------------- splitting lines


async def _chunks(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        yield data[last:cut]
        last = cut
    yield data[last:]


async def _lines(data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    return [item async for item in split_lines(_chunks(data, cuts))]


@FAST
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(0, 10_000), max_size=10), st.booleans())
def test_split_lines_is_independent_of_chunking(lines: list[bytes], cuts: list[int], trailing: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    expected = [(i + 1, ln) for i, ln in enumerate(data.split(b"\n")) if ln.strip()]
    assert run(_lines(data, cuts)) == expected


def test_a_line_over_the_limit_is_413_wherever_the_chunks_cut() -> None:
    big = b"x" * (MAX_LINE_BYTES + 1)
    for cuts in ([], [1], [MAX_LINE_BYTES], [MAX_LINE_BYTES // 2, MAX_LINE_BYTES + 1]):
        with pytest.raises(PayloadTooLarge) as info:
            run(_lines(b"{}\n" + big + b"\n{}\n", cuts))
        assert info.value.code == "line_too_long" and "Line 2" in info.value.message
    ok = b"y" * MAX_LINE_BYTES
    assert run(_lines(ok + b"\n", [7]))[0][1] == ok

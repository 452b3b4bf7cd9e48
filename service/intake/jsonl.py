"""JSONL streaming: bytes in chunks → numbered lines, and batch input lines → checked requests.

Files are never read whole: a 200 MB upload or a 50,000-line input is handled a chunk and a
line at a time. Uploads and batch creation share `check_lines`, so a line is judged the same
way (and reported with the same 1-based line number) at both moments.

Memory is bounded by the line, not by the file: a line holds at most `MAX_LINE_BYTES`, and
before it is parsed its JSON values are counted without building them (`MAX_LINE_VALUES`), so
no line can make the parser build millions of objects (a 22 MB line of `{}`s used to cost 546 MB).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from service.domain.errors import PayloadTooLarge
from service.domain.model import MAX_LINE_BYTES, MAX_LINE_VALUES, MAX_REQUESTS
from service.intake.validation import LineProblem, LineValidator

__all__ = ["MAX_LINE_BYTES", "NumberedProblem", "check_lines", "parse_line", "split_lines"]

MAX_REPORTED_PROBLEMS = 20
# A JSON string token (quotes included), unrolled so it runs in linear time.
_STRING_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


@dataclass(frozen=True)
class NumberedProblem:
    line: int
    problem: LineProblem

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem.message}"


def _too_long(number: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB.", param="file",
                           code="line_too_long")


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers. Only the current line is buffered, and
    each byte is scanned for a newline once (no re-scanning of a long line per chunk)."""
    carry = bytearray()
    number = 0
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            if len(carry) + end - start > MAX_LINE_BYTES:
                raise _too_long(number)
            if carry:
                carry += chunk[start:end]
                line = bytes(carry)
                carry.clear()
            else:
                line = chunk[start:end]
            if line.strip():
                yield number, line
            start = end + 1
        carry += chunk[start:]
        if len(carry) > MAX_LINE_BYTES:
            raise _too_long(number + 1)
    if carry.strip():
        yield number + 1, bytes(carry)


def count_values_at_most(raw: bytes) -> int:
    """An upper bound of the JSON values in `raw`, without parsing it: every value but the first
    of a container follows a comma. Exact enough unless strings hold many commas or brackets;
    then the strings are blanked out first (one linear regex pass) and the count is exact-ish."""
    bound = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if bound <= MAX_LINE_VALUES:
        return bound
    blanked = _STRING_TOKEN.sub(b'""', raw)
    return blanked.count(b",") + blanked.count(b"[") + blanked.count(b"{") + 1


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large for JSON")
    return value


def parse_line(raw: bytes) -> object:
    """The line's JSON value: strict JSON (no NaN/Infinity, no number that overflows a double),
    or `LineProblem`; `PayloadTooLarge` when it holds more than MAX_LINE_VALUES values."""
    if count_values_at_most(raw) > MAX_LINE_VALUES:
        raise PayloadTooLarge(f"A request line holds more than {MAX_LINE_VALUES:,} JSON values.", param="file",
                              code="line_too_complex")
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise LineProblem("invalid_json_line", "nests too deeply to be parsed") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise LineProblem("invalid_json_line", f"is not valid JSON ({str(exc)[:200]})") from None


async def check_lines(lines: AsyncIterable[tuple[int, bytes]], validator: LineValidator,
                      max_requests: int = MAX_REQUESTS) -> tuple[int, list[NumberedProblem]]:
    """Validate every line; returns the line count and the first problems found."""
    count = 0
    problems: list[NumberedProblem] = []
    async for number, raw in lines:
        count += 1
        if count > max_requests:
            raise PayloadTooLarge(f"The file has more than {max_requests} requests (line {number}).",
                                  param="file", code="too_many_requests")
        try:
            validator.check(parse_line(raw), len(raw))
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(f"Line {number}: {exc.message}", param=exc.param, code=exc.code) from None
        except LineProblem as problem:
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append(NumberedProblem(number, problem))
    return count, problems

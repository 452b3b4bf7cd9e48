"""JSONL streaming: bytes in chunks → numbered lines, and batch input lines → checked requests.

Files are never read whole: a 200 MB upload or a 50,000-line input is handled a chunk and a
line at a time. Uploads and batch creation share `LineChecks`, so a line is judged the same
way (and reported with the same 1-based line number) at both moments. A line is parsed once, at
its upload, which records what a batch created from the file needs of it (`line_index.py`).

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

from service.domain import codec
from service.domain.errors import PayloadTooLarge
from service.domain.model import MAX_LINE_BYTES, MAX_LINE_VALUES, MAX_REQUESTS
from service.domain.tokens import BodyTokens
from service.intake.line_index import LineIndexWriter
from service.intake.validation import LineProblem, LineValidator
from service.storage.repository import NewRequest

__all__ = ["MAX_LINE_BYTES", "LineChecks", "NumberedProblem", "check_lines", "check_upload", "numbered_lines",
           "parse_line", "split_lines"]

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


async def numbered_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[tuple[int, int, bytes]]]:
    """The non-blank lines each chunk completes, as (1-based line number, byte offset of the line in
    the stream, line). Only the current line is buffered, and each byte is scanned for a newline
    once (no re-scanning of a long line per chunk). A chunk's lines come together: one step of an
    async generator per line would cost more than splitting it."""
    carry = bytearray()
    number = 0
    at = 0  # offset of the current line's first byte
    async for chunk in chunks:
        start = 0
        lines = []
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
            if line and not line.isspace():  # what `line.strip()` keeps, without copying the line
                lines.append((number, at, line))
            at += len(line) + 1
            start = end + 1
        if lines:
            yield lines
        carry += chunk[start:]
        if len(carry) > MAX_LINE_BYTES:
            raise _too_long(number + 1)
    if carry.strip():
        yield [(number + 1, at, bytes(carry))]


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers (`numbered_lines`, a line at a time)."""
    async for lines in numbered_lines(chunks):
        for number, _, line in lines:
            yield number, line


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


def _strict_json(raw: bytes) -> object:
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)


def parse_line(raw: bytes) -> object:
    """The line's JSON value: strict JSON (no NaN/Infinity, no number that overflows a double),
    or `LineProblem`; `PayloadTooLarge` when it holds more than MAX_LINE_VALUES values. Parsed
    by orjson where it agrees with `json` (service/domain/codec.py), so the verdicts and messages
    are `json`'s."""
    if count_values_at_most(raw) > MAX_LINE_VALUES:
        raise PayloadTooLarge(f"A request line holds more than {MAX_LINE_VALUES:,} JSON values.", param="file",
                              code="line_too_complex")
    try:
        return codec.loads(raw, _strict_json)
    except RecursionError:
        raise LineProblem("invalid_json_line", "nests too deeply to be parsed") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise LineProblem("invalid_json_line", f"is not valid JSON ({str(exc)[:200]})") from None


class LineChecks:
    """Counts lines and keeps the first problems, the same way wherever the lines come from (a
    stream of lines to parse, or an uploaded file's index)."""

    def __init__(self, validator: LineValidator, max_requests: int = MAX_REQUESTS) -> None:
        self.validator = validator
        self.max_requests = max_requests
        self.count = 0
        self.problems: list[NumberedProblem] = []

    def _next(self, number: int) -> None:
        self.count += 1
        if self.count > self.max_requests:
            raise PayloadTooLarge(f"The file has more than {self.max_requests} requests (line {number}).",
                                  param="file", code="too_many_requests")

    def _problem(self, number: int, problem: LineProblem) -> None:
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(NumberedProblem(number, problem))

    def check(self, number: int, raw: bytes) -> NewRequest | None:
        """Parse and judge one line; None when it has a problem (kept)."""
        self._next(number)
        try:
            return self.validator.check(parse_line(raw), len(raw))
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(f"Line {number}: {exc.message}", param=exc.param, code=exc.code) from None
        except LineProblem as problem:
            self._problem(number, problem)
            return None

    def check_indexed(self, number: int, url: str, model: str, size: int, tokens: BodyTokens) -> None:
        """Judge one line of an uploaded file from its index entry (`LineValidator.check_indexed`)."""
        self._next(number)
        try:
            self.validator.check_indexed(url, model, size, tokens)
        except LineProblem as problem:
            self._problem(number, problem)


async def check_lines(lines: AsyncIterable[tuple[int, bytes]], validator: LineValidator,
                      max_requests: int = MAX_REQUESTS) -> tuple[int, list[NumberedProblem]]:
    """Validate every line; returns the line count and the first problems found."""
    checks = LineChecks(validator, max_requests)
    async for number, raw in lines:
        checks.check(number, raw)
    return checks.count, checks.problems


async def check_upload(lines: AsyncIterable[list[tuple[int, int, bytes]]], validator: LineValidator,
                       max_requests: int, index: LineIndexWriter) -> tuple[int, list[NumberedProblem]]:
    """`check_lines` for an upload (`numbered_lines`), recording what creating a batch from the
    file needs of each line in `index` while no line has a problem (a file with one is refused)."""
    checks = LineChecks(validator, max_requests)
    async for batch in lines:
        for number, offset, raw in batch:
            request = checks.check(number, raw)
            if request is not None and not checks.problems:
                await index.add(number, offset, len(raw), validator.endpoint or "", request)
    if checks.count and not checks.problems:
        await index.close()
    return checks.count, checks.problems

"""JSONL streaming: bytes in chunks → numbered lines, and batch input lines → checked requests.

Files are never read whole: a 200 MB upload or a 50,000-line input is handled a chunk and a
line at a time. Uploads and batch creation share `check_lines`, so a line is judged the same
way (and reported with the same 1-based line number) at both moments.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from service.domain.errors import PayloadTooLarge
from service.domain.model import MAX_REQUESTS
from service.intake.validation import LineProblem, LineValidator

MAX_LINE_BYTES = 32 * 1024 * 1024
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class NumberedProblem:
    line: int
    problem: LineProblem

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem.message}"


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers. Only the current line is buffered."""
    carry = b""
    number = 0
    async for chunk in chunks:
        carry += chunk
        *complete, carry = carry.split(b"\n")
        for line in complete:
            number += 1
            if line.strip():
                yield number, line
        if len(carry) > MAX_LINE_BYTES:
            raise PayloadTooLarge(f"Line {number + 1} is longer than {MAX_LINE_BYTES // 2**20} MiB.",
                                  param="file", code="line_too_long")
    if carry.strip():
        yield number + 1, carry


def parse_line(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineProblem("invalid_json_line", f"is not valid JSON ({exc})") from None


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
        except LineProblem as problem:
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append(NumberedProblem(number, problem))
    return count, problems

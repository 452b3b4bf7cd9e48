"""Memory is bounded by budgets, not by typical inputs: the pathological inputs of issue #8 get a
413 (or are accepted) with the server's peak resident memory under the documented 300 MB.
bench/memory.py runs the full-size cases (a 200 MB file of 500 KB lines included) with figures."""

from __future__ import annotations

import json
import threading

import httpx

from tests.e2e import (
    KEY_A,
    Stack,
    sqlite_stack_fixture,  # noqa: F401  (the fixture `sqlite_stack`)
    vm_bytes,
)
from tests.hostile import assert_clean
from tests.load import curly_line, inline_body, reset_peak, upload

MB = 1_000_000
BUDGET = 300 * MB


def peak_after(stack: Stack, work: object) -> int:
    reset_peak(stack.proc.pid)
    work()  # type: ignore[operator]
    return vm_bytes(stack.proc.pid, "VmHWM")


def test_a_line_of_millions_of_empty_objects_is_413_within_budget(sqlite_stack: Stack) -> None:
    http = sqlite_stack.http()  # closed with the stack
    answers: list[httpx.Response] = []
    for count, code in ((7_300_000, "line_too_long"), (5_000_000, "line_too_complex")):
        peak = peak_after(sqlite_stack, lambda c=count: answers.append(upload(http, curly_line(c))))
        error = assert_clean(answers[-1], 413)
        assert error is not None and error["code"] == code
        assert peak < BUDGET, f"{count} {{}}: server peaked at {peak / MB:.0f} MB"


def test_concurrent_oversized_inline_creates_are_refused_unread(sqlite_stack: Stack) -> None:
    body = inline_body(62 * MB)
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=sqlite_stack.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=300) as h:
            statuses.append(h.post("/v1/batches", content=body, headers={"content-type": "application/json"})
                            .status_code)

    def three() -> None:
        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    peak = peak_after(sqlite_stack, three)
    assert statuses == [413, 413, 413]
    assert peak < BUDGET, f"server peaked at {peak / MB:.0f} MB"
    assert json.loads(body)["requests"]  # the body was real, only refused

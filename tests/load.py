"""Load and pathological inputs through Envoy, shared by tests and bench/:

- `concurrent_creates` (tests/test_concurrency.py, bench/concurrency.py): N clients upload a small
  file each and then create a batch from it, all at once, while another tenant reads its own
  batch in a loop. Every status and every read latency is recorded.
- the memory cases (tests/test_memory_budgets.py, bench/memory.py): streamed uploads of huge
  lines, big inline bodies, and a way to reset a process's peak RSS between them."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.e2e import KEY_A, KEY_B, Stack

CHAT = "/v1/chat/completions"


@dataclass
class Phase:
    statuses: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{dict(sorted(self.statuses.items()))} in {self.seconds:.1f}s"


@dataclass
class Report:
    clients: int
    uploads: Phase
    creates: Phase
    reads: list[float] = field(default_factory=list)  # seconds, one per read of the other tenant
    read_statuses: Counter[int] = field(default_factory=Counter)

    def read_summary(self) -> str:
        if not self.reads:
            return "no reads"
        ordered = sorted(self.reads)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        return (f"{len(ordered)} reads, median {statistics.median(ordered) * 1000:.0f} ms, "
                f"p95 {p95 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms, statuses {dict(self.read_statuses)}")


def small_file(i: int, lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"c{i}-{j}", "method": "POST", "url": CHAT,
                                "body": {"model": "sim/small", "messages": [{"role": "user", "content": f"q {j}"}]}})
                    .encode() + b"\n" for j in range(lines))


def _all_at_once(n: int, work: object) -> float:
    barrier = threading.Barrier(n)
    t0 = time.monotonic()

    def run(i: int) -> None:
        barrier.wait()
        work(i)  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return time.monotonic() - t0


def concurrent_creates(stack: Stack, clients: int = 100, lines: int = 20) -> Report:
    report = Report(clients, Phase(), Phase())
    lock = threading.Lock()
    file_ids: dict[int, str] = {}
    other = httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {KEY_B}"}, timeout=120)
    mine = other.post("/v1/batches", json={"endpoint": CHAT, "requests": [json.loads(small_file(0, 1))]})
    assert mine.status_code == 200, mine.text
    mine_id = mine.json()["id"]

    def record(phase: Phase, r: httpx.Response | Exception) -> None:
        with lock:
            if isinstance(r, Exception):
                phase.statuses[0] += 1
                phase.errors.append(repr(r)[:200])
            else:
                phase.statuses[r.status_code] += 1
                if r.status_code >= 400:
                    phase.errors.append(r.text[:200])

    def upload(i: int) -> None:
        with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=300) as c:
            try:
                r = c.post("/v1/files", files={"file": (f"f{i}.jsonl", small_file(i, lines))},
                           data={"purpose": "batch"})
            except httpx.HTTPError as exc:
                record(report.uploads, exc)
                return
            record(report.uploads, r)
            if r.status_code == 200:
                file_ids[i] = r.json()["id"]

    def create(i: int) -> None:
        if i not in file_ids:
            return
        with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=300) as c:
            try:
                r = c.post("/v1/batches", json={"input_file_id": file_ids[i], "endpoint": CHAT,
                                                "completion_window": "24h"})
            except httpx.HTTPError as exc:
                record(report.creates, exc)
                return
            record(report.creates, r)

    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                status = other.get(f"/v1/batches/{mine_id}").status_code
            except httpx.HTTPError:
                status = 0
            with lock:
                report.reads.append(time.monotonic() - t)
                report.read_statuses[status] += 1
            time.sleep(0.02)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        report.uploads.seconds = _all_at_once(clients, upload)
        report.creates.seconds = _all_at_once(clients, create)
    finally:
        stop.set()
        watcher.join(120)
        other.close()
    return report


# --------------------------------------------------------------------------- memory cases (bench/memory.py)


def reset_peak(pid: int) -> bool:
    """Reset a process's peak RSS (VmHWM), so the next reading is the peak of what follows."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def multipart_stream(lines: Iterator[bytes], boundary: str = "benchBoundary7") -> Iterator[bytes]:
    """An upload form whose file part is streamed from `lines` (never whole in memory)."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\r\n").encode()
    yield from lines
    yield f"\r\n--{boundary}--\r\n".encode()


def upload(http: httpx.Client, lines: Iterator[bytes]) -> httpx.Response:
    return http.post("/v1/files", content=multipart_stream(lines),
                     headers={"content-type": "multipart/form-data; boundary=benchBoundary7"})


def curly_line(count: int) -> Iterator[bytes]:
    """One request line holding `count` empty objects (3 bytes each, a dict each if parsed)."""
    head = b'{"custom_id":"c","method":"POST","url":"/v1/chat/completions","body":{"model":"sim/x","x":['
    yield head
    block = b"{}," * 100_000
    for _ in range(count // 100_000):
        yield block
    yield b"{}]}}\n"


def inline_body(total: int) -> bytes:
    """A CreateBatch JSON body of about `total` bytes of inline requests."""
    per = 60_000
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": CHAT,
              "body": {"model": "sim/x", "messages": [{"role": "user", "content": "y" * per}]}}
             for i in range(total // per)]
    return json.dumps({"endpoint": CHAT, "completion_window": "24h", "requests": lines}).encode()



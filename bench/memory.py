"""Memory benchmark: the pathological inputs of issue #8, each against the real stack, with the
peak resident memory (VmHWM) of the server and of Envoy measured per case.

    .venv/bin/python bench/memory.py            # every case
    .venv/bin/python bench/memory.py --only big-lines

Cases (each starts from a reset peak: `5` written to /proc/<pid>/clear_refs, which needs root
or the same user; otherwise peaks are cumulative and the script says so):
  curly-line     one 22 MB line of 7.3 million `{}` (and a 15 MB one: under the line limit)
  big-lines      a 200 MB file of 500 KB lines: upload, batches.create, run to completed
  inline         three concurrent 62 MB inline creates, then three concurrent 15 MB ones
The server's budget (README "Limits") is 300 MB; Envoy's figures are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.e2e import KEY_A, Stack, start_stack, vm_bytes  # noqa: E402
from tests.load import curly_line, inline_body, reset_peak, upload  # noqa: E402

MB = 1_000_000
CHAT = "/v1/chat/completions"


def measure(stack: Stack, name: str, work: Callable[[httpx.Client], str]) -> None:
    pids = {"server": stack.proc.pid, "envoy": stack.envoy_pid}
    fresh = all(reset_peak(pid) for pid in pids.values())
    before = {k: vm_bytes(pid, "VmRSS") for k, pid in pids.items()}
    t = time.monotonic()
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=1800) as http:
        outcome = work(http)
    peak = {k: vm_bytes(pid, "VmHWM") for k, pid in pids.items()}
    print(f"{name:<34} {time.monotonic() - t:6.1f}s  server peak {peak['server'] / MB:5.0f} MB "
          f"(from {before['server'] / MB:.0f}), envoy peak {peak['envoy'] / MB:5.0f} MB "
          f"(from {before['envoy'] / MB:.0f}){'' if fresh else ' [cumulative peaks]'}  -> {outcome}")


def case_curly(http: httpx.Client, count: int) -> str:
    r = upload(http, curly_line(count))
    return f"{r.status_code} {r.json().get('error', {}).get('code', r.json().get('id'))}"


def big_lines() -> Iterator[bytes]:
    pad = "lorem ipsum " * (500_000 // 12)
    for i in range(400):  # 400 x 500 KB = 200 MB
        yield json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT,
                          "body": {"model": "sim/x", "messages": [{"role": "user", "content": pad}]}}).encode() + b"\n"


def case_big_lines(http: httpx.Client) -> str:
    r = upload(http, big_lines())
    assert r.status_code == 200, r.text
    batch = http.post("/v1/batches", json={"input_file_id": r.json()["id"], "endpoint": CHAT,
                                           "completion_window": "24h"}).json()
    deadline = time.monotonic() + 1800
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    return f"{r.json()['bytes'] / MB:.0f} MB uploaded, batch {batch['status']} ({batch['request_counts']})"


def case_inline(http: httpx.Client, size: int) -> str:
    body = inline_body(size)
    statuses: list[int] = []

    def send() -> None:
        statuses.append(http.post("/v1/batches", content=body, headers={"content-type": "application/json"})
                        .status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return f"3 x {len(body) / MB:.0f} MB: statuses {sorted(statuses)}"


CASES: dict[str, list[tuple[str, Callable[[httpx.Client], str]]]] = {
    "curly-line": [("22 MB line of 7.3 million {}", lambda h: case_curly(h, 7_300_000)),
                   ("15 MB line of 5 million {}", lambda h: case_curly(h, 5_000_000))],
    "big-lines": [("200 MB file of 500 KB lines", case_big_lines)],
    "inline": [("3 concurrent 62 MB inline creates", lambda h: case_inline(h, 62 * MB)),
               ("3 concurrent 15 MB inline creates", lambda h: case_inline(h, 15 * MB))],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CASES), help="run one group of cases")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    try:
        with start_stack(work / "stack", f"sqlite+aiosqlite:///{work}/stack/sluice.db") as stack:
            for group, cases in CASES.items():
                if args.only in (None, group):
                    for name, case in cases:
                        measure(stack, name, case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

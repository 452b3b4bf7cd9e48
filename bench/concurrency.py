"""Concurrency benchmark: N clients upload a file and create a batch from it at once, through
Envoy, on the default SQLite database, while another tenant reads its own batch in a loop.

    .venv/bin/python bench/concurrency.py                 # 100 clients, 20-line files
    .venv/bin/python bench/concurrency.py --clients 200 --lines 100

Starts the real stack (`sluice run` as a child process, the sim provider with its default 50 ms
latency, as `make run` does), then prints the statuses of each phase (no 5xx expected), its
wall time, and the latency of the other tenant's reads during both phases. See bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import start_stack  # noqa: E402
from tests.load import concurrent_creates  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients (100)")
    parser.add_argument("--lines", type=int, default=20, help="request lines per file (20)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    try:
        with start_stack(work / "stack", f"sqlite+aiosqlite:///{work}/stack/sluice.db",
                         SLUICE_SIM_LATENCY_MS="50", SLUICE_ENGINE_TICK_SECONDS="0.5",
                         SLUICE_POLL_SECONDS="5") as stack:
            report = concurrent_creates(stack, clients=args.clients, lines=args.lines)
        print(f"clients   {report.clients}, {args.lines}-line files, SQLite, through Envoy")
        print(f"uploads   {report.uploads.describe()}")
        print(f"creates   {report.creates.describe()}")
        print(f"reader    {report.read_summary()} (another tenant's GET /v1/batches/{{id}} meanwhile)")
        failed = sum(n for s, n in {**report.uploads.statuses, **report.creates.statuses}.items() if s >= 500 or s == 0)
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m tests.provider_fake --port 0`: serve until SIGTERM/SIGINT; prints `PORT <n>` once listening."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .server import ProviderFake


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.provider_fake")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--polls-per-state", type=int, default=1)
    ap.add_argument("--anthropic-eventual-404", action="store_true")
    args = ap.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = ProviderFake(args.host, args.port, polls_per_state=args.polls_per_state,
                        anthropic_eventual_404=args.anthropic_eventual_404).start()
    sys.stdout.write(f"PORT {fake.port}\n")
    sys.stdout.flush()
    try:
        stop.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

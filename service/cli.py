"""The `sluice` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from service.config import Settings

ENV_HELP = """environment:
  SLUICE_GRPC_HOST / SLUICE_GRPC_PORT   where gRPC listens (127.0.0.1:50051)
  SLUICE_DATABASE_URL                   sqlite+aiosqlite:///var/sluice.db (default) or
                                        postgresql+asyncpg://user:pass@host/db
  SLUICE_API_KEY                        API key of the 'default' project
  SLUICE_API_KEYS                       more keys: project=key,other=key2
  SLUICE_SIM_LATENCY_MS / SLUICE_SIM_FAILURE_RATE   the built-in sim provider
  SLUICE_LOG_LEVEL                      INFO (default), DEBUG, WARNING
See README.md for the full list."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: a gRPC-first batch gateway for LLM providers.",
                                     epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server and the batch engine",
                           epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--port", type=int, help="gRPC port (overrides SLUICE_GRPC_PORT; 0 picks a free one)")
    serve.add_argument("--ready-line", action="store_true",
                       help="print 'LISTENING <port>' once serving (for scripts and tests)")
    sub.add_parser("migrate", help="apply database migrations and exit")
    args = parser.parse_args(argv)

    logging.basicConfig(level=os.environ.get("SLUICE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = Settings.from_env()
    if args.command == "migrate":
        from service.db import migrate

        asyncio.run(migrate(settings.database_url))
        return 0
    if args.port is not None:
        settings = Settings(**{**settings.__dict__, "grpc_port": args.port})
    if not settings.api_keys:
        print("sluice: no API key configured: set SLUICE_API_KEY (or SLUICE_API_KEYS=project=key,...)",
              file=sys.stderr)
        return 2
    from service.server import serve as run

    try:
        asyncio.run(run(settings, ready_line=args.ready_line))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

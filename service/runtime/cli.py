"""The `sluice` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import sys
from pathlib import Path

from service.providers.registry import ConfigError
from service.runtime import admin_cli, client_cli, logs
from service.runtime.config import Settings

# Envoy is started with fork() (to set its parent-death signal); gRPC's fork handlers are not
# needed for that and would only log that they were skipped.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ENV_HELP = """environment:
  SLUICE_GRPC_HOST / SLUICE_GRPC_PORT   where gRPC listens (127.0.0.1:50051)
  SLUICE_HTTP_PORT                      where Envoy serves REST, with `sluice run` (8080)
  SLUICE_PROVIDERS_FILE                 providers YAML (see providers.example.yaml)
  SLUICE_DATABASE_URL                   sqlite+aiosqlite:///var/sluice.db (default) or
                                        postgresql+asyncpg://user:pass@host/db
  SLUICE_API_KEY                        API key of the 'default' project
  SLUICE_API_KEYS                       more keys: project=key,other=key2 (configuration is the
                                        source of truth: a key removed here stops working at restart)
  SLUICE_AUTH_CACHE_SECONDS             how long a replica trusts a key it checked (5)
  SLUICE_ADMIN_KEY                      the admin API's key (projects, keys, budgets); unset: admin API off
  SLUICE_UPSTREAM_TIMEOUT_SECONDS       Envoy's deadline for a call, and idle limit of a stream (120)
  SLUICE_STALE_UPLOAD_SECONDS           an upload with no data this long is removed (900)
  SLUICE_DELETED_FILE_GRACE_SECONDS     a deleted file's content is kept this long for readers (3600)
  SLUICE_SIM_LATENCY_MS / SLUICE_SIM_FAILURE_RATE   the built-in sim provider
  SLUICE_WEBHOOKS_FILE                  webhook endpoints (YAML; see README.md, "Webhooks")
  SLUICE_RUN_ENGINE                     false: serve the API only; other replicas drive batches
  SLUICE_LOG_LEVEL                      INFO (default), DEBUG, WARNING
  SLUICE_LOG_FORMAT                     text (default) or json (one object a line, with trace_id)
  SLUICE_METRICS_PORT                   Prometheus metrics on this port (off by default; also GET
                                        /metrics through Envoy, loopback clients only unless
                                        SLUICE_METRICS_PUBLIC=true)
  OTEL_EXPORTER_OTLP_ENDPOINT           traces over OTLP/HTTP to this collector (off by default)
  SLUICE_ADDRESS                        the server, for `sluice batches|files` (127.0.0.1:50051)
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
    run = sub.add_parser("run", help="run the gRPC server, the engine and Envoy's REST edge (what `make run` does)",
                         epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--work-dir", default="var", help="where Envoy's rendered config and logs go (var/)")
    sub.add_parser("migrate", help="apply database migrations and exit")
    client_cli.add_commands(sub)
    admin_cli.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("batches", "files"):
        return client_cli.run(args)
    if args.command == "admin":
        return admin_cli.run(args)

    try:
        logs.configure(os.environ.get("SLUICE_LOG_LEVEL", "INFO"), os.environ.get("SLUICE_LOG_FORMAT", "text"))
        logging.getLogger("alembic").setLevel(logging.WARNING)
        return _command(args)
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; configuration errors propagate as `ConfigError` (exit status 2)."""
    settings = Settings.from_env()
    if args.command == "migrate":
        from service.storage.db import migrate

        asyncio.run(migrate(settings.database_url))
        return 0
    if getattr(args, "port", None) is not None:
        settings = dataclasses.replace(settings, grpc_port=args.port)
    generated = ""
    if not settings.api_keys and args.command == "run":
        generated = "sk-sluice-" + secrets.token_urlsafe(24)
        settings = dataclasses.replace(settings, api_keys={generated: "default"})
    if not settings.api_keys:
        raise ConfigError("no API key configured: set SLUICE_API_KEY (or SLUICE_API_KEYS=project=key,...)")
    from service.runtime import server
    from service.runtime.envoy import EnvoyError

    try:
        if args.command == "serve":
            asyncio.run(server.serve(settings, ready_line=args.ready_line))
        else:
            asyncio.run(server.run_with_envoy(settings, Path(args.work_dir) / "envoy",
                                              lambda http, grpc: _banner(http, grpc, settings, generated)))
    except KeyboardInterrupt:
        pass
    except EnvoyError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 1
    return 0


def _banner(http_port: int, grpc_port: int, settings: Settings, generated: str) -> None:
    """Prints a key only if Sluice generated it: a key the operator supplied is a secret that
    must not end up in a terminal's scrollback or a log file."""
    host = settings.grpc_host
    if generated:
        key_line = f"{generated}   (generated; set SLUICE_API_KEY to choose one)"
        key_value = generated
    else:
        key_line = "the one(s) you configured (SLUICE_API_KEY / SLUICE_API_KEYS; not shown)"
        key_value = "<your key>"
    print(f"""
Sluice is running (Ctrl-C stops it).
  REST, OpenAI-compatible:  http://{host}:{http_port}/v1
  gRPC (sluice.v1):         {host}:{grpc_port}
  API key:                  {key_line}
  Database:                 {_safe_url(settings.database_url)}

Try it:
  export OPENAI_BASE_URL=http://{host}:{http_port}/v1 OPENAI_API_KEY={key_value}
  curl -s $OPENAI_BASE_URL/batches -H "Authorization: Bearer $OPENAI_API_KEY"
  SLUICE_ADDRESS={host}:{grpc_port} SLUICE_API_KEY={key_value} sluice batches list
""", flush=True)


def _safe_url(url: str) -> str:
    """The database URL without its credentials."""
    return url.split("@")[-1]


if __name__ == "__main__":
    sys.exit(main())

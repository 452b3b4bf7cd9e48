"""Settings, read once from the environment (documented in README.md). A value that cannot be
used raises `ConfigError`, which the `sluice` command reports."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from service.domain.model import MAX_FILE_BYTES, MAX_REQUESTS, Limits
from service.providers.registry import ConfigError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///var/sluice.db"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw not in (None, "") else default
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _int(name: str, default: int) -> int:
    return int(_float(name, default))


def _positive(name: str, default: int) -> int:
    value = _int(name, default)
    if value < 1:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value


def parse_api_keys(raw: str) -> dict[str, str]:
    """`project=key,other=key2` → {key: project}. Keys never leave memory unhashed."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        project, sep, key = item.partition("=")
        if not sep or not project.strip() or not key.strip():
            raise ConfigError(f"SLUICE_API_KEYS entries look like project=key, got {item!r}")
        keys[key.strip()] = project.strip()
    return keys


def parse_budgets(raw: str) -> dict[str, float]:
    """`project=amount,other=amount2` (US dollars per calendar month) → {project: amount}."""
    budgets: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        project, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not project.strip() or not value >= 0:
            raise ConfigError(f"SLUICE_BUDGETS entries look like project=dollars (e.g. default=25), got {item!r}")
        budgets[project.strip()] = value
    return budgets


@dataclass(frozen=True)
class Settings:
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080
    database_url: str = DEFAULT_DATABASE_URL
    # raw key -> project; hashed before it touches storage (service/edge/auth.py)
    api_keys: dict[str, str] = field(default_factory=dict)
    providers_file: Path | None = None
    sim_latency_ms: float = 50.0
    sim_failure_rate: float = 0.0
    engine_tick_seconds: float = 0.5
    poll_seconds: float = 5.0  # how often in-flight native batches are polled
    executor_concurrency: int = 16
    lease_seconds: float = 30.0
    expiry_grace_seconds: float = 2 * 3600.0  # native batches: see the engine's watchdog
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_message_bytes: int = 64 * 1024 * 1024
    # Sluice's own limits on a batch and an uploaded file (OpenAI's by default).
    max_batch_requests: int = MAX_REQUESTS
    max_file_bytes: int = MAX_FILE_BYTES
    # project -> spend limit in US dollars per calendar month (UTC)
    budgets: dict[str, float] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return Limits(max_requests=self.max_batch_requests, max_file_bytes=self.max_file_bytes)

    @classmethod
    def from_env(cls) -> Settings:
        keys = parse_api_keys(os.environ.get("SLUICE_API_KEYS", ""))
        default_key = os.environ.get("SLUICE_API_KEY", "").strip()
        if default_key:
            keys[default_key] = "default"
        providers = os.environ.get("SLUICE_PROVIDERS_FILE", "").strip()
        return cls(
            grpc_host=os.environ.get("SLUICE_GRPC_HOST", "127.0.0.1"),
            grpc_port=_int("SLUICE_GRPC_PORT", 50051),
            http_port=_int("SLUICE_HTTP_PORT", 8080),
            database_url=os.environ.get("SLUICE_DATABASE_URL", "") or DEFAULT_DATABASE_URL,
            api_keys=keys,
            providers_file=Path(providers) if providers else None,
            sim_latency_ms=_float("SLUICE_SIM_LATENCY_MS", 50.0),
            sim_failure_rate=_float("SLUICE_SIM_FAILURE_RATE", 0.0),
            engine_tick_seconds=_float("SLUICE_ENGINE_TICK_SECONDS", 0.5),
            poll_seconds=_float("SLUICE_POLL_SECONDS", 5.0),
            executor_concurrency=_int("SLUICE_EXECUTOR_CONCURRENCY", 16),
            lease_seconds=_float("SLUICE_LEASE_SECONDS", 30.0),
            expiry_grace_seconds=_float("SLUICE_EXPIRY_GRACE_SECONDS", 2 * 3600.0),
            replica_id=os.environ.get("SLUICE_REPLICA_ID") or f"{socket.gethostname()}-{os.getpid()}",
            max_batch_requests=_positive("SLUICE_MAX_BATCH_REQUESTS", MAX_REQUESTS),
            max_file_bytes=_positive("SLUICE_MAX_FILE_BYTES", MAX_FILE_BYTES),
            budgets=parse_budgets(os.environ.get("SLUICE_BUDGETS", "")),
        )

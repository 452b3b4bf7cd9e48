"""Settings, read once from the environment (documented in README.md). A value that cannot be
used raises `ConfigError`, which the `sluice` command reports."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from service.domain.model import MAX_FILE_BYTES, MAX_INLINE_BYTES, MAX_REQUESTS, Limits
from service.edge.auth import hash_key
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


def _port(name: str) -> int | None:
    """A TCP port, 0 for any free one, or None when unset (the feature is off)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{name} must be a TCP port (0-65535), got {raw!r}")
    return int(raw)


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _positive(name: str, default: int) -> int:
    value = _int(name, default)
    if value < 1:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value
def parse_blob_url(raw: str) -> str:
    """`SLUICE_BLOB_URL`: empty (file content in the database) or `s3://bucket[/prefix]`."""
    url = raw.strip()
    if url and (not url.startswith("s3://") or not url.removeprefix("s3://").split("/", 1)[0]):
        raise ConfigError(f"SLUICE_BLOB_URL must look like s3://bucket/prefix (or be empty for the database), "
                          f"got {url[:100]!r}")
    return url.rstrip("/")


def parse_api_keys(raw: str) -> dict[str, str]:
    """`project=key,other=key2` → {key: project}. Keys never leave memory unhashed."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        project, sep, key = item.partition("=")
        if not sep or not project.strip() or not key.strip():
            raise ConfigError("SLUICE_API_KEYS entries look like project=key (an entry does not)")
        if len(project.strip()) > 128:  # the projects column; the key itself is never echoed
            raise ConfigError(f"SLUICE_API_KEYS: project names have at most 128 characters ({project[:20]!r}...)")
        keys[key.strip()] = project.strip()
    return keys


def admin_key_digest(raw: str) -> str:
    """SLUICE_ADMIN_KEY as its SHA-256 ("" when unset): the clear key goes no further than here."""
    key = raw.strip()
    if not key:
        return ""
    if len(key) < 16:
        raise ConfigError("SLUICE_ADMIN_KEY must be at least 16 characters (use a long random string)")
    return hash_key(key)


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
    # Webhook endpoints and delivery settings (YAML; README.md, "Webhooks").
    webhooks_file: Path | None = None
    # False: serve the API (watch streams included) but drive no batches and send no webhooks.
    run_engine: bool = True
    # How often a WatchBatch stream looks at its batch: bounds progress events to a few a second.
    watch_poll_seconds: float = 0.25
    # gRPC messages: a CreateBatch with inline requests is at most MAX_INLINE_BYTES (what Envoy
    # admits as JSON, the same for native gRPC); responses (result pages) may be larger.
    max_receive_bytes: int = MAX_INLINE_BYTES
    max_send_bytes: int = 64 * 1024 * 1024
    auth_cache_seconds: float = 5.0  # another replica's key removal holds here within this
    upstream_timeout_seconds: float = 120.0  # Envoy: unary deadline, and idle limit of streams
    stale_upload_seconds: float = 900.0  # an upload with no chunk for this long is removed
    deleted_file_grace_seconds: float = 3600.0  # a deleted file's content is kept this long
    # SHA-256 of SLUICE_ADMIN_KEY (the admin API's key; never kept in clear); "": admin API off.
    admin_key_sha256: str = ""
    # Prometheus metrics on their own HTTP port (None: off); Envoy's /metrics reaches them from
    # loopback clients only, unless metrics_public (README "Metrics and traces").
    metrics_port: int | None = None
    metrics_host: str = ""  # default: grpc_host
    metrics_public: bool = False
    # Sluice's own limits on a batch and an uploaded file (OpenAI's by default).
    max_batch_requests: int = MAX_REQUESTS
    max_file_bytes: int = MAX_FILE_BYTES
    # project -> spend limit in US dollars per calendar month (UTC)
    budgets: dict[str, float] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return Limits(max_requests=self.max_batch_requests, max_file_bytes=self.max_file_bytes)
    blob_url: str = ""  # file content: "" for the database, or s3://bucket/prefix

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
            webhooks_file=Path(webhooks) if (webhooks := os.environ.get("SLUICE_WEBHOOKS_FILE", "").strip()) else None,
            run_engine=_bool("SLUICE_RUN_ENGINE", True),
            auth_cache_seconds=_float("SLUICE_AUTH_CACHE_SECONDS", 5.0),
            upstream_timeout_seconds=_float("SLUICE_UPSTREAM_TIMEOUT_SECONDS", 120.0),
            stale_upload_seconds=_float("SLUICE_STALE_UPLOAD_SECONDS", 900.0),
            deleted_file_grace_seconds=_float("SLUICE_DELETED_FILE_GRACE_SECONDS", 3600.0),
            admin_key_sha256=admin_key_digest(os.environ.get("SLUICE_ADMIN_KEY", "")),
            metrics_port=_port("SLUICE_METRICS_PORT"),
            metrics_host=os.environ.get("SLUICE_METRICS_HOST", "").strip(),
            metrics_public=_bool("SLUICE_METRICS_PUBLIC", False),
            max_batch_requests=_positive("SLUICE_MAX_BATCH_REQUESTS", MAX_REQUESTS),
            max_file_bytes=_positive("SLUICE_MAX_FILE_BYTES", MAX_FILE_BYTES),
            budgets=parse_budgets(os.environ.get("SLUICE_BUDGETS", "")),
            blob_url=parse_blob_url(os.environ.get("SLUICE_BLOB_URL", "")),
        )


@dataclass(frozen=True)
class ClientSettings:
    """Where the `sluice batches|files` commands send their RPCs, and with which key."""

    address: str = "127.0.0.1:50051"
    api_key: str = ""

    @classmethod
    def from_env(cls) -> ClientSettings:
        return cls(address=os.environ.get("SLUICE_ADDRESS", "").strip() or "127.0.0.1:50051",
                   api_key=os.environ.get("SLUICE_API_KEY", "").strip())

"""The grpc.aio server: wiring, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.edge import convert
from service.edge.admin_service import AdminGate, AdminServicer
from service.edge.auth import Authenticator, hash_key
from service.edge.batch_service import BatchServicer
from service.edge.file_service import FileServicer
from service.edge.grpc_errors import add_servicer
from service.edge.webhook_service import WebhookServicer
from service.engine.capacity import SharedCapacity
from service.engine.engine import Engine, EngineSettings
from service.engine.output_files import OutputFiles
from service.engine.webhooks import (
    DestinationPolicy,
    WebhookConfig,
    WebhookConfigError,
    WebhookDispatcher,
    load_webhooks,
    new_secret,
)
from service.intake.file_inputs import BatchInputs
from service.providers.registry import ConfigError, build_router
from service.providers.routing import Router
from service.runtime.config import Settings
from service.runtime.envoy import EnvoyError, EnvoyProcess, render_config
from service.runtime.observability import Observability, start_observability
from service.runtime.sweeper import FileSweeper
from service.storage.admin import AdminStore, redact
from service.storage.blobs import BlobStore
from service.storage.db import create_engine, migrate
from service.storage.repository import Store
from service.storage.s3_blobs import S3Blobs
from service.storage.webhooks import WebhookStore
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    batch_pb2,
    batch_pb2_grpc,
    file_pb2,
    file_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

log = logging.getLogger(__name__)
METADATA_LIMIT = 128 * 1024
SERVICE_NAMES = (batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name,
                 file_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
                 webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)


@dataclass
class App:
    server: grpc.aio.Server
    store: Store
    engine: Engine
    router: Router
    health: health.aio.HealthServicer
    port: int
    capacity: SharedCapacity
    sweeper: FileSweeper | None = None
    webhooks: WebhookDispatcher | None = None
    # Set first thing on stop: watch streams end rather than hold the shutdown for `grace`.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    observability: Observability = field(default_factory=Observability)

    async def stop(self, grace: float = 10.0) -> None:
        """In-flight RPCs get `grace` seconds; the engine finishes its current steps."""
        self.closing.set()
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.sweeper is not None:
            await self.sweeper.stop()
        await self.engine.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.capacity.aclose()
        await self.router.aclose()
        self.observability.stop()
        await self.store.close()


def webhook_config(settings: Settings) -> WebhookConfig:
    if settings.webhooks_file is None:
        return WebhookConfig()
    try:
        return load_webhooks(settings.webhooks_file, os.environ)
    except WebhookConfigError as exc:
        raise SystemExit(f"sluice: {exc}") from None


async def open_blobs(settings: Settings) -> BlobStore | None:
    """Object storage when `SLUICE_BLOB_URL` names it (checked now: a wrong bucket, endpoint or
    credentials stop the start with a clear message), else None: the database keeps file content."""
    if not settings.blob_url:
        return None
    try:
        blobs = S3Blobs(settings.blob_url)
        await blobs.check()
    except Exception as exc:
        raise ConfigError(f"SLUICE_BLOB_URL {settings.blob_url}: cannot use the object store ({exc})") from None
    log.info("file content in object storage at %s", settings.blob_url)
    return blobs


async def start(settings: Settings, router: Router | None = None) -> App:
    webhooks = webhook_config(settings)
    await migrate(settings.database_url)
    store = Store(create_engine(settings.database_url), blobs=await open_blobs(settings),
                  encode_response=convert.response_bytes)
    webhook_store = WebhookStore(store.engine)
    for endpoint_id, secret in (await webhook_store.sync_endpoints(webhooks.endpoints, new_secret)).items():
        # Shown once (stdout, never the log): the receiver needs it to verify signatures.
        print(f"Webhook endpoint '{endpoint_id}': signing secret {secret}\n"
              "  (generated now and shown only this once; give it to the receiver, or put `secret:` in the "
              "webhooks file)", flush=True)
    auth = Authenticator(store, cache_seconds=settings.auth_cache_seconds)
    await auth.register(settings.api_keys)
    admin_store = AdminStore(store)
    await admin_store.sync_config_projects(settings.api_keys.values())
    await admin_store.label_config_keys({hash_key(k): redact(k) for k in settings.api_keys})
    router = router or build_router(settings.providers_file, sim_latency_ms=settings.sim_latency_ms,
                                    sim_failure_rate=settings.sim_failure_rate,
                                    executor_concurrency=settings.executor_concurrency)
    capacity = SharedCapacity(store, router, settings.replica_id, settings.lease_seconds)
    engine = Engine(store, router, EngineSettings(
        replica_id=settings.replica_id, tick_seconds=settings.engine_tick_seconds,
        lease_seconds=settings.lease_seconds, poll_seconds=settings.poll_seconds,
        expiry_grace_seconds=settings.expiry_grace_seconds), finalizer=OutputFiles(store), capacity=capacity)

    observability = start_observability(settings, store, router)
    server = grpc.aio.server(interceptors=observability.interceptors, options=[
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.max_send_message_length", settings.max_send_bytes),
        # Above what Envoy admits (32 KiB of request headers, which it may forward with the path
        # twice), so oversized headers are Envoy's clean 431 and never gRPC's RESOURCE_EXHAUSTED
        # (a 429 that SDKs retry, and whose message lists the request's headers).
        ("grpc.max_metadata_size", METADATA_LIMIT),
        ("grpc.absolute_max_metadata_size", METADATA_LIMIT),
        # A fixed 4 MiB receive window per stream instead of BDP auto-tuning, which lets a busy
        # server buffer tens of MB of a streaming upload in gRPC's core (169 MB peak RSS against
        # 114 MB for a 200 MB upload under CPU load); 4 MiB still fills a fast WAN link.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
    ])
    closing = asyncio.Event()
    add_servicer(batch_pb2_grpc.add_BatchServiceServicer_to_server,
                 BatchServicer(store, auth, router, engine.wake, BatchInputs(store, settings.limits), settings.limits,
                               settings.budgets, watch_poll_seconds=settings.watch_poll_seconds, closing=closing,
                               admin=admin_store),
                 server)
    add_servicer(file_pb2_grpc.add_FileServiceServicer_to_server, FileServicer(store, auth, settings.limits), server)
    add_servicer(webhook_pb2_grpc.add_WebhookServiceServicer_to_server, WebhookServicer(webhook_store, auth), server)
    add_servicer(admin_pb2_grpc.add_AdminServiceServicer_to_server,
                 AdminServicer(admin_store, AdminGate(settings.admin_key_sha256, auth),
                               DestinationPolicy(webhooks.allow_networks)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    if port == 0:
        raise ConfigError(f"cannot listen on {settings.grpc_host}:{settings.grpc_port} (port in use?)")
    await server.start()
    dispatcher = sweeper = None
    if settings.run_engine:  # background work: batches, webhook deliveries, file clean-up
        engine.start()
        sweeper = FileSweeper(store, settings.stale_upload_seconds, settings.deleted_file_grace_seconds,
                              owner=settings.replica_id)
        sweeper.start()
        # Always: the admin API may add endpoints at any time, on any replica.
        dispatcher = WebhookDispatcher(webhook_store, webhooks, settings.replica_id)
        dispatcher.start()
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("sluice gRPC listening on %s:%d (database %s)", settings.grpc_host, port,
             settings.database_url.split("@")[-1])
    if observability.metrics_port is not None:
        log.info("sluice metrics on http://%s:%d/metrics", settings.metrics_host or settings.grpc_host,
                 observability.metrics_port)
    return App(server, store, engine, router, health_servicer, port, capacity, sweeper, dispatcher, closing,
               observability=observability)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")


async def serve(settings: Settings, ready_line: bool = False) -> None:
    """Run the gRPC server until SIGTERM/SIGINT, then shut down gracefully."""
    app = await start(settings)
    if ready_line:
        print(f"LISTENING {app.port}", flush=True)
    await _until_signal()
    await app.stop()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_free(host: str, port: int) -> None:
    """Envoy's "is it listening" check would take another program's listener for Envoy's."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Envoy: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot serve REST on {host}:{port} ({exc.strerror}): "
                             "set SLUICE_HTTP_PORT to a free port") from None


async def _until_signal_or_envoy_exit(envoy: EnvoyProcess, every: float = 0.5) -> None:
    """Until SIGTERM/SIGINT; raise EnvoyError if Envoy exits on its own meanwhile."""
    signalled = asyncio.ensure_future(_until_signal())
    try:
        while not signalled.done():
            if not envoy.running:
                # Ctrl-C in a terminal reaches Envoy too: give our own handler the chance to win.
                await asyncio.wait({signalled}, timeout=every)
                if not signalled.done():
                    raise EnvoyError(f"envoy (the REST edge) exited on its own; stopping.\n{envoy.log_tail()}")
                break
            await asyncio.wait({signalled}, timeout=every)
    finally:
        signalled.cancel()


async def run_with_envoy(settings: Settings, work_dir: Path, banner: Callable[[int, int], None]) -> None:
    """The gRPC server plus Envoy's REST edge in front of it, until SIGTERM/SIGINT (or Envoy dies)."""
    _check_port_free(settings.grpc_host, settings.http_port)
    app = await start(settings)
    config = render_config(settings.grpc_host, settings.http_port, app.port, _free_port(settings.grpc_host),
                           work_dir, grpc_host=settings.grpc_host, upstream_timeout=settings.upstream_timeout_seconds,
                           metrics_port=app.observability.metrics_port, metrics_public=settings.metrics_public,
                           metrics_host=settings.metrics_host or settings.grpc_host)
    envoy = EnvoyProcess(config, settings.grpc_host, settings.http_port)
    try:
        await asyncio.to_thread(envoy.start)
        banner(settings.http_port, app.port)
        await _until_signal_or_envoy_exit(envoy)
    finally:
        await asyncio.to_thread(envoy.stop)
        await app.stop()

"""Webhook delivery: signed POSTs of batch events to each project's endpoints, in the background.

Events come from the outbox (`service/storage/webhooks.py`), written in the transaction that
ends a batch. Every replica runs a `WebhookDispatcher`; deliveries are leased row by row, so two
replicas never send the same attempt, and an attempt interrupted by a crash is retried when its
lease runs out. Each attempt is signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`,
`webhook-signature`, via the `standardwebhooks` package); the event id is the `webhook-id`, the
same on every attempt, so receivers can deduplicate. Failures (no answer, a non-2xx status) are
retried with exponential backoff and jitter until 24 hours after the event; then the delivery is
marked failed. Delivery never touches the batch: a receiver that is down delays nothing.

Destinations that resolve to loopback, private, link-local or other non-public addresses are
refused unless a network in `allow_networks` contains them (server-side request forgery). The
address is checked after resolution and the connection goes to that checked address, so a DNS
answer that changes between check and connect cannot slip through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from standardwebhooks.webhooks import Webhook

from service.domain import telemetry
from service.domain.events import (
    ALL_WEBHOOK_EVENT_TYPES,
    PROGRESS_EVENT_TYPE,
    TERMINAL_WEBHOOK_EVENT_TYPES,
    progress_subscription,
    webhook_payload,
)
from service.domain.model import now
from service.storage.webhooks import DELIVERED, FAILED, PENDING, AttemptOutcome, DeliveryJob, EndpointSpec, WebhookStore

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_AGENT = "Sluice-Webhooks/1"
REFUSED = "webhooks to it are refused (add its network to allow_networks in the webhooks file to allow it)"


class WebhookConfigError(ValueError):
    """The webhooks file is invalid; the message says where and why."""


@dataclass(frozen=True)
class DeliverySettings:
    timeout_seconds: float = 10.0
    first_retry_seconds: float = 5.0
    max_retry_seconds: float = 3600.0
    give_up_after_seconds: float = 24 * 3600.0
    poll_seconds: float = 1.0
    concurrency: int = 8
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class WebhookConfig:
    endpoints: tuple[EndpointSpec, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()
    delivery: DeliverySettings = field(default_factory=DeliverySettings)


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def load_webhooks(path: Path, environ: Mapping[str, str]) -> WebhookConfig:
    """Read the webhooks file (format in README.md, "Webhooks"). Raises WebhookConfigError."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WebhookConfigError(f"cannot read webhooks file {path}: {exc}") from None
    return parse_webhooks(raw or {}, environ, where=str(path))


def parse_webhooks(raw: Any, environ: Mapping[str, str], where: str = "webhooks") -> WebhookConfig:
    if not isinstance(raw, dict):
        raise WebhookConfigError(f"{where}: expected a mapping with a `webhooks:` list")
    unknown = set(raw) - {"webhooks", "allow_networks", "delivery"}
    if unknown:
        raise WebhookConfigError(f"{where}: unknown keys {sorted(unknown)} (expected webhooks, allow_networks, "
                                 "delivery)")
    allow = tuple(_network(n, where) for n in _list(raw.get("allow_networks"), f"{where}: allow_networks"))
    delivery = _delivery(raw.get("delivery") or {}, where)
    policy = DestinationPolicy(allow)
    endpoints: list[EndpointSpec] = []
    for i, item in enumerate(_list(raw.get("webhooks"), f"{where}: webhooks")):
        spec = _endpoint(item, environ, f"{where}: webhooks[{i}]")
        if any(e.id == spec.id for e in endpoints):
            raise WebhookConfigError(f"{where}: webhooks[{i}]: id {spec.id!r} is used twice")
        literal = policy.literal_refusal(spec.url)
        if literal:
            raise WebhookConfigError(f"{where}: webhooks[{i}] ({spec.id}): {literal}")
        endpoints.append(spec)
    return WebhookConfig(tuple(endpoints), allow, delivery)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise WebhookConfigError(f"{where}: expected a list")
    return value


def _network(value: Any, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise WebhookConfigError(f"{where}: allow_networks: {value!r} is not a network like 127.0.0.0/8") from None


def _delivery(raw: Any, where: str) -> DeliverySettings:
    if not isinstance(raw, dict):
        raise WebhookConfigError(f"{where}: delivery: expected a mapping")
    names = {"timeout_seconds", "first_retry_seconds", "max_retry_seconds", "give_up_after_hours", "poll_seconds"}
    if set(raw) - names:
        raise WebhookConfigError(f"{where}: delivery: unknown keys {sorted(set(raw) - names)}")
    values: dict[str, float] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise WebhookConfigError(f"{where}: delivery: {name} must be a positive number, got {value!r}")
        values[name] = float(value)
    if "give_up_after_hours" in values:
        values["give_up_after_seconds"] = values.pop("give_up_after_hours") * 3600
    return DeliverySettings(**values)  # type: ignore[arg-type]  # only the float fields are named


def _endpoint(item: Any, environ: Mapping[str, str], where: str) -> EndpointSpec:
    if not isinstance(item, dict):
        raise WebhookConfigError(f"{where}: expected a mapping with id and url")
    unknown = set(item) - {"id", "project", "url", "events", "progress_thresholds", "secret", "secret_env"}
    if unknown:
        raise WebhookConfigError(f"{where}: unknown keys {sorted(unknown)}")
    endpoint_id = str(item.get("id") or "")
    if not _ID.match(endpoint_id):
        raise WebhookConfigError(f"{where}: id must be 1-64 letters, digits, '.', '_' or '-', got {endpoint_id!r}")
    url = str(item.get("url") or "")
    parsed = httpx.URL(url) if url else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise WebhookConfigError(f"{where}: url must be an http:// or https:// URL, got {url!r}")
    events = item.get("events") or list(TERMINAL_WEBHOOK_EVENT_TYPES)
    if not isinstance(events, list) or not events or any(e not in ALL_WEBHOOK_EVENT_TYPES for e in events):
        raise WebhookConfigError(f"{where}: events must be a list of {', '.join(ALL_WEBHOOK_EVENT_TYPES)}; "
                                 f"got {events!r}")
    raw_thresholds = item.get("progress_thresholds")
    if raw_thresholds is not None and (not isinstance(raw_thresholds, list) or not raw_thresholds):
        raise WebhookConfigError(f"{where}: progress_thresholds must be a list of whole percents from 1 to 99, "
                                 f"got {raw_thresholds!r}")
    if raw_thresholds and item.get("events") and PROGRESS_EVENT_TYPE not in events:
        raise WebhookConfigError(f"{where}: progress_thresholds is set but events does not list {PROGRESS_EVENT_TYPE}")
    try:
        events, thresholds = progress_subscription(events, raw_thresholds or ())
    except ValueError as exc:
        raise WebhookConfigError(f"{where}: {exc}") from None
    secret = item.get("secret")
    if item.get("secret_env"):
        secret = environ.get(str(item["secret_env"]))
        if not secret:
            raise WebhookConfigError(f"{where}: secret_env names {item['secret_env']}, which is not set")
    if secret is not None:
        secret = str(secret)
        try:
            key_ok = secret.startswith("whsec_") and len(base64.b64decode(secret[6:], validate=True)) >= 24
        except ValueError:
            key_ok = False
        if not key_ok:
            raise WebhookConfigError(f"{where}: secret must be 'whsec_' and at least 24 bytes in base64 "
                                     "(leave it out and Sluice generates one)")
    return EndpointSpec(id=endpoint_id, project=str(item.get("project") or "default"), url=url,
                        event_types=tuple(dict.fromkeys(events)), secret=secret, progress_thresholds=thresholds)




# --------------------------------------------------------------------------- destinations


class DestinationRefused(Exception):
    """The destination is not a public address and no allowed network contains it."""


@dataclass(frozen=True)
class Target:
    """Where one attempt connects: the checked address, with the original host for Host/SNI."""

    url: httpx.URL
    headers: dict[str, str]
    extensions: dict[str, Any]


def _why_blocked(ip: IPAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    for label, test in (("a loopback", ip.is_loopback), ("a link-local", ip.is_link_local),
                        ("a multicast", ip.is_multicast), ("an unspecified", ip.is_unspecified),
                        ("a private", ip.is_private)):
        if test:
            return label
    return "a non-public"


class DestinationPolicy:
    def __init__(self, allow: tuple[IPNetwork, ...] = ()) -> None:
        self.allow = allow

    def refusal(self, ip: IPAddress) -> str | None:
        """What kind of non-public address `ip` is ("a private"), or None if it may be a destination."""
        why = _why_blocked(ip)
        if why is None or any(ip in net for net in self.allow if net.version == ip.version):
            return None
        return why

    def literal_refusal(self, url: str) -> str | None:
        """For a URL whose host is an IP address: why it is refused, if it is."""
        host = httpx.URL(url).host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        why = self.refusal(ip)
        return f"{ip} is {why} address: {REFUSED}" if why else None

    async def target(self, url: str) -> Target:
        """Resolve the URL's host, refuse it if any of its addresses is refused, and return a
        target that connects to the first address. Raises DestinationRefused, or OSError when the
        name does not resolve (worth retrying)."""
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        for ip in addresses:
            why = self.refusal(ip)
            if why:
                where = f"{ip} is" if str(ip) == parsed.host else f"{parsed.host} resolves to {ip},"
                raise DestinationRefused(f"{where} {why} address: {REFUSED}")
        if not addresses:
            raise OSError(f"{parsed.host} did not resolve")
        host_header = parsed.netloc.decode("ascii")
        extensions: dict[str, Any] = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        return Target(parsed.copy_with(host=str(addresses[0])), {"host": host_header}, extensions)


# --------------------------------------------------------------------------- the worker


def retry_delay(attempt: int, settings: DeliverySettings) -> float:
    """Exponential backoff with jitter after the `attempt`-th failure: base 5 s, 10 s, 20 s, ...
    capped at an hour; each delay drawn from [half, full] so retries of many events spread out."""
    delay = min(settings.first_retry_seconds * 2 ** (attempt - 1), settings.max_retry_seconds)
    return float(delay / 2 + random.uniform(0, delay / 2))


class WebhookDispatcher:
    """Claims due deliveries and attempts them, `concurrency` at a time, until stopped."""

    def __init__(self, store: WebhookStore, config: WebhookConfig, replica_id: str,
                 client: httpx.AsyncClient | None = None) -> None:
        self.store = store
        self.settings = config.delivery
        self.policy = DestinationPolicy(config.allow_networks)
        self.replica_id = replica_id
        self._client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                                   headers={"user-agent": USER_AGENT})
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sluice-webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Stop claiming; give attempts in flight a moment, then cancel them (their leases are
        handed back, so another replica or the next start retries them at once)."""
        self._stopping = True
        self._wake.set()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self._running.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                free = self.settings.concurrency - len(self._running)
                if free > 0:
                    for key in await self.store.claim(self.replica_id, self.settings.lease_seconds, free):
                        if key not in self._running:
                            self._running[key] = asyncio.create_task(self._deliver(*key))
            except Exception:
                log.exception("webhooks: claiming deliveries failed; retrying at the next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
            self._wake.clear()

    async def _deliver(self, event_id: str, endpoint_id: str) -> None:
        try:
            job = await self.store.job(event_id, endpoint_id)
            started = time.monotonic()
            outcome = await self.attempt(job)
            telemetry.current().webhook_attempt(_OUTCOME[outcome.status], time.monotonic() - started)
            if not await self.store.finish_attempt(event_id, endpoint_id, self.replica_id, outcome):
                log.warning("webhooks: lost the lease on %s -> %s; another replica has it", event_id, endpoint_id)
            elif outcome.status == DELIVERED:
                log.info("webhooks: %s delivered to %s (attempt %d)", event_id, endpoint_id, outcome.attempt)
            else:
                log.warning("webhooks: %s to %s, attempt %d: %s; %s", event_id, endpoint_id, outcome.attempt,
                            outcome.error, "giving up" if outcome.status == FAILED else
                            f"next try in {max((outcome.next_attempt_at or 0) - time.time(), 0):.1f}s")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(event_id, endpoint_id, self.replica_id))
            raise
        except Exception:
            log.exception("webhooks: delivering %s to %s failed; retrying when its lease runs out",
                          event_id, endpoint_id)
        finally:
            self._running.pop((event_id, endpoint_id), None)
            if not self._stopping:
                self._wake.set()

    async def attempt(self, job: DeliveryJob) -> AttemptOutcome:
        """One signed POST of the event to the endpoint, and what follows from its answer."""
        event, attempt = job.event, job.delivery.attempts + 1
        payload = json.dumps(webhook_payload(event.id, event.type, event.created_at, event.batch_id, event.progress),
                             separators=(",", ":"))
        attempted_at, started = now(), time.monotonic()
        status_code: int | None = None
        try:
            target = await self.policy.target(job.endpoint.url)
            timestamp = int(time.time())
            signature = Webhook(job.endpoint.secret).sign(event.id, datetime.fromtimestamp(timestamp, tz=UTC),
                                                          payload)
            headers = {**target.headers, "content-type": "application/json", "webhook-id": event.id,
                       "webhook-timestamp": str(timestamp), "webhook-signature": signature}
            async with self._client.stream("POST", target.url, content=payload.encode(), headers=headers,
                                           extensions=target.extensions,
                                           timeout=self.settings.timeout_seconds) as response:
                status_code = response.status_code
            error = None if 200 <= status_code < 300 else f"the endpoint answered HTTP {status_code}"
        except DestinationRefused as exc:
            return AttemptOutcome(attempt, attempted_at, None, str(exc), _ms(started), FAILED)
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (no answer)"
        if error is None:
            return AttemptOutcome(attempt, attempted_at, status_code, None, _ms(started), DELIVERED)
        retry_at = time.time() + retry_delay(attempt, self.settings)
        if retry_at > event.created_at + self.settings.give_up_after_seconds:
            hours = self.settings.give_up_after_seconds / 3600
            return AttemptOutcome(attempt, attempted_at, status_code, f"{error}; gave up after {attempt} attempts "
                                  f"over {hours:g} h", _ms(started), FAILED)
        return AttemptOutcome(attempt, attempted_at, status_code, error, _ms(started), PENDING, retry_at)


# Delivery status after an attempt -> the metrics' outcome label.
_OUTCOME = {DELIVERED: "delivered", PENDING: "retrying", FAILED: "failed"}


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

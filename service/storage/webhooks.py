"""Webhook storage: endpoints, the outbox of batch events, deliveries and their attempts.

The outbox is transactional: `record_batch_ended` runs inside the transaction that moves a batch
to its terminal status (`Store.transition`, or `Store.create_batch` for a batch that fails at
creation), so an ended batch always has its event and a batch never has an event it did not
earn, whatever crashes. It writes one event row and one pending delivery per enabled endpoint of
the batch's project that asked for the event's type.

Delivery workers on every replica share the pending deliveries the way engines share batches:
a compare-and-set on the lease columns claims a row, and an attempt's outcome is stored only by
the replica that still holds the lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, case, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.domain.errors import NotFound
from service.domain.events import PROGRESS_EVENT_TYPE, WEBHOOK_EVENT_TYPES, thresholds_passed
from service.domain.model import BatchStatus, now
from service.storage.db import insert_for
from service.storage.tables import (
    BatchRow,
    PartRow,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookEventRow,
)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def event_id_for(batch_id: str) -> str:
    """A batch ends once (a compare-and-set guarantees it), so its terminal event's id derives
    from the batch id: stable, and a second write of the same event would be a key conflict."""
    return "evt_" + batch_id.removeprefix("batch_")


async def record_batch_ended(session: AsyncSession, batch_id: str, status: BatchStatus) -> None:
    """Add the batch's terminal event and its deliveries to the outbox, in the caller's
    transaction. No-op for a status that is not terminal."""
    event_type = WEBHOOK_EVENT_TYPES.get(status)
    if event_type is None:
        return
    project = await session.scalar(select(BatchRow.project).where(BatchRow.id == batch_id))
    if project is None:
        return
    event_id, created = event_id_for(batch_id), now()
    await session.execute(insert(WebhookEventRow).values(
        id=event_id, project=project, type=event_type, batch_id=batch_id, created_at=created))
    subscribed = select(
        literal(event_id), WebhookEndpointRow.id, literal(PENDING), literal(0), literal(time.time()),
        literal(created),
    ).where(WebhookEndpointRow.project == project, WebhookEndpointRow.enabled.is_(True),
            WebhookEndpointRow.event_types.contains(event_type))
    await session.execute(insert(WebhookDeliveryRow).from_select(
        ["event_id", "endpoint_id", "status", "attempts", "next_attempt_at", "created_at"], subscribed))


async def record_progress(session: AsyncSession, batch_id: str) -> None:
    """Add a `batch.progress` event for each threshold, asked for by an endpoint of the batch's
    project, that the batch has passed, in the caller's transaction (the one that counted lines):
    one event per batch and threshold, shared by the endpoints that asked for it, and writing it
    again is a no-op, so each endpoint gets each threshold once, whatever the order of updates.

    A line counts as ended when its result is stored, or, for a native part still running at its
    provider, when the provider's own counts say so (whichever is more).

    It runs in every transaction that stores results or a provider's counts, and almost always
    nobody asked for progress: the batch's counts and the endpoints that asked come in one
    statement, and that is all it costs then."""
    subscribed = (await session.execute(
        select(BatchRow.project, BatchRow.total, BatchRow.completed + BatchRow.failed, WebhookEndpointRow.id,
               WebhookEndpointRow.progress_thresholds)
        .join(WebhookEndpointRow, and_(WebhookEndpointRow.project == BatchRow.project,
                                       WebhookEndpointRow.enabled.is_(True),
                                       WebhookEndpointRow.event_types.contains(PROGRESS_EVENT_TYPE)))
        .where(BatchRow.id == batch_id))).all()
    if not subscribed or not subscribed[0][1]:
        return
    project, total, stored = subscribed[0][:3]
    endpoints = [(endpoint_id, thresholds) for *_, endpoint_id, thresholds in subscribed]
    part_stored = PartRow.completed + PartRow.failed
    part_reported = func.coalesce(PartRow.provider_completed, 0) + func.coalesce(PartRow.provider_failed, 0)
    by_parts = await session.scalar(select(func.sum(case((part_stored >= part_reported, part_stored),
                                                         else_=part_reported))).where(PartRow.batch_id == batch_id))
    ended = max(int(stored or 0), int(by_parts or 0))
    created = now()
    dialect = session.get_bind().dialect.name
    for endpoint_id, thresholds in endpoints:
        wanted = [int(t) for t in thresholds.split(",") if t]
        for threshold in thresholds_passed(0, ended, total, wanted):
            event_id = f"{event_id_for(batch_id)}_p{threshold}"
            await session.execute(insert_for(dialect, WebhookEventRow).values(
                id=event_id, project=project, type=PROGRESS_EVENT_TYPE, batch_id=batch_id, created_at=created,
                progress=threshold).on_conflict_do_nothing(index_elements=["id"]))
            await session.execute(insert_for(dialect, WebhookDeliveryRow).values(
                event_id=event_id, endpoint_id=endpoint_id, status=PENDING, attempts=0, next_attempt_at=time.time(),
                created_at=created).on_conflict_do_nothing(index_elements=["event_id", "endpoint_id"]))


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint as the configuration declares it. `secret=None`: generate one."""

    id: str
    project: str
    url: str
    event_types: tuple[str, ...]
    secret: str | None = None
    progress_thresholds: tuple[int, ...] = ()


@dataclass(frozen=True)
class DeliveryJob:
    """Everything one delivery attempt needs."""

    event: WebhookEventRow
    endpoint: WebhookEndpointRow
    delivery: WebhookDeliveryRow


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt came to, and what happens next: `status` pending (retry at
    `next_attempt_at`), delivered, or failed (given up)."""

    attempt: int
    attempted_at: int
    status_code: int | None
    error: str | None
    duration_ms: int
    status: str
    next_attempt_at: float | None = None


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery with its event and every attempt so far (oldest first), for reading."""

    delivery: WebhookDeliveryRow
    event: WebhookEventRow
    attempts: list[WebhookAttemptRow]


class WebhookStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name

    def _insert(self, table: type) -> postgresql.Insert | sqlite.Insert:
        return insert_for(self._dialect, table)

    # --- configuration ----------------------------------------------------------------------

    async def sync_endpoints(self, specs: Sequence[EndpointSpec], new_secret: Callable[[], str]) -> dict[str, str]:
        """Make the stored endpoints match the configuration: add new ones, update changed ones,
        disable those no longer configured (their history stays readable). A secret given in the
        configuration replaces the stored one. Returns {endpoint id: secret} for the secrets
        generated now, which the caller shows once; replicas starting together agree on one
        secret (insert-if-absent), and only the one that stored it reports it."""
        generated: dict[str, str] = {}
        t = now()
        for spec in specs:
            fields = {"project": spec.project, "url": spec.url, "event_types": ",".join(spec.event_types),
                      "progress_thresholds": ",".join(map(str, spec.progress_thresholds)),
                      "enabled": True, "updated_at": t}
            async with self.sessions.begin() as s:
                secret = spec.secret or new_secret()
                res = await s.execute(self._insert(WebhookEndpointRow).values(
                    id=spec.id, secret=secret, created_at=t, **fields).on_conflict_do_nothing(index_elements=["id"]))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    if spec.secret is None:
                        generated[spec.id] = secret
                    continue
                await s.execute(update(WebhookEndpointRow).where(WebhookEndpointRow.id == spec.id).values(
                    **fields, **({"secret": spec.secret} if spec.secret else {})))
        async with self.sessions.begin() as s:
            await s.execute(update(WebhookEndpointRow).where(
                WebhookEndpointRow.id.not_in([spec.id for spec in specs]), WebhookEndpointRow.enabled.is_(True),
                WebhookEndpointRow.source == "config",  # endpoints of the admin API are not the file's
            ).values(enabled=False, updated_at=t))
        return generated

    # --- delivery workers -----------------------------------------------------------------------

    async def claim(self, owner: str, lease_seconds: float, limit: int) -> list[tuple[str, str]]:
        """Lease up to `limit` due deliveries to enabled endpoints: (event id, endpoint id)."""
        t = time.time()
        free = or_(WebhookDeliveryRow.lease_owner.is_(None), WebhookDeliveryRow.lease_until < t)
        due = and_(WebhookDeliveryRow.status == PENDING, WebhookDeliveryRow.next_attempt_at <= t, free)
        async with self.sessions() as s:
            candidates = (await s.execute(
                select(WebhookDeliveryRow.event_id, WebhookDeliveryRow.endpoint_id)
                .join(WebhookEndpointRow, WebhookEndpointRow.id == WebhookDeliveryRow.endpoint_id)
                .where(due, WebhookEndpointRow.enabled.is_(True))
                .order_by(WebhookDeliveryRow.next_attempt_at).limit(limit))).all()
        claimed = []
        for event_id, endpoint_id in candidates:
            async with self.sessions.begin() as s:
                res = await s.execute(update(WebhookDeliveryRow).where(
                    WebhookDeliveryRow.event_id == event_id, WebhookDeliveryRow.endpoint_id == endpoint_id, due,
                ).values(lease_owner=owner, lease_until=t + lease_seconds))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append((event_id, endpoint_id))
        return claimed

    async def job(self, event_id: str, endpoint_id: str) -> DeliveryJob:
        async with self.sessions() as s:
            row = (await s.execute(
                select(WebhookDeliveryRow, WebhookEventRow, WebhookEndpointRow)
                .join(WebhookEventRow, WebhookEventRow.id == WebhookDeliveryRow.event_id)
                .join(WebhookEndpointRow, WebhookEndpointRow.id == WebhookDeliveryRow.endpoint_id)
                .where(WebhookDeliveryRow.event_id == event_id, WebhookDeliveryRow.endpoint_id == endpoint_id),
            )).one()
        delivery, event, endpoint = row
        return DeliveryJob(event=event, endpoint=endpoint, delivery=delivery)

    async def finish_attempt(self, event_id: str, endpoint_id: str, owner: str, outcome: AttemptOutcome) -> bool:
        """Store an attempt and the delivery's next state, and hand the lease back, in one
        transaction, if this worker still holds the lease (False otherwise: another replica took
        the delivery over after the lease ran out, and its view wins)."""
        async with self.sessions.begin() as s:
            res = await s.execute(update(WebhookDeliveryRow).where(
                WebhookDeliveryRow.event_id == event_id, WebhookDeliveryRow.endpoint_id == endpoint_id,
                WebhookDeliveryRow.lease_owner == owner,
            ).values(
                status=outcome.status, attempts=outcome.attempt, last_status_code=outcome.status_code,
                last_error=outcome.error, lease_owner=None, lease_until=None,
                finished_at=None if outcome.status == PENDING else outcome.attempted_at,
                **({"next_attempt_at": outcome.next_attempt_at} if outcome.next_attempt_at is not None else {}),
            ))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False
            await s.execute(self._insert(WebhookAttemptRow).values(
                event_id=event_id, endpoint_id=endpoint_id, attempt=outcome.attempt,
                attempted_at=outcome.attempted_at, status_code=outcome.status_code, error=outcome.error,
                duration_ms=outcome.duration_ms,
            ).on_conflict_do_nothing(index_elements=["event_id", "endpoint_id", "attempt"]))
        return True

    async def release(self, event_id: str, endpoint_id: str, owner: str) -> None:
        """Hand a lease back without an attempt (shutting down mid-attempt)."""
        async with self.sessions.begin() as s:
            await s.execute(update(WebhookDeliveryRow).where(
                WebhookDeliveryRow.event_id == event_id, WebhookDeliveryRow.endpoint_id == endpoint_id,
                WebhookDeliveryRow.lease_owner == owner).values(lease_owner=None, lease_until=None))

    # --- reading, per project ----------------------------------------------------------------------

    async def list_endpoints(self, project: str) -> list[WebhookEndpointRow]:
        async with self.sessions() as s:
            return list((await s.scalars(select(WebhookEndpointRow).where(WebhookEndpointRow.project == project)
                                         .order_by(WebhookEndpointRow.id))).all())

    async def get_endpoint(self, project: str, endpoint_id: str) -> WebhookEndpointRow:
        async with self.sessions() as s:
            row = await s.scalar(select(WebhookEndpointRow).where(WebhookEndpointRow.id == endpoint_id,
                                                                  WebhookEndpointRow.project == project))
        if row is None:
            raise NotFound(f"No webhook endpoint found with id '{endpoint_id}'.", param="endpoint_id",
                           code="webhook_endpoint_not_found")
        return row

    async def list_deliveries(self, project: str, endpoint_id: str, limit: int,
                              after: str) -> tuple[list[DeliveryRecord], bool]:
        """Newest first (by when the event was written); `after` is the event id of the last
        delivery of the previous page."""
        await self.get_endpoint(project, endpoint_id)
        query = (select(WebhookDeliveryRow, WebhookEventRow)
                 .join(WebhookEventRow, WebhookEventRow.id == WebhookDeliveryRow.event_id)
                 .where(WebhookDeliveryRow.endpoint_id == endpoint_id))
        async with self.sessions() as s:
            if after:
                anchor = await s.get(WebhookDeliveryRow, (after, endpoint_id))
                if anchor is None:
                    raise NotFound(f"No delivery of event '{after}' to endpoint '{endpoint_id}' to list after.",
                                   param="after", code="cursor_not_found")
                query = query.where(or_(WebhookDeliveryRow.created_at < anchor.created_at,
                                        and_(WebhookDeliveryRow.created_at == anchor.created_at,
                                             WebhookDeliveryRow.event_id < anchor.event_id)))
            rows = (await s.execute(query.order_by(WebhookDeliveryRow.created_at.desc(),
                                                   WebhookDeliveryRow.event_id.desc()).limit(limit + 1))).all()
            page = rows[:limit]
            attempts: dict[str, list[WebhookAttemptRow]] = {}
            if page:
                for attempt in (await s.scalars(select(WebhookAttemptRow).where(
                        WebhookAttemptRow.endpoint_id == endpoint_id,
                        WebhookAttemptRow.event_id.in_([d.event_id for d, _ in page]))
                        .order_by(WebhookAttemptRow.attempt))).all():
                    attempts.setdefault(attempt.event_id, []).append(attempt)
        return [DeliveryRecord(d, e, attempts.get(d.event_id, [])) for d, e in page], len(rows) > limit

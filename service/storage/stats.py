"""Counts of batches for metrics gauges, read from the database at scrape time.

A gauge read from the shared database is right whichever replica serves the scrape and however
many there are (a per-process count would only know its own batches). Each query is one grouped
count over the batches table (`ix_batches_status` serves the status filter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select

from service.domain.model import BatchStatus
from service.storage.db import Sessions
from service.storage.tables import BatchRow

UNFINISHED = [s for s in BatchStatus if not s.terminal]


@dataclass(frozen=True)
class BatchGauges:
    # (status, provider) -> number of batches
    by_status: dict[tuple[str, str], int] = field(default_factory=dict)
    # unfinished batches that are due and whose lease is free: work no replica has picked up yet
    waiting: int = 0
    # leases this replica holds now
    leased_here: int = 0
    # leases held by any replica
    leased: int = 0


async def batch_gauges(sessions: Sessions, replica_id: str) -> BatchGauges:
    t = time.time()
    held = (BatchRow.lease_owner.is_not(None)) & (BatchRow.lease_until >= t)
    async with sessions() as s:
        rows = (await s.execute(select(BatchRow.status, BatchRow.provider, func.count())
                                .group_by(BatchRow.status, BatchRow.provider))).all()
        waiting = await s.scalar(select(func.count()).select_from(BatchRow).where(
            BatchRow.status.in_(UNFINISHED), ~held,
            or_(BatchRow.next_poll_at.is_(None), BatchRow.next_poll_at <= t)))
        # One row per replica holding leases.
        leased = dict((await s.execute(select(BatchRow.lease_owner, func.count()).where(
            BatchRow.status.in_(UNFINISHED), held).group_by(BatchRow.lease_owner))).all())
    by_status = {(BatchStatus(status).value, provider): count for status, provider, count in rows}
    return BatchGauges(by_status, int(waiting or 0), leased.get(replica_id, 0), sum(leased.values()))

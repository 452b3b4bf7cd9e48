"""WatchBatch's stream: the batch now, then the batch again whenever it changes, until it ends.

The stream follows the batch's row in the database, not the local engine, so it works on any
replica whichever one drives the batch, and a reconnecting client simply gets the current state
first. Reading one row by primary key a few times a second is cheap on both backends; the same
poll bounds progress events to a few per second, while status changes are never dropped: a
status that came and went between two looks (a short `finalizing`) is rebuilt from the stamps
the batch keeps (`statuses_between`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from service.domain.errors import NotFound
from service.domain.events import WatchEvent, statuses_between
from service.domain.model import BatchStatus
from service.edge import convert
from service.storage.repository import Store
from service.storage.tables import BatchRow
from sluice.v1 import batch_pb2

log = logging.getLogger(__name__)

# Statuses in the order a batch can enter them, and the fields a `status` event for an earlier
# status must not show yet.
_LATER_FIELDS = ("in_progress_at", "finalizing_at", "cancelling_at", "completed_at", "failed_at", "expired_at",
                 "cancelled_at", "output_file_id", "error_file_id", "merged_output_file_id", "merged_error_file_id")


def _visited(row: BatchRow) -> set[BatchStatus]:
    return {BatchStatus.VALIDATING} | {
        s for s in BatchStatus if s.timestamp_field and getattr(row, s.timestamp_field, None) is not None}


def as_of(batch: batch_pb2.Batch, status: BatchStatus) -> batch_pb2.Batch:
    """`batch` as it looked when it entered `status` (an intermediate status the poll missed):
    that status, and none of the stamps or files of the statuses after it."""
    out = batch_pb2.Batch()
    out.CopyFrom(batch)
    out.status = status.value
    keep = {"in_progress_at"} if status is not BatchStatus.VALIDATING else set()
    keep |= {status.timestamp_field} if status.timestamp_field else set()
    for name in _LATER_FIELDS:
        if name not in keep:
            out.ClearField(name)
    return out


async def batch_with_retries(store: Store, row: BatchRow) -> batch_pb2.Batch:
    """The batch as every read shows it: with its parts and the batches that retry it."""
    return convert.batch_message(row, (await store.retries_of([row.id])).get(row.id, ()))


async def watch_batch(store: Store, project: str, batch_id: str, poll_seconds: float,
                      closing: asyncio.Event) -> AsyncIterator[tuple[WatchEvent, batch_pb2.Batch]]:
    """The events of one batch of `project`. Raises NotFound before the first event; ends after a
    terminal status, or early when the server is closing (`closing` is set)."""
    row, retries = await store.get_batch_with_retries(project, batch_id)
    last = convert.batch_message(row, retries)
    yield WatchEvent.SNAPSHOT, last
    while not BatchStatus(last.status).terminal:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), poll_seconds)
        if closing.is_set():
            return
        try:
            row, retries = await store.get_batch_with_retries(project, batch_id)
        except NotFound:
            raise
        except Exception:  # a database hiccup: the stream goes on at the next look
            log.warning("watch %s: reading the batch failed; retrying", batch_id, exc_info=True)
            continue
        batch = convert.batch_message(row, retries)
        if batch.status != last.status:
            path = statuses_between(BatchStatus(last.status), BatchStatus(batch.status), _visited(row))
            for missed in path[:-1]:
                yield WatchEvent.STATUS, as_of(batch, missed)
            yield WatchEvent.STATUS, batch
        elif batch != last:
            yield WatchEvent.PROGRESS, batch
        last = batch

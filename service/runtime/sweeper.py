"""The file sweeper: removes what no request will ever finish or read again, rows and content
(database chunks or S3 objects alike, through the Store's blob store).

- Orphaned uploads: an upload whose form never completed (the client vanished, the server was
  killed mid-upload) stays `uploading`, invisible; after `stale_upload_seconds` without a chunk
  it is removed.
- Deleted files are hidden at once but keep their content for `deleted_file_grace_seconds`, so
  a download or a batch create already reading one finishes with the whole file; then they go.
- Expired files (`expires_at` passed: `expires_after` at upload, `output_expires_after` for a
  batch's output and error files) answer 404 at once and are removed at the next sweep, except
  the input file of a batch that has not ended, which goes at the first sweep after it ends.

Every replica runs one, but a sweep needs the `file-sweeper` lease in the database, so one
replica sweeps; its holder renews it every few seconds between sweeps, and a replica that dies
loses it within `LEASE_SECONDS`, when another takes over. A sweep is a set of conditional
claims, so even two sweeping at once (a holder that stalled past its lease) remove each file
once. Each pass works in bounded chunks (`SWEEP_CHUNK` files a transaction) and logs what it
removed: counts at INFO, ids at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from service.domain.model import now
from service.storage.leases import Leases
from service.storage.repository import Store, SweptFiles

log = logging.getLogger(__name__)
LEASE = "file-sweeper"
LEASE_SECONDS = 15.0  # how long a dead holder keeps the others from sweeping


class FileSweeper:
    def __init__(self, store: Store, stale_upload_seconds: float, deleted_file_grace_seconds: float,
                 every_seconds: float | None = None, owner: str = "") -> None:
        self.store = store
        self.stale_upload_seconds = stale_upload_seconds
        self.deleted_file_grace_seconds = deleted_file_grace_seconds
        self.every_seconds = every_seconds or max(1.0, min(60.0, stale_upload_seconds / 4))
        self.owner = owner or f"sweeper-{id(self):x}"
        self.leases = Leases(store.sessions, store.engine.dialect.name)
        self._last_sweep: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> SweptFiles | None:
        """One pass now, if this replica holds (or can take) the lease; None when another one does."""
        if not await self.leases.acquire(LEASE, self.owner, LEASE_SECONDS):
            return None
        return await self._sweep()

    async def tick(self) -> SweptFiles | None:
        """Renew (or try to take) the lease; sweep if held and `every_seconds` have passed."""
        if not await self.leases.acquire(LEASE, self.owner, LEASE_SECONDS):
            return None
        if self._last_sweep is not None and time.monotonic() - self._last_sweep < self.every_seconds:
            return None
        return await self._sweep()

    async def _sweep(self) -> SweptFiles:
        self._last_sweep = time.monotonic()
        t = now()
        swept = await self.store.sweep_files(stale_upload_before=int(t - self.stale_upload_seconds),
                                             deleted_before=int(t - self.deleted_file_grace_seconds),
                                             expired_before=t)
        if swept.total:
            log.info("sweeper: removed %d file(s): %d orphaned upload(s), %d deleted, %d expired", swept.total,
                     len(swept.stale_uploads), len(swept.deleted), len(swept.expired))
            log.debug("sweeper: orphaned uploads %s; deleted %s; expired %s", swept.stale_uploads, swept.deleted,
                      swept.expired)
        return swept

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a database or object store hiccup must not end the sweeper
                log.exception("sweeper: sweep failed; trying again later")
            await asyncio.sleep(min(self.every_seconds, LEASE_SECONDS / 3))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="file-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):  # another replica takes over at once, not after the lease
            await self.leases.release(LEASE, self.owner)

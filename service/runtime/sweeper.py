"""The file sweeper: removes what no request will ever finish or read again.

- Uploads that stopped sending chunks (the client vanished, the server was killed mid-upload)
  stay `uploading`, invisible, with every chunk received; after `stale_upload_seconds` without a
  chunk they are removed, rows and chunks.
- Deleted files are hidden at once but keep their content for `deleted_file_grace_seconds`, so
  a download or a batch create already reading one finishes with the whole file; then they go.

Every replica runs one; a sweep is a set of conditional deletes, so two replicas sweeping at
once remove each file once and never a file that came back to life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.domain.model import now
from service.storage.repository import Store

log = logging.getLogger(__name__)


class FileSweeper:
    def __init__(self, store: Store, stale_upload_seconds: float, deleted_file_grace_seconds: float,
                 every_seconds: float | None = None) -> None:
        self.store = store
        self.stale_upload_seconds = stale_upload_seconds
        self.deleted_file_grace_seconds = deleted_file_grace_seconds
        self.every_seconds = every_seconds or max(1.0, min(60.0, stale_upload_seconds / 4))
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        t = now()
        removed = await self.store.sweep_files(stale_upload_before=int(t - self.stale_upload_seconds),
                                               deleted_before=int(t - self.deleted_file_grace_seconds))
        if removed:
            log.info("sweeper: removed %d stale upload(s) or deleted file(s)", removed)
        return removed

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # a database hiccup must not end the sweeper
                log.exception("sweeper: sweep failed; trying again later")
            await asyncio.sleep(self.every_seconds)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="file-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

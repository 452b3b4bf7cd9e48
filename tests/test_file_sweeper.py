"""The file sweeper on both backends: stale uploads and deleted files go (rows and chunks), live
uploads, published files and the engine's own files in progress stay, and two replicas sweeping
at once remove each file once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select

from service.domain.errors import NotFound
from service.storage.db import create_engine
from service.storage.repository import UPLOADING, Store, UploadGone
from service.storage.tables import FileChunkRow, FileRow

NOW = 1_800_000_000


async def add(store: Store, file_id: str, status: str = UPLOADING, updated_at: int | None = NOW,
              chunks: int = 3) -> None:
    await store.begin_file(FileRow(id=file_id, project="p", filename="f", purpose="batch", bytes=0, line_count=0,
                                   status=status, created_at=NOW - 10_000, updated_at=updated_at))
    await store.blobs.put(file_id, _pieces(chunks))


async def _pieces(n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * 10


async def ids_and_chunks(store: Store) -> tuple[set[str], int]:
    async with store.sessions() as s:
        ids = set((await s.scalars(select(FileRow.id))).all())
        chunks = int(await s.scalar(select(func.count()).select_from(FileChunkRow)) or 0)
    return ids, chunks


async def test_sweep_removes_only_what_no_one_will_finish_or_read(store: Store) -> None:
    await add(store, "file-stale", updated_at=NOW - 1000)
    await add(store, "file-live", updated_at=NOW - 10)
    await add(store, "file-engine-output", updated_at=None)  # the engine writes these: not an upload
    await add(store, "file-published", status="processed", updated_at=NOW - 5000)
    await add(store, "file-deleted-long-ago", status="deleted", updated_at=NOW - 7200)
    await add(store, "file-deleted-just-now", status="deleted", updated_at=NOW - 60)

    removed = await store.sweep_files(stale_upload_before=NOW - 900, deleted_before=NOW - 3600)
    assert (removed.stale_uploads, removed.deleted, removed.expired) == (["file-stale"], ["file-deleted-long-ago"], [])
    ids, chunks = await ids_and_chunks(store)
    assert ids == {"file-live", "file-engine-output", "file-published", "file-deleted-just-now"}
    assert chunks == 4 * 3


async def test_two_replicas_sweeping_at_once_remove_each_file_once(store: Store, db_url: str) -> None:
    for i in range(30):
        await add(store, f"file-stale-{i}", updated_at=NOW - 1000, chunks=2)
    other = Store(create_engine(db_url))
    try:
        counts = await asyncio.gather(store.sweep_files(NOW - 900, NOW - 3600),
                                      other.sweep_files(NOW - 900, NOW - 3600))
    finally:
        await other.close()
    assert sum(c.total for c in counts) == 30
    assert await ids_and_chunks(store) == (set(), 0)


async def test_an_upload_swept_under_it_fails_cleanly_and_deletes_are_soft(store: Store) -> None:
    await add(store, "file-slow", updated_at=NOW - 1000, chunks=1)
    await store.sweep_files(NOW - 900, NOW - 3600)
    with pytest.raises(UploadGone):
        await store.touch_upload("file-slow", 14)
    with pytest.raises(UploadGone):
        await store.finish_upload("file-slow", size=4, line_count=1, purpose="batch", expires_at=None)
    assert await ids_and_chunks(store) == (set(), 0)

    await add(store, "file-kept", status="processed", updated_at=NOW)
    await store.mark_file_deleted("p", "file-kept")
    with pytest.raises(NotFound):
        await store.get_file("p", "file-kept")  # hidden at once
    assert [c async for c in store.blobs.get("file-kept")] == [b"x" * 10] * 3  # readers still read
    with pytest.raises(NotFound):
        await store.mark_file_deleted("p", "file-kept")  # a second delete is a 404

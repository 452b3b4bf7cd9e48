"""The blob-store port on both implementations (the database's chunks, and S3 on a real
S3-compatible server on loopback), and the retention sweeper on both: what it removes (an
expired file, an orphaned upload, a deleted file past its grace: rows and content) and what it
keeps (everything else, and an expired input file of a batch that has not ended)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select, update

from service.domain.model import BatchStatus, FileStatus, now
from service.providers.registry import ConfigError
from service.runtime.config import Settings, parse_blob_url
from service.runtime.server import open_blobs
from service.runtime.sweeper import FileSweeper
from service.storage.blobs import CHUNK_BYTES, BlobWriter, BlobWriterClosed
from service.storage.db import create_engine, migrate
from service.storage.repository import Store
from service.storage.s3_blobs import S3Blobs
from service.storage.tables import BatchRow, FileChunkRow, FileRow
from tests.s3_server import S3Bucket

MB = 1024 * 1024


@pytest.fixture(params=["database", "s3"])
def blobs_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(db_url: str, blobs_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated store on each database, its content in the database or in a fresh S3 bucket."""
    await migrate(db_url)
    blobs = None
    if blobs_kind == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_env")
        blobs = S3Blobs(bucket.url)
    s = Store(create_engine(db_url), blobs=blobs)
    try:
        yield s
    finally:
        await s.close()


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


async def read(store: Store, key: str) -> bytes:
    out = bytearray()
    async for piece in store.blobs.get(key):
        assert 0 < len(piece) <= CHUNK_BYTES, len(piece)
        out += piece
    return bytes(out)


async def rows(store: Store, *keys: str) -> None:
    """The database's chunks belong to a file row (a foreign key): the rows come first, as in Sluice."""
    for key in keys:
        await store.begin_file(FileRow(id=key, project="p", filename="f", purpose="batch", bytes=0, line_count=0,
                                       status=FileStatus.UPLOADING, created_at=now()))


async def test_put_get_delete_exists(store: Store) -> None:
    await rows(store, "file-a")
    big = bytes(range(256)) * (3 * MB // 256) + b"tail"  # more than one download piece
    assert await store.blobs.put("file-a", chunks(big[:5], big[5:2 * MB], big[2 * MB:])) == len(big)
    assert await store.blobs.exists("file-a")
    assert await read(store, "file-a") == big
    assert await store.blobs.put("file-a", chunks(b"replaced\n")) == 9  # a put replaces
    assert await read(store, "file-a") == b"replaced\n"
    assert not await store.blobs.exists("file-none") and await read(store, "file-none") == b""  # missing: empty
    await store.blobs.delete(["file-a", "file-none"])  # a key without content is no error
    assert not await store.blobs.exists("file-a") and await read(store, "file-a") == b""


async def test_a_failing_writer_surfaces_at_close_and_abort_leaves_no_new_content(store: Store) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"half"
        raise OSError("the producer failed")

    await rows(store, "file-b", "file-c")
    with pytest.raises(OSError):
        await store.blobs.put("file-b", broken())
    if store.blobs.kind == "s3":  # S3: a put is atomic, nothing appears
        assert not await store.blobs.exists("file-b")

    writer = BlobWriter(store.blobs, "file-c")
    await writer.write(b"x" * 100)
    await writer.abort()
    if store.blobs.kind == "s3":
        assert not await store.blobs.exists("file-c")
    with pytest.raises(BlobWriterClosed):
        await writer.write(b"more")


async def test_large_puts_are_multipart_with_bounded_parts(s3_env: S3Bucket) -> None:
    """20 MiB in 1 MiB chunks goes up as a multipart upload of 8 MiB parts (3 parts: the ETag
    of a multipart object ends in `-<parts>`), and comes back byte for byte."""
    blobs = S3Blobs(s3_env.url)
    data = [bytes([i]) * MB for i in range(20)]
    assert await blobs.put("file-big", chunks(*data)) == 20 * MB
    head = s3_env.server.client().head_object(Bucket=s3_env.bucket, Key="sluice/file-big")
    assert head["ContentLength"] == 20 * MB and head["ETag"].strip('"').endswith("-3"), head["ETag"]
    got = [piece async for piece in blobs.get("file-big")]
    assert b"".join(got) == b"".join(data) and max(len(p) for p in got) == MB
    assert s3_env.objects() == {"file-big": 20 * MB}


# --------------------------------------------------------------------------- the sweeper


async def add_file(store: Store, file_id: str, *, status: FileStatus = FileStatus.PROCESSED,
                   expires_at: int | None = None, updated_at: int | None = None, content: bytes = b"line\n") -> None:
    t = now()
    await store.begin_file(FileRow(id=file_id, project="p", filename=f"{file_id}.jsonl", purpose="batch",
                                   bytes=len(content), line_count=1, status=FileStatus.UPLOADING, created_at=t - 10,
                                   expires_at=expires_at, updated_at=updated_at))
    await store.blobs.put(file_id, chunks(content))
    if status is not FileStatus.UPLOADING:
        async with store.sessions.begin() as s:
            await s.execute(update(FileRow).where(FileRow.id == file_id).values(status=status))


async def move_file_expiry(store: Store, file_id: str, expires_at: int) -> None:
    """Simulate the passage of time for a file (as tests/harness.py `move_expiry` does for batches)."""
    async with store.sessions.begin() as s:
        await s.execute(update(FileRow).where(FileRow.id == file_id).values(expires_at=expires_at))


async def state(store: Store, ids: list[str]) -> dict[str, tuple[str | None, bool]]:
    """file id -> (row status or None, content exists)."""
    out = {}
    async with store.sessions() as s:
        for file_id in ids:
            status = await s.scalar(select(FileRow.status).where(FileRow.id == file_id))
            out[file_id] = (str(status) if status else None, await store.blobs.exists(file_id))
    return out


async def test_one_sweep_removes_expired_orphaned_and_deleted_files_and_nothing_else(store: Store) -> None:
    t = now()
    await add_file(store, "file-expired", expires_at=t + 3600)
    await add_file(store, "file-expired-output", expires_at=t - 1)
    await add_file(store, "file-orphan", status=FileStatus.UPLOADING, updated_at=t - 2000)
    await add_file(store, "file-deleted", status=FileStatus.DELETED, updated_at=t - 7200)
    await add_file(store, "file-fresh", expires_at=t + 3600)
    await add_file(store, "file-forever", expires_at=None)
    await add_file(store, "file-uploading", status=FileStatus.UPLOADING, updated_at=t)
    await add_file(store, "file-deleted-now", status=FileStatus.DELETED, updated_at=t)
    assert (await store.get_file("p", "file-expired")).id == "file-expired"

    await move_file_expiry(store, "file-expired", t - 5)  # its hour has passed
    with pytest.raises(Exception, match="No such File"):
        await store.get_file("p", "file-expired")  # 404 at once, before any sweep
    assert "file-expired" not in [f.id for f in (await store.list_files("p", "", 100, "", False))[0]]

    sweeper = FileSweeper(store, stale_upload_seconds=900, deleted_file_grace_seconds=3600, owner="replica-a")
    swept = await sweeper.sweep()
    assert swept is not None
    assert sorted(swept.expired) == ["file-expired", "file-expired-output"]
    assert swept.stale_uploads == ["file-orphan"] and swept.deleted == ["file-deleted"]
    ids = ["file-expired", "file-expired-output", "file-orphan", "file-deleted", "file-fresh", "file-forever",
           "file-uploading", "file-deleted-now"]
    assert await state(store, ids) == {
        "file-expired": (None, False), "file-expired-output": (None, False), "file-orphan": (None, False),
        "file-deleted": (None, False), "file-fresh": ("processed", True), "file-forever": ("processed", True),
        "file-uploading": ("uploading", True), "file-deleted-now": ("deleted", True)}
    if store.blobs.kind == "database":
        async with store.sessions() as s:
            assert await s.scalar(select(func.count()).select_from(FileChunkRow)) == 4
    assert (await sweeper.sweep()) is not None and (await sweeper.sweep()).total == 0  # type: ignore[union-attr]


async def test_sweeping_works_in_bounded_chunks(store: Store) -> None:
    t = now()
    for i in range(7):
        await add_file(store, f"file-x{i}", expires_at=t - 1)
    swept = await store.sweep_files(stale_upload_before=t - 900, deleted_before=t - 3600, expired_before=t, chunk=3)
    assert len(swept.expired) == 7 and await state(store, ["file-x6"]) == {"file-x6": (None, False)}


async def test_one_replica_holds_the_sweeper_lease(store: Store) -> None:
    await add_file(store, "file-gone", expires_at=now() - 1)
    a = FileSweeper(store, 900, 3600, owner="replica-a")
    b = FileSweeper(store, 900, 3600, owner="replica-b")
    assert await b.sweep() is not None  # b takes the lease first
    assert await a.sweep() is None and await a.tick() is None  # a does nothing while b holds it
    await b.stop()  # a clean stop gives the lease up at once
    assert await a.sweep() is not None


async def test_an_expired_input_file_stays_until_its_batch_ends(store: Store) -> None:
    t = now()
    await add_file(store, "file-input", expires_at=t + 3600)
    batch = await store.create_batch(BatchRow.new(id="batch_running", project="p", endpoint="/v1/chat/completions",
                                                  completion_window="24h", created_at=t,
                                                  input_file_id="file-input"), [])
    await move_file_expiry(store, "file-input", t - 1)
    sweeper = FileSweeper(store, 900, 3600, owner="replica-a")
    assert (await sweeper.sweep()).expired == []  # type: ignore[union-attr]
    assert await state(store, ["file-input"]) == {"file-input": ("processed", True)}  # content kept
    with pytest.raises(Exception, match="No such File"):
        await store.get_file("p", "file-input")  # but expired for the API

    assert await store.transition(batch.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert (await sweeper.sweep()).expired == []  # type: ignore[union-attr]  # still running
    assert await store.transition(batch.id, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)
    assert await store.transition(batch.id, BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    assert (await sweeper.sweep()).expired == ["file-input"]  # type: ignore[union-attr]
    assert await state(store, ["file-input"]) == {"file-input": (None, False)}


async def test_a_wrong_blob_url_stops_the_start_with_a_clear_message(s3_env: S3Bucket) -> None:
    for raw in ("https://bucket/prefix", "s3://", "/var/files"):
        with pytest.raises(ConfigError, match="SLUICE_BLOB_URL must look like s3://bucket/prefix"):
            parse_blob_url(raw)
    assert parse_blob_url(" s3://bucket/a/b/ ") == "s3://bucket/a/b" and parse_blob_url("") == ""
    assert await open_blobs(Settings(blob_url="")) is None  # the database
    assert (await open_blobs(Settings(blob_url=s3_env.url))) is not None
    with pytest.raises(ConfigError, match="SLUICE_BLOB_URL s3://no-such-bucket/x: cannot use the object store"):
        await open_blobs(Settings(blob_url="s3://no-such-bucket/x"))

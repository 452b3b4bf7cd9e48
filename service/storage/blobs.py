"""The blob-store port: where the bytes of files live, apart from their rows.

A file's row (`files`: name, size, status, expiry) is always in the database; its content goes
through a `BlobStore`, keyed by the file id. Two implementations:

- `DatabaseBlobs` (the embedded default): the `file_chunks` table, pieces of at most 1 MiB,
  each written in its own short transaction (a slow 200 MB upload never holds SQLite's write lock).
- `S3Blobs` (`service/storage/s3_blobs.py`, `SLUICE_BLOB_URL=s3://bucket/prefix`): S3-compatible
  object storage, so N replicas share files without putting gigabytes in PostgreSQL.

Both stream both ways: `put` pulls an async iterator of chunks, `get` yields pieces of at most
`CHUNK_BYTES`; neither ever holds a whole file. `get_range` reads a span in one go (the lines of a
batch stored by reference into its input file: one read per page of lines). Content that is
missing reads as empty, on both: callers compare what they read with the row's `bytes` (a file
deleted and swept under a reader).

`BlobWriter` turns `put` around (push-style `write`), for writers that produce content while they
do something else with it: an upload checks lines as it stores them, and a batch's finalizer
writes its output and error files in one pass over the results.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from service.storage.db import Sessions, insert_for
from service.storage.tables import FileChunkRow, FileLineIndexRow

CHUNK_BYTES = 1024 * 1024  # the most any `get` yields at once (a gRPC download message), and a DB row
LAYOUTS_KEPT = 64  # files whose chunk layout DatabaseBlobs keeps for range reads


class BlobStore(Protocol):
    """File content by key (the file id). Writes are whole-object: `put` replaces what was there."""

    kind: str

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the content `chunks` streams (replacing any under `key`); returns its size.
        If `chunks` raises, the error propagates and no new content is visible (S3) or what was
        written is left for the caller's `delete` (database)."""
        ...

    def get(self, key: str) -> AsyncIterator[bytes]:
        """The content in pieces of at most `CHUNK_BYTES`; nothing at all when there is none."""
        ...

    async def get_range(self, key: str, start: int, end: int) -> bytes | None:
        """Bytes `start` (inclusive) to `end` (exclusive) of the content, in one read (S3: one ranged
        GET); None when there is no content or it ends before `end`. For lines of a batch stored by
        reference into their input file (Store._fill_bodies)."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove the content of `keys`; keys without content are no error."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def close(self) -> None: ...


def split(chunk: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    """`chunk` in pieces of at most `size` bytes."""
    if len(chunk) <= size:
        return [chunk]
    view = memoryview(chunk)
    return [bytes(view[i:i + size]) for i in range(0, len(chunk), size)]


class DatabaseBlobs:
    """Content in the `file_chunks` table. Shares the Store's `Sessions`, so on SQLite its writes
    queue on the same in-process write lock as every other writer."""

    kind = "database"

    def __init__(self, sessions: Sessions, dialect: str) -> None:
        self.sessions = sessions
        self._dialect = dialect
        # key -> (chunk seqs, the offset each starts at, size): stored content never changes, so the
        # layout of the files being read by reference is kept (a few, least recently used dropped).
        self._layouts: OrderedDict[str, tuple[list[int], list[int], int]] = OrderedDict()

    def _insert(self) -> postgresql.Insert | sqlite.Insert:
        return insert_for(self._dialect, FileChunkRow)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        await self.delete([key])
        seq = size = 0
        async for chunk in chunks:
            for piece in split(chunk):
                if not piece:
                    continue
                async with self.sessions.begin() as s:
                    await s.execute(self._insert().values(file_id=key, seq=seq, data=piece))
                seq += 1
                size += len(piece)
        return size

    def get(self, key: str) -> AsyncIterator[bytes]:
        return pieces(self.sessions, FileChunkRow, key)

    async def get_range(self, key: str, start: int, end: int) -> bytes | None:
        layout = await self._layout(key)
        if layout is None or end > layout[2]:
            return None
        seqs, starts, _ = layout
        first = bisect.bisect_right(starts, start) - 1
        last = max(bisect.bisect_left(starts, end) - 1, first)
        async with self.sessions() as s:
            rows = (await s.execute(select(FileChunkRow.data).where(
                FileChunkRow.file_id == key, FileChunkRow.seq >= seqs[first], FileChunkRow.seq <= seqs[last])
                .order_by(FileChunkRow.seq))).all()
        if len(rows) != last - first + 1:  # deleted meanwhile
            self._layouts.pop(key, None)
            return None
        at = start - starts[first]
        if len(rows) == 1:
            return bytes(rows[0][0][at:at + end - start])
        return b"".join(bytes(r[0]) for r in rows)[at:at + end - start]

    async def _layout(self, key: str) -> tuple[list[int], list[int], int] | None:
        layout = self._layouts.get(key)
        if layout is not None:
            self._layouts.move_to_end(key)
            return layout
        async with self.sessions() as s:
            rows = (await s.execute(select(FileChunkRow.seq, func.length(FileChunkRow.data))
                                    .where(FileChunkRow.file_id == key).order_by(FileChunkRow.seq))).all()
        if not rows:
            return None
        starts, at = [], 0
        for _, size in rows:
            starts.append(at)
            at += int(size)
        layout = self._layouts[key] = ([int(seq) for seq, _ in rows], starts, at)
        if len(self._layouts) > LAYOUTS_KEPT:
            self._layouts.popitem(last=False)
        return layout

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._layouts.pop(key, None)
        for key in keys:  # one file per transaction: a 200 MB file is 200 rows, never thousands at once
            async with self.sessions.begin() as s:
                await s.execute(delete(FileChunkRow).where(FileChunkRow.file_id == key))

    async def exists(self, key: str) -> bool:
        async with self.sessions() as s:
            return await s.scalar(select(FileChunkRow.seq).where(FileChunkRow.file_id == key).limit(1)) is not None

    async def close(self) -> None:
        return None


class BlobWriterClosed(Exception):
    """The put behind a `BlobWriter` ended before its content did (its error is the cause)."""


class BlobWriter:
    """Push-style writing on top of `BlobStore.put`: the put runs as a task pulling from a queue
    of at most `depth` chunks, so a writer that produces faster than the store takes waits
    (memory stays bounded) and an error of the store surfaces at the next `write`.

        writer = BlobWriter(blobs, key)
        try:
            await writer.write(chunk)...
            size = await writer.close()
        except BaseException:
            await writer.abort()
            raise
    """

    def __init__(self, blobs: BlobStore, key: str, depth: int = 2) -> None:
        self.size = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._task = asyncio.ensure_future(blobs.put(key, self._chunks()))

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def _send(self, item: bytes | None) -> None:
        if self._task.done():
            self._raise()
        put = asyncio.ensure_future(self._queue.put(item))
        try:
            await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            self._raise()

    def _raise(self) -> None:
        exc = None if self._task.cancelled() else self._task.exception()
        raise BlobWriterClosed("the blob store stopped taking content") from exc

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._send(chunk)
            self.size += len(chunk)

    async def close(self) -> int:
        """Wait until the store has all of it (an S3 multipart upload is completed here)."""
        await self._send(None)
        try:
            return await self._task
        except Exception as exc:
            raise BlobWriterClosed("the blob store failed to complete the content") from exc

    async def abort(self) -> None:
        """Stop the put; nothing new becomes visible (the caller deletes what the store kept)."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def pieces(sessions: Sessions, table: type[FileChunkRow] | type[FileLineIndexRow],
                 file_id: str) -> AsyncIterator[bytes]:
    """A file's pieces in order (content chunks, or line index blocks), each read in its own query,
    so that one piece at a time is in memory however large the file."""
    seq = -1
    while True:
        async with sessions() as s:
            row = (await s.execute(select(table.seq, table.data).where(table.file_id == file_id, table.seq > seq)
                                   .order_by(table.seq).limit(1))).first()
        if row is None:
            return
        seq = row[0]
        yield bytes(row[1])

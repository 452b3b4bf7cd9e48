"""File content in S3-compatible object storage (`SLUICE_BLOB_URL=s3://bucket/prefix`).

Built on `obstore` (Rust's `object_store`, async, typed). Credentials and region come from the
standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_REGION`...), a custom endpoint (MinIO, Ceph, R2, a test server) from `AWS_ENDPOINT_URL`;
plain `http://` is allowed only when that endpoint says so.

Uploads are multipart: parts of `part_bytes` (8 MiB), at most `concurrency` (2) in flight, so a
put holds about (concurrency + 1) x part_bytes whatever the file's size. The object appears only
when the multipart upload completes; a put that fails or is cancelled leaves no object (a crash
can leave incomplete parts, which a bucket lifecycle rule for incomplete multipart uploads
removes). Downloads stream in pieces of at most 1 MiB.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

import obstore
from obstore.store import S3Store

from service.storage.blobs import CHUNK_BYTES

if TYPE_CHECKING:
    from obstore.store import S3Config

PART_BYTES = 8 * 1024 * 1024
CONCURRENCY = 2
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


class S3Blobs:
    kind = "s3"

    def __init__(self, url: str, *, env: Mapping[str, str] | None = None, part_bytes: int = PART_BYTES,
                 concurrency: int = CONCURRENCY) -> None:
        env = os.environ if env is None else env
        endpoint = next((env[name] for name in ENDPOINT_VARIABLES if env.get(name)), "")
        self.url = url
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        config: S3Config = {"endpoint": endpoint} if endpoint else {}
        self._store = S3Store.from_url(url, config=config, client_options={"allow_http": endpoint.startswith("http://")})

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                size += len(chunk)
                yield chunk

        await obstore.put_async(self._store, key, counted(), chunk_size=self.part_bytes,
                                max_concurrency=self.concurrency)
        return size

    async def get(self, key: str) -> AsyncIterator[bytes]:
        try:
            result = await obstore.get_async(self._store, key)
        except FileNotFoundError:
            return
        pending = bytearray()
        async for piece in result.stream(min_chunk_size=CHUNK_BYTES // 4):
            pending += memoryview(piece)
            while len(pending) >= CHUNK_BYTES:
                yield bytes(pending[:CHUNK_BYTES])
                del pending[:CHUNK_BYTES]
        if pending:
            yield bytes(pending)

    async def get_range(self, key: str, start: int, end: int) -> bytes | None:
        try:
            data = await obstore.get_range_async(self._store, key, start=start, end=end)
        except FileNotFoundError:
            return None
        return bytes(data) if len(data) == end - start else None

    async def delete(self, keys: Sequence[str]) -> None:
        if keys:
            await obstore.delete_async(self._store, list(keys))

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        return True

    async def check(self) -> None:
        """Write, read and delete a small object: raises unless the bucket exists and these
        credentials may use it (at start, so a mistake stops the server, not the first upload)."""
        key = ".sluice-start-check"
        await obstore.put_async(self._store, key, b"ok", use_multipart=False)
        if bytes(await (await obstore.get_async(self._store, key)).bytes_async()) != b"ok":
            raise OSError("the object read back differs from the one written")
        await obstore.delete_async(self._store, key)

    async def close(self) -> None:
        return None

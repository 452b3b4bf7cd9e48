"""Shared pieces of the hostile-input tests: a real stack per backend (module scope, so
Hypothesis can run many examples against one), the "clean error" check every response must pass,
and a look into the database for anything an upload left behind."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from service.storage.tables import FileChunkRow, FileRow
from tests.e2e import Stack, check, start_stack
from tests.pg_server import PostgresServer
from tests.s3_server import S3Server

LEAKS = ("sluice.v1", "TYPE_", "<class", "google.protobuf", "Traceback", "oneof", "grpc", "DecodeError")


@pytest.fixture(scope="module", params=["sqlite", "postgres"], name="backend_stack")
def backend_stack_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real stack (Envoy + server) on SQLite, then on a PostgreSQL database of its own."""
    yield from _backend_stack(request, tmp_path_factory)


@pytest.fixture(scope="module", params=["sqlite", "postgres", "sqlite+s3"], name="backend_stack")
def file_backend_stack_fixture(request: pytest.FixtureRequest,
                               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """For file tests: also on SQLite with the content in S3 (moto's server on loopback). After
    the module, every object in the bucket belongs to a stored file: nothing a failure left."""
    yield from _backend_stack(request, tmp_path_factory)


def _backend_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp(f"hostile-{request.param.replace('+', '-')}")
    if request.param == "sqlite":
        with start_stack(work, f"sqlite+aiosqlite:///{work}/sluice.db") as s:
            yield s
        return
    if request.param == "sqlite+s3":
        server: S3Server = request.getfixturevalue("s3_server")
        bucket = f"hostile-{uuid.uuid4().hex[:12]}"
        server.client().create_bucket(Bucket=bucket)
        url = f"sqlite+aiosqlite:///{work}/sluice.db"
        with start_stack(work, url, **server.env(bucket)) as s:
            yield s
        objects = {key.removeprefix("sluice/") for key in server.keys(bucket)}
        assert objects <= stored_file_ids(url), f"objects without a stored file: {objects - stored_file_ids(url)}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"hostile_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    try:
        with start_stack(work, url) as s:
            yield s
    finally:
        server.drop_database(name)


def assert_clean(r: httpx.Response, *allowed: int) -> dict[str, Any] | None:
    """Never a 5xx (unless `allowed` names one); an error is OpenAI's envelope, bounded, without
    internals. Returns the error object, or None for a success."""
    if not any(status >= 500 for status in allowed):
        assert r.status_code < 500, \
            f"{r.status_code} for {r.request.method} {str(r.request.url)[:200]}: {r.text[:500]}"
    if allowed:
        assert r.status_code in allowed, f"{r.status_code} not in {allowed}: {r.text[:500]}"
    if r.status_code < 400:
        return None
    assert r.status_code != 429, f"a retryable 429 for bad input: {r.text[:300]}"
    assert r.headers["content-type"] == "application/json", r.headers
    body = check("ErrorResponse", r.json())
    error = body["error"]
    assert len(error["message"]) <= 1000 and (error["param"] is None or len(error["param"]) <= 200)
    text = json.dumps(error)
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked: {text}"
    return dict(error)


def stored_file_ids(database_url: str) -> set[str]:
    """Ids of the files stored for good (published, or deleted and waiting for the sweeper)."""
    async def ids() -> set[str]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return set((await conn.scalars(select(FileRow.id).where(
                    FileRow.status.in_(["processed", "deleted"])))).all())
        finally:
            await engine.dispose()
    return asyncio.run(ids())


def hidden_leftovers(database_url: str) -> tuple[int, int]:
    """(uploads still `uploading`, their chunks and any orphan chunks): what failed uploads left.
    Uploads are the `uploading` rows with `updated_at` set; the engine's output files, which also
    pass through `uploading` while it writes them, have none."""
    async def count() -> tuple[int, int]:
        engine = create_async_engine(database_url)
        upload = (FileRow.status == "uploading") & FileRow.updated_at.is_not(None)
        try:
            async with engine.connect() as conn:
                rows = int(await conn.scalar(select(func.count()).select_from(FileRow).where(upload)) or 0)
                chunks = int(await conn.scalar(
                    select(func.count()).select_from(FileChunkRow).join(FileRow, FileRow.id == FileChunkRow.file_id)
                    .where(upload)) or 0)
                orphans = int(await conn.scalar(
                    select(func.count()).select_from(FileChunkRow)
                    .where(FileChunkRow.file_id.not_in(select(FileRow.id)))) or 0)
                return rows, chunks + orphans
        finally:
            await engine.dispose()
    return asyncio.run(count())


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostileBoundary42",
              close: bool = True) -> tuple[bytes, str]:
    """A multipart/form-data body from (name, filename, content) parts, and its Content-Type."""
    out = bytearray()
    for name, filename, content in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"Content-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def jsonl_line(custom_id: str = "a", model: str = "sim/x", **body: Any) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}}).encode()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

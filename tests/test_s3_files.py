"""File content in S3-compatible object storage, end to end: `sluice run` (server + Envoy) with
`SLUICE_BLOB_URL=s3://<bucket>/sluice` against moto's S3 server on loopback, driven by the
official `openai` SDK. Uploads, batches from them, output files and downloads; two replicas
sharing one bucket and one PostgreSQL; a 200 MB file up and down with flat server memory; and
retention through the API (`expires_after`, `output_expires_after`, their 400s)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from service.storage.tables import FileChunkRow, FileRow
from tests.e2e import KEY_A, GeneratedFile, start_stack, vm_bytes
from tests.load import reset_peak
from tests.s3_server import S3Bucket

CHAT = "/v1/chat/completions"
MB = 1_000_000
# A 200 MB upload and its download may grow the server's peak RSS by at most this much: the
# content streams through (1 MiB gRPC messages, 8 MiB multipart parts, 2 in flight), never whole.
MEMORY_GROWTH_BOUND = 100 * MB


def jsonl(n: int, prefix: str = "q") -> bytes:
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": CHAT,
                                "body": {"model": "sim/small", "messages": [{"role": "user", "content": f"Q{i}"}]}})
                    .encode() + b"\n" for i in range(n))


def chunk_rows(database_url: str) -> int:
    async def count() -> int:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return int(await conn.scalar(select(func.count()).select_from(FileChunkRow)) or 0)
        finally:
            await engine.dispose()
    return asyncio.run(count())


def wait_done(client: openai.OpenAI, batch_id: str, timeout: float = 60.0) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after {timeout}s"
        time.sleep(0.05)


def test_openai_sdk_round_trip_with_content_in_s3(tmp_path: Path, s3_env: S3Bucket) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/s3.db"
    with start_stack(tmp_path / "stack", url, **s3_env.env) as stack:
        client = stack.sdk()
        content = jsonl(25)
        f = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 3600})
        assert f.bytes == len(content) and f.expires_at == f.created_at + 3600
        batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                                      output_expires_after={"anchor": "created_at", "seconds": 7200})
        done = wait_done(client, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 25 and done.output_file_id and done.error_file_id is None

        out = client.files.retrieve(done.output_file_id)
        assert out.expires_at == out.created_at + 7200  # output_expires_after, from the file's creation
        lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        assert [line["custom_id"] for line in lines] == [f"q{i}" for i in range(25)]
        assert all(line["response"]["status_code"] == 200 for line in lines)
        assert client.files.content(f.id).content == content

        # The content is in the bucket, under the prefix, and not in the database.
        assert s3_env.objects() == {f.id: len(content), done.output_file_id: out.bytes}
        assert chunk_rows(url) == 0

        # A deleted file is gone for the API at once; its object goes with the sweep after the grace.
        assert client.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.content(f.id)


def test_retention_parameters_are_checked(tmp_path: Path, s3_env: S3Bucket) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/s3.db"
    with start_stack(tmp_path / "stack", url, **s3_env.env) as stack:
        client = stack.sdk()
        for expires, param in (({"anchor": "created_at", "seconds": 59}, "expires_after.seconds"),
                               ({"anchor": "created_at", "seconds": 2_592_001}, "expires_after.seconds"),
                               ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor")):
            with pytest.raises(openai.BadRequestError) as bad:
                client.files.create(file=("x.jsonl", io.BytesIO(jsonl(1))), purpose="batch",
                                    expires_after=expires)  # type: ignore[arg-type]
            assert bad.value.status_code == 400 and bad.value.param == param, bad.value.body
        f = client.files.create(file=("ok.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
        assert f.expires_at == f.created_at + 30 * 24 * 3600  # the default for purpose=batch, as OpenAI's
        for expires, param in (({"anchor": "created_at", "seconds": 3599}, "output_expires_after.seconds"),
                               ({"anchor": "created_at", "seconds": "soon"}, None),
                               ({"anchor": "updated_at", "seconds": 3600}, "output_expires_after.anchor")):
            with pytest.raises(openai.BadRequestError) as bad:
                client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                                      output_expires_after=expires)  # type: ignore[arg-type]
            assert bad.value.status_code == 400, bad.value.body
            if param:
                assert bad.value.param == param, bad.value.body
        http = stack.http()
        r = http.post("/v1/batches", json={"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h",
                                           "output_expires_after": 3600})
        assert r.status_code == 400 and r.json()["error"]["param"] == "output_expires_after", r.text
        assert s3_env.objects() == {f.id: f.bytes}  # nothing refused was stored


def test_two_replicas_share_one_bucket(tmp_path: Path, s3_env: S3Bucket, postgres_url: str) -> None:
    """Upload through one replica; create the batch and read every file through the other."""
    with start_stack(tmp_path / "a", postgres_url, SLUICE_REPLICA_ID="replica-a", **s3_env.env) as a, \
            start_stack(tmp_path / "b", postgres_url, SLUICE_REPLICA_ID="replica-b", **s3_env.env) as b:
        content = jsonl(40, prefix="shared-")
        f = a.sdk().files.create(file=("shared.jsonl", io.BytesIO(content)), purpose="batch")
        on_b = b.sdk()
        assert on_b.files.content(f.id).content == content
        batch = on_b.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        done = wait_done(on_b, batch.id)
        assert done.status == "completed" and done.output_file_id
        from_a = a.sdk().files.content(done.output_file_id).content
        assert from_a == on_b.files.content(done.output_file_id).content
        assert len(from_a.splitlines()) == 40
        assert set(s3_env.objects()) == {f.id, done.output_file_id}
        assert chunk_rows(postgres_url) == 0


def big_lines(count: int = 50_000, size: int = 4_100) -> Iterator[bytes]:
    """50,000 request lines of about 4.1 KB: a 205 MB file (the limit is 200 MiB), made as it is sent."""
    for i in range(count):
        head = json.dumps({"custom_id": f"big-{i}", "method": "POST", "url": CHAT,
                           "body": {"model": "sim/small", "messages": [{"role": "user", "content": ""}]}})
        pad = "x" * (size - len(head) - 1)
        yield head.replace('"content": ""', f'"content": "{pad}"', 1).encode() + b"\n"


def test_a_200_mb_file_up_and_down_with_flat_server_memory(tmp_path: Path, s3_env: S3Bucket) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/s3.db"
    with start_stack(tmp_path / "stack", url, **s3_env.env) as stack:
        pid = stack.proc.pid
        digest = hashlib.sha256()

        def lines() -> Iterator[bytes]:
            for line in big_lines():
                digest.update(line)
                yield line

        assert reset_peak(pid), "cannot reset the server's peak RSS (/proc/<pid>/clear_refs)"
        before = vm_bytes(pid, "VmRSS")
        source = GeneratedFile("big.jsonl", lines())
        f = stack.sdk().files.create(file=("big.jsonl", source), purpose="batch")
        upload_peak = vm_bytes(pid, "VmHWM")
        assert f.bytes == source.sent > 200 * MB
        assert s3_env.objects() == {f.id: f.bytes}

        reset_peak(pid)
        before_download = vm_bytes(pid, "VmRSS")
        got, received = hashlib.sha256(), 0
        with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=300) as http, \
                http.stream("GET", f"/v1/files/{f.id}/content") as r:
            assert r.status_code == 200
            for piece in r.iter_bytes():
                got.update(piece)
                received += len(piece)
        download_peak = vm_bytes(pid, "VmHWM")
        assert received == f.bytes and got.hexdigest() == digest.hexdigest()
        assert upload_peak - before < MEMORY_GROWTH_BOUND, \
            f"upload: server RSS {before / MB:.0f} MB -> peak {upload_peak / MB:.0f} MB"
        assert download_peak - before_download < MEMORY_GROWTH_BOUND, \
            f"download: server RSS {before_download / MB:.0f} MB -> peak {download_peak / MB:.0f} MB"
        assert chunk_rows(url) == 0




def set_file_expiry(database_url: str, file_ids: list[str], expires_at: int) -> None:
    """Simulate the passage of time for files (as tests/harness.py `move_expiry` does for batches)."""
    async def run() -> None:
        engine = create_async_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(update(FileRow).where(FileRow.id.in_(file_ids)).values(expires_at=expires_at))
        finally:
            await engine.dispose()
    asyncio.run(run())


def file_rows(database_url: str) -> set[str]:
    async def run() -> set[str]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return set((await conn.scalars(select(FileRow.id))).all())
        finally:
            await engine.dispose()
    return asyncio.run(run())


def until(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_sweeper_removes_expired_objects_but_keeps_a_running_batchs_input(tmp_path: Path,
                                                                             s3_env: S3Bucket) -> None:
    """A batch that runs until cancelled (each sim request takes 10 minutes) holds its input:
    once every file has expired, the next sweeps remove the other expired file (row and object)
    and keep the input (404 for the API, content kept); after the batch ends, the input goes."""
    url = f"sqlite+aiosqlite:///{tmp_path}/s3.db"
    with start_stack(tmp_path / "stack", url, SLUICE_SIM_LATENCY_MS="600000", SLUICE_STALE_UPLOAD_SECONDS="4",
                     **s3_env.env) as stack:
        client = stack.sdk()
        source = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(2))), purpose="batch")
        other = client.files.create(file=("other.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
        kept = client.files.create(file=("kept.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
        batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
        until("the batch to run", lambda: client.batches.retrieve(batch.id).status == "in_progress")

        set_file_expiry(url, [source.id, other.id], int(time.time()) - 1)
        for file_id in (source.id, other.id):
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(file_id)  # expired: 404 at once
            with pytest.raises(openai.NotFoundError):
                client.files.content(file_id)
        # Content goes first, then the row (a sweep removes both, in that order).
        until("the expired file to be swept", lambda: other.id not in set(s3_env.objects()) | file_rows(url))
        assert set(s3_env.objects()) == {source.id, kept.id}  # the running batch's input stays
        assert {source.id, kept.id} <= file_rows(url)

        client.batches.cancel(batch.id)
        ended = wait_done(client, batch.id)
        assert ended.status == "cancelled" and ended.error_file_id  # its unrun lines, as OpenAI's
        until("the ended batch's input to be swept", lambda: source.id not in set(s3_env.objects()) | file_rows(url))
        assert set(s3_env.objects()) == {kept.id, ended.error_file_id}
        assert client.files.content(kept.id).content == jsonl(1)

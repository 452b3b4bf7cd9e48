"""Starting real Sluice servers for tests: in-process (fast) or as a `sluice serve` process
(for restarts and crashes), always on ports chosen at run time, talking real gRPC."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2
from sqlalchemy import update

from service.providers.routing import Router
from service.runtime.config import Settings
from service.runtime.server import App, start
from service.storage.repository import Store
from service.storage.tables import BatchRow
from sluice.v1 import batch_pb2, batch_pb2_grpc, file_pb2, file_pb2_grpc

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-beta-9876543210"
ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"completed", "failed", "expired", "cancelled"}
T = TypeVar("T")


async def until(what: str, check: Callable[[], Awaitable[T | None]], timeout: float = 30.0) -> T:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds: how tests
    wait for asynchronous work (bounded polling, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def make_settings(database_url: str, **overrides: Any) -> Settings:
    base = Settings(grpc_port=0, database_url=database_url, api_keys={KEY_A: "alpha", KEY_B: "beta"},
                    sim_latency_ms=0, engine_tick_seconds=0.05, poll_seconds=0.05, lease_seconds=5,
                    replica_id=f"test-{os.getpid()}-{time.monotonic_ns()}")
    return replace(base, **overrides)


def md(key: str = KEY_A) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat_line(custom_id: str, text: str = "hello there", model: str = "sim/small",
              **extra: Any) -> batch_pb2.BatchRequestLine:
    body = struct_pb2.Struct()
    body.update({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra})
    return batch_pb2.BatchRequestLine(custom_id=custom_id, method="POST", url="/v1/chat/completions", body=body)


async def move_expiry(store: Store, batch_id: str, expires_at: int) -> None:
    """Simulate the passage of time for a batch: set its `expires_at` (the window is always 24 h,
    so tests that need expiry move the batch's end rather than wait a day)."""
    async with store.sessions.begin() as s:
        await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(expires_at=expires_at))


def multipart_upload(content: bytes, filename: str = "input.jsonl", purpose: str = "batch",
                     piece: int = 64 * 1024) -> list[file_pb2.UploadFileRequest]:
    """An UploadFile stream as Envoy sends it: a multipart/form-data body (purpose, then the file)
    cut into HttpBody pieces, the content type on the first."""
    boundary = "sluice-test-boundary-7d3c"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i:i + piece] for i in range(0, len(body), piece)]
    first = file_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(
        content_type=f"multipart/form-data; boundary={boundary}", data=pieces[0]))
    return [first, *(file_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(data=p)) for p in pieces[1:])]


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def request_dict(custom_id: str, text: str = "hello there", model: str = "sim/small",
                 url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}}


@dataclass
class Client:
    """A gRPC client bound to one server, with helpers that wait by polling with a deadline."""

    channel: grpc.aio.Channel
    stub: batch_pb2_grpc.BatchServiceStub

    @property
    def files(self) -> file_pb2_grpc.FileServiceStub:
        return file_pb2_grpc.FileServiceStub(self.channel)

    async def upload(self, content: bytes, key: str = KEY_A, filename: str = "input.jsonl",
                     purpose: str = "batch") -> file_pb2.File:
        reply: file_pb2.File = await self.files.UploadFile(iter(multipart_upload(content, filename, purpose)),
                                                           metadata=md(key))
        return reply

    async def content(self, file_id: str, key: str = KEY_A) -> bytes:
        call = self.files.GetFileContent(file_pb2.GetFileContentRequest(id=file_id), metadata=md(key))
        return b"".join([piece.data async for piece in call])

    async def file_lines(self, file_id: str, key: str = KEY_A) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (await self.content(file_id, key)).splitlines()]

    async def create(self, lines: Iterable[batch_pb2.BatchRequestLine], key: str = KEY_A,
                     endpoint: str = "/v1/chat/completions", **fields: Any) -> batch_pb2.Batch:
        req = batch_pb2.CreateBatchRequest(endpoint=endpoint, requests=list(lines), **fields)
        return await self.stub.CreateBatch(req, metadata=md(key))

    async def get(self, batch_id: str, key: str = KEY_A) -> batch_pb2.Batch:
        batch: batch_pb2.Batch = await self.stub.GetBatch(batch_pb2.GetBatchRequest(id=batch_id), metadata=md(key))
        counts = batch.request_counts
        assert counts.completed + counts.failed <= counts.total, f"counts contradict total: {batch}"
        return batch

    async def wait_until(self, batch_id: str, test: Callable[[batch_pb2.Batch], bool], timeout: float = 60.0,
                         key: str = KEY_A) -> batch_pb2.Batch:
        """Poll GetBatch until `test(batch)` holds."""
        async def check() -> batch_pb2.Batch | None:
            batch = await self.get(batch_id, key)
            return batch if test(batch) else None
        return await until(f"batch {batch_id} to meet the test", check, timeout)

    async def wait_for(self, batch_id: str, statuses: set[str] | None = None, timeout: float = 60.0,
                       key: str = KEY_A) -> batch_pb2.Batch:
        """Poll GetBatch until the batch reaches one of `statuses` (default: any terminal one)."""
        wanted = statuses or TERMINAL
        return await self.wait_until(batch_id, lambda b: b.status in wanted, timeout, key)

    async def results(self, batch_id: str, key: str = KEY_A, limit: int = 1000) -> list[batch_pb2.BatchResult]:
        out: list[batch_pb2.BatchResult] = []
        after = ""
        while True:
            page = await self.stub.ListBatchResults(
                batch_pb2.ListBatchResultsRequest(id=batch_id, limit=limit, after=after), metadata=md(key))
            out.extend(page.data)
            if not page.has_more:
                return out
            after = page.next_cursor


async def assert_files_match_results(c: Client, batch: batch_pb2.Batch, key: str = KEY_A) -> None:
    """An ended batch's output and error files say what its results say (README: OpenAI's
    `{id, custom_id, response: {status_code, request_id, body}, error}` lines): successful lines
    in the output file, every other line in the error file, each once, in request order."""
    results = await c.results(batch.id, key)
    assert len(results) == batch.request_counts.total, "an ended batch has a result for every line"
    ok = [r for r in results if r.status == "completed"]
    bad = [r for r in results if r.status != "completed"]
    for file_id, expected in ((batch.output_file_id, ok), (batch.error_file_id, bad)):
        if not expected:
            assert not file_id, f"{file_id} exists for no lines"
            continue
        lines = await c.file_lines(file_id, key)
        assert [x["custom_id"] for x in lines] == [r.custom_id for r in expected], file_id
        for x, r in zip(lines, expected, strict=True):
            assert set(x) == {"id", "custom_id", "response", "error"} and x["id"].startswith("batch_req_")
            if r.status_code:
                assert x["response"]["status_code"] == r.status_code
                if r.HasField("response"):
                    assert x["response"]["body"] == json_format.MessageToDict(r.response)
            else:
                assert x["response"] is None
            if r.status == "completed":
                assert x["error"] is None
            elif r.HasField("error") and not r.status_code:
                assert x["error"]["code"] == r.error.code and x["error"]["message"] == r.error.message
        meta = await c.files.GetFile(file_pb2.GetFileRequest(id=file_id), metadata=md(key))
        assert (meta.purpose, meta.status) == ("batch_output", "processed") and meta.bytes == len(
            await c.content(file_id, key))


@asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Client(channel, batch_pb2_grpc.BatchServiceStub(channel))


@asynccontextmanager
async def gateway(settings: Settings, router: Router | None = None) -> AsyncIterator[tuple[App, Client]]:
    """An in-process server (real grpc.aio on a free port) and a client for it."""
    app = await start(settings, router)
    try:
        async with client(app.port) as c:
            yield app, c
    finally:
        await app.stop(grace=1.0)


# A server log line that reports a failure: Python's traceback header, or a record at ERROR or
# CRITICAL in the `sluice` CLI's format ("<date> <time> LEVEL logger: message").
LOG_PROBLEM = re.compile(r"^Traceback \(most recent call last\)|^\S+ \S+ (ERROR|CRITICAL) ", re.MULTILINE)


def log_problems(text: str, allowed: Iterable[str] = ()) -> list[str]:
    """The lines of a server log that report a failure and match none of the `allowed` regexes."""
    patterns = [re.compile(p) for p in allowed]
    lines = text.splitlines()
    problems = []
    for match in LOG_PROBLEM.finditer(text):
        line = lines[text.count("\n", 0, match.start())]
        if not any(p.search(line) for p in patterns):
            problems.append(line)
    return problems


class ServerProcess:
    """`sluice serve` in a child process, for tests that restart or kill the server. Its log is
    checked by `check_log` (the `processes` fixtures call it at teardown): a traceback or an ERROR
    line fails the test unless the test listed it in `allowed_errors`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.allowed_errors: list[str] = []

    def check_log(self) -> None:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        problems = log_problems(text, self.allowed_errors)
        assert not problems, "the server logged failures:\n" + "\n".join(problems) + "\n" + text[-3000:]

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with self.log_path.open("a") as log:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "service.runtime.cli", "serve", "--port", "0",
                                          "--ready-line"], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                         stderr=log, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("LISTENING "):
                self.port = int(line.split()[1])
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"sluice did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.close()
        return code

    def close(self) -> None:
        """Kill the child if it still runs, reap it and close its pipe."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

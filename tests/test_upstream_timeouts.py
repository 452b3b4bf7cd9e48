"""A stopped server (SIGSTOP) never makes a REST call hang: unary calls end with a 504 envelope
at the upstream deadline, streams that stop moving are cut at the same idle limit, new calls get
a 503 once Envoy's health check has taken the server out, and all is well again after SIGCONT."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e import Stack, start_stack
from tests.hostile import assert_clean, jsonl_line, multipart

TIMEOUT = 2  # SLUICE_UPSTREAM_TIMEOUT_SECONDS for this stack


@pytest.fixture
def stoppable(tmp_path: Path) -> Iterator[Stack]:
    with start_stack(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/s.db",
                     SLUICE_UPSTREAM_TIMEOUT_SECONDS=str(TIMEOUT)) as stack:
        try:
            yield stack
        finally:
            os.kill(stack.proc.pid, signal.SIGCONT)  # whatever happened, let it shut down


def test_a_stopped_server_yields_504_then_503_then_recovers(stoppable: Stack) -> None:
    http = stoppable.http()
    content = b"".join(jsonl_line(f"r{i}", pad="z" * 1000) + b"\n" for i in range(20_000))  # ~23 MB
    body, ct = multipart([("purpose", None, b"batch"), ("file", "big.jsonl", content)])
    up = http.post("/v1/files", content=body, headers={"content-type": ct})
    assert up.status_code == 200, up.text
    file_id = up.json()["id"]

    with http.stream("GET", f"/v1/files/{file_id}/content") as download:
        assert download.status_code == 200
        chunks = download.iter_raw(64 * 1024)
        next(chunks)
        os.kill(stoppable.proc.pid, signal.SIGSTOP)
        t = time.monotonic()
        # A download whose server stopped is cut (an incomplete body the client can tell), not
        # left hanging and not ended as if complete.
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
        assert time.monotonic() - t < 60

    t = time.monotonic()
    r = http.get("/v1/batches")
    error = assert_clean(r, 503, 504)  # assert_clean refuses any other 5xx
    assert error is not None and error["type"] == "server_error"
    assert time.monotonic() - t < 30

    uploads: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: uploads.append(
        http.post("/v1/files", content=body, headers={"content-type": ct})))
    sender.start()
    sender.join(120)
    (stalled,) = uploads
    assert stalled.status_code in (503, 504), stalled.text
    assert json.loads(stalled.text)["error"]["type"] == "server_error"

    deadline = time.monotonic() + 90  # Envoy's health check takes the stopped server out
    while (r := http.get("/v1/batches")).status_code != 503:
        assert time.monotonic() < deadline, f"still {r.status_code} after 90 s"
    t = time.monotonic()
    assert_clean(http.get("/v1/batches"), 503)
    assert time.monotonic() - t < 1.5, "an unhealthy upstream answers at once"

    os.kill(stoppable.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while (r := http.get("/v1/batches")).status_code != 200:
        assert time.monotonic() < deadline, f"not back after SIGCONT: {r.status_code} {r.text[:200]}"
        time.sleep(0.2)

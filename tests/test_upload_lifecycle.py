"""Uploads and downloads under failure, through the real stack on SQLite, PostgreSQL, and SQLite
with the content in S3 (moto on loopback).

A 400 means nothing was stored (checked in the database, rows and chunks); an interrupted upload
(client gone, server killed) leaves nothing once swept; form fields come in any order; a download
or a batch create racing a delete sees the whole file or a 404, never a short one.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e import KEY_A, Stack, pid_alive, start_stack
from tests.hostile import (
    assert_clean,
    file_backend_stack_fixture,  # noqa: F401  (the fixture `backend_stack`, also with content in S3)
    hidden_leftovers,
    jsonl_line,
    multipart,
)

CHAT = "/v1/chat/completions"
LINES = b"".join(jsonl_line(f"r{i}") + b"\n" for i in range(3))


def post_form(http: httpx.Client, body: bytes, ct: str) -> httpx.Response:
    return http.post("/v1/files", content=body, headers={"content-type": ct})


def visible_names(http: httpx.Client) -> list[str]:
    return [f["filename"] for f in http.get("/v1/files").json()["data"]]


def wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- the form


def test_file_before_purpose_is_accepted(backend_stack: Stack) -> None:
    http = backend_stack.http()
    body, ct = multipart([("file", "late-purpose.jsonl", LINES), ("purpose", None, b"batch")])
    r = post_form(http, body, ct)
    assert r.status_code == 200, r.text
    assert r.json()["purpose"] == "batch" and r.json()["bytes"] == len(LINES)
    assert http.get(f"/v1/files/{r.json()['id']}/content").content == LINES


def test_expires_after_is_honoured(backend_stack: Stack) -> None:
    http = backend_stack.http()
    body, ct = multipart([("purpose", None, b"batch"), ("expires_after[anchor]", None, b"created_at"),
                          ("expires_after[seconds]", None, b"7200"), ("file", "exp.jsonl", LINES)])
    got = post_form(http, body, ct).json()
    assert got["expires_at"] == got["created_at"] + 7200
    body, ct = multipart([("purpose", None, b"batch"), ("expires_after[anchor]", None, b"created_at"),
                          ("expires_after[seconds]", None, b"60"), ("file", "exp2.jsonl", LINES)])
    error = assert_clean(post_form(http, body, ct), 400)
    assert error is not None and error["param"] == "expires_after.seconds"


@pytest.mark.parametrize(("case", "parts", "close", "code", "param"), [
    ("second file", [("purpose", None, b"batch"), ("file", "a.jsonl", LINES), ("file", "b.jsonl", LINES)],
     True, "multiple_files", "file"),
    ("unknown field after the file", [("purpose", None, b"batch"), ("file", "a.jsonl", LINES),
                                      ("purpse", None, b"x")], True, "unknown_parameter", "purpse"),
    ("oversized later field", [("file", "a.jsonl", LINES), ("purpose", None, b"b" * 5000)], True,
     "field_too_long", "purpose"),
    ("no closing boundary", [("purpose", None, b"batch"), ("file", "a.jsonl", LINES)], False,
     "invalid_multipart", "file"),
    ("bad purpose after the file", [("file", "a.jsonl", LINES), ("purpose", None, b"fine-tune")], True,
     "invalid_purpose", "purpose"),
    ("purpose twice", [("purpose", None, b"batch"), ("file", "a.jsonl", LINES), ("purpose", None, b"batch")],
     True, "duplicate_parameter", "purpose"),
    ("no purpose", [("file", "a.jsonl", LINES)], True, "missing_required_parameter", "purpose"),
])
def test_a_complete_file_part_then_a_bad_form_stores_nothing(backend_stack: Stack, case: str,
                                                             parts: list[tuple[str, str | None, bytes]], close: bool,
                                                             code: str, param: str) -> None:
    http = backend_stack.http()
    before = visible_names(http)
    body, ct = multipart(parts, close=close)
    error = assert_clean(post_form(http, body, ct), 400)
    assert error is not None and (error["code"], error["param"]) == (code, param), (case, error)
    assert visible_names(http) == before
    assert hidden_leftovers(backend_stack.database_url) == (0, 0)


def test_a_bad_later_part_header_stores_nothing(backend_stack: Stack) -> None:
    http = backend_stack.http()
    body, ct = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", LINES)], close=False)
    body += b"--hostileBoundary42\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n--hostileBoundary42--\r\n"
    error = assert_clean(post_form(http, body, ct), 400)
    assert error is not None and error["code"] == "invalid_multipart"
    assert hidden_leftovers(backend_stack.database_url) == (0, 0)


# --------------------------------------------------------------------------- interrupted uploads


def _raw_upload_then_vanish(stack: Stack, body: bytes, ct: str, declared: int) -> None:
    """Send the headers and `body` of an upload that declares `declared` bytes, then close."""
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
        head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
                f"Content-Type: {ct}\r\nContent-Length: {declared}\r\n\r\n").encode()
        sock.sendall(head + body)


def _big_form(lines: int = 20_000) -> tuple[bytes, str]:
    content = b"".join(jsonl_line(f"r{i}", pad="x" * 200) + b"\n" for i in range(lines))
    return multipart([("purpose", None, b"batch"), ("file", "big.jsonl", content)])


def test_a_client_that_disconnects_mid_upload_leaves_nothing(backend_stack: Stack) -> None:
    body, ct = _big_form()
    _raw_upload_then_vanish(backend_stack, body[: len(body) // 2], ct, declared=len(body))
    wait_for("the cut-off upload to be discarded", lambda: hidden_leftovers(backend_stack.database_url) == (0, 0))


def test_a_body_cut_off_inside_the_file_part_is_400_and_stores_nothing(backend_stack: Stack) -> None:
    body, ct = _big_form(2_000)
    http = backend_stack.http()
    error = assert_clean(post_form(http, body[: len(body) - 500], ct), 400)
    assert error is not None and error["code"] == "invalid_multipart" and "truncated" in error["message"]
    assert hidden_leftovers(backend_stack.database_url) == (0, 0)


def test_a_crash_mid_upload_is_swept_after_restart(tmp_path: Path) -> None:
    """kill -9 during an upload leaves an `uploading` row and its chunks (nothing can run at a
    SIGKILL); the sweeper of the next start removes them once they are stale."""
    url = f"sqlite+aiosqlite:///{tmp_path}/crash.db"
    body, ct = _big_form(40_000)
    with start_stack(tmp_path / "one", url) as stack:
        sender = threading.Thread(target=_send_slowly, args=(stack, body, ct), daemon=True)
        sender.start()
        wait_for("chunks of the upload to be stored", lambda: hidden_leftovers(url)[1] > 0)
        stack.proc.send_signal(signal.SIGKILL)
        stack.proc.wait(30)
        sender.join(30)
        wait_for("Envoy to follow its parent", lambda: not pid_alive(stack.envoy_pid))
    left = hidden_leftovers(url)
    assert left[0] == 1 and left[1] > 0, left  # what the crash left behind
    with start_stack(tmp_path / "two", url, SLUICE_STALE_UPLOAD_SECONDS="1"):
        wait_for("the sweeper to remove the crashed upload", lambda: hidden_leftovers(url) == (0, 0))


def _send_slowly(stack: Stack, body: bytes, ct: str) -> None:
    try:
        with socket.create_connection(("127.0.0.1", stack.http_port), timeout=60) as sock:
            sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
                          f"Content-Type: {ct}\r\nContent-Length: {len(body)}\r\n\r\n").encode())
            for i in range(0, len(body), 256 * 1024):
                sock.sendall(body[i : i + 256 * 1024])
                time.sleep(0.05)
    except OSError:
        pass  # the server was killed under us: expected


# --------------------------------------------------------------------------- racing a delete


@pytest.fixture
def big_file(backend_stack: Stack) -> Iterator[tuple[str, bytes]]:
    """About 18 MB: more than Envoy and gRPC buffer, so a download is still reading when deleted."""
    content = b"".join(jsonl_line(f"r{i}", pad="y" * 1000) + b"\n" for i in range(16_000))
    body, ct = multipart([("purpose", None, b"batch"), ("file", "race.jsonl", content)])
    r = post_form(backend_stack.http(), body, ct)
    assert r.status_code == 200, r.text
    yield r.json()["id"], content


def test_a_download_racing_a_delete_gets_the_whole_file(backend_stack: Stack, big_file: tuple[str, bytes]) -> None:
    file_id, content = big_file
    http = backend_stack.http()
    got = bytearray()
    with http.stream("GET", f"/v1/files/{file_id}/content") as r:
        assert r.status_code == 200
        chunks = r.iter_raw(64 * 1024)
        got += next(chunks)
        assert http.delete(f"/v1/files/{file_id}").json()["deleted"] is True
        for chunk in chunks:
            got += chunk
    assert bytes(got) == content  # not a clean-looking short body
    assert_clean(http.get(f"/v1/files/{file_id}/content"), 404)
    assert_clean(http.get(f"/v1/files/{file_id}"), 404)


def test_a_create_racing_a_delete_sees_the_whole_file_or_404(backend_stack: Stack,
                                                           big_file: tuple[str, bytes]) -> None:
    file_id, content = big_file
    lines = content.count(b"\n")
    http, other = backend_stack.http(), backend_stack.http()
    results: list[httpx.Response] = []
    creator = threading.Thread(target=lambda: results.append(http.post("/v1/batches", json={
        "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})))
    creator.start()
    other.delete(f"/v1/files/{file_id}")
    creator.join(120)
    (r,) = results
    assert_clean(r, 200, 404)
    if r.status_code == 200:
        assert r.json()["request_counts"]["total"] == lines and r.json()["status"] != "failed", r.text[:300]
    else:
        assert r.json()["error"]["param"] == "input_file_id"
    assert json.loads(http.get("/v1/batches").text)["object"] == "list"

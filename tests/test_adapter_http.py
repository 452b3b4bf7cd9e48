"""The adapters' one HTTP boundary: every transport failure and HTTP error status becomes a
`ProviderError` with the right retry decision, and the provider's own message survives whatever
its envelope. Runs against a real loopback HTTP server (and a closed port), not a mock."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from adapters.base import ProviderError
from adapters.http import HttpClient, retry_after_seconds

# path -> (status, headers, body)
ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/ok": (200, {}, b'{"ok": true}'),
    "/not-json": (200, {}, b"<html>"),
    "/openai-400": (400, {}, json.dumps({"error": {"message": "bad model", "type": "invalid_request_error"}}).encode()),
    "/anthropic-404": (404, {}, json.dumps({"type": "error", "error": {"type": "not_found_error",
                                                                      "message": "no such batch"}}).encode()),
    "/mistral-422": (422, {}, json.dumps({"detail": [{"loc": ["body"], "msg": "field required"}]}).encode()),
    "/google-403": (403, {}, json.dumps({"error": {"code": 403, "message": "API key invalid",
                                                   "status": "PERMISSION_DENIED"}}).encode()),
    "/429": (429, {"Retry-After": "7"}, b'{"error": {"message": "slow down"}}'),
    "/503": (503, {}, b"upstream busy"),
    "/slow": (200, {}, b"{}"),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            self.server.release.wait(5)  # type: ignore[attr-defined]
        status, headers, body = ROUTES[self.path]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up (the timeout test): nothing to answer
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.release = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.release.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("path", "status", "retryable", "message"), [
    ("/openai-400", 400, False, "bad model"),
    ("/anthropic-404", 404, False, "no such batch"),
    ("/mistral-422", 422, False, "field required"),
    ("/google-403", 403, False, "API key invalid"),
    ("/429", 429, True, "slow down"),
    ("/503", 503, True, "upstream busy"),
])
async def test_http_errors_become_provider_errors(base_url: str, path: str, status: int, retryable: bool,
                                                  message: str) -> None:
    client = HttpClient("acme", base_url, {"authorization": "Bearer secret-key"})
    with pytest.raises(ProviderError) as caught:
        await client.request("GET", path)
    await client.aclose()
    err = caught.value
    assert (err.status_code, err.retryable, err.provider) == (status, retryable, "acme")
    assert message in err.message and f"HTTP {status}" in err.message
    assert "secret-key" not in err.message
    if path == "/429":
        assert err.retry_after == 7 and err.code == "rate_limited"


async def test_success_and_bad_json(base_url: str) -> None:
    client = HttpClient("acme", base_url, {})
    assert await client.json("GET", "/ok") == {"ok": True}
    with pytest.raises(ProviderError) as caught:
        await client.json("GET", "/not-json")
    assert caught.value.retryable
    await client.aclose()


async def test_transport_failures_are_retryable(base_url: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    refused = HttpClient("acme", f"http://127.0.0.1:{closed}", {})
    with pytest.raises(ProviderError) as caught:
        await refused.request("GET", "/ok")
    assert caught.value.retryable and caught.value.code == "provider_unreachable"
    await refused.aclose()

    slow = HttpClient("acme", base_url, {}, timeout=httpx.Timeout(0.2))
    with pytest.raises(ProviderError) as caught:
        await slow.request("GET", "/slow")
    assert caught.value.retryable and caught.value.code == "provider_timeout"
    await slow.aclose()


def test_retry_after_forms() -> None:
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds("-3") == 0.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (retry_after_seconds(later) or 0) <= 31
    assert retry_after_seconds("soon") is None

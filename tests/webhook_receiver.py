"""A real webhook receiver on loopback that verifies every request with the `standardwebhooks`
package, as a user's receiver would, and answers as the test scripts it (e.g. 500 twice, then 200).

    with WebhookReceiver(secret, fail_first=2) as rx:
        ... rx.url ...
        rx.accepted()   # the verified events it answered 2xx, in arrival order
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Delivery:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int
    payload: dict[str, Any] | None = None

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class WebhookReceiver:
    secret: str
    fail_first: int = 0  # answer 500 to the first N requests of each webhook-id
    always_fail: bool = False  # answer 500 to everything (the receiver is "down")
    requests: list[Delivery] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/sluice"

    def _handle(self, headers: dict[str, str], body: bytes) -> int:
        try:
            payload = Webhook(self.secret).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            payload, verified = None, False
        with self._lock:
            seen = sum(1 for r in self.requests if r.webhook_id and r.webhook_id == headers.get("webhook-id"))
            status = 400 if not verified else 500 if self.always_fail or seen < self.fail_first else 200
            self.requests.append(Delivery(headers, body, verified, status, payload))
        return status

    def accepted(self) -> list[Delivery]:
        """Verified requests answered 2xx, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.verified and r.answered == 200]

    def of(self, webhook_id: str) -> list[Delivery]:
        with self._lock:
            return [r for r in self.requests if r.webhook_id == webhook_id]

    def __enter__(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver._handle({k.lower(): v for k, v in self.headers.items()}, body)
                reply = json.dumps({"ok": status == 200}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

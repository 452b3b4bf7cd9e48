"""HTTP server, dispatch to provider modules, and the `/_fake/` control plane."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .anthropic import Anthropic
from .base import Provider
from .core import (
    JSON,
    PROVIDERS,
    Batch,
    Fault,
    HttpError,
    Request,
    Response,
    Store,
    finish,
    json_response,
    take_fault,
)
from .gemini import Gemini
from .mistral import Mistral
from .openai_like import AZURE, GROQ, OPENAI, OpenAILike
from .together import Together

BASE_PATHS = {
    "openai": "/openai/v1", "azure": "/azure/openai", "groq": "/groq/openai/v1", "together": "/together/v1",
    "anthropic": "/anthropic", "gemini": "/gemini", "mistral": "/mistral/v1",
}
CONTROL_BATCH = re.compile(r"^/_fake/batches/([a-z]+)/(.+)/(expire|fail|complete|cancel|settings)$")


class ProviderFake:
    """A loopback fake of the providers' batch APIs. `with ProviderFake() as fake: fake.base_url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keys: dict[str, str] | None = None,
                 polls_per_state: int = 1, anthropic_eventual_404: bool = False) -> None:
        self.store = Store(keys, polls_per_state, anthropic_eventual_404)
        self.providers: dict[str, Provider] = {
            "openai": OpenAILike(self.store, OPENAI), "azure": OpenAILike(self.store, AZURE),
            "groq": OpenAILike(self.store, GROQ), "together": Together(self.store),
            "anthropic": Anthropic(self.store), "gemini": Gemini(self.store), "mistral": Mistral(self.store),
        }
        self._host, self._port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle
    def start(self) -> ProviderFake:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer((self._host, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="provider-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ProviderFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "fake not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def url(self, provider: str) -> str:
        """Base URL of one provider, e.g. `url("openai")` -> `http://127.0.0.1:PORT/openai/v1`."""
        return self.base_url + BASE_PATHS[provider]

    def key(self, provider: str) -> str:
        return self.store.keys[provider]

    # --- control plane (also reachable over HTTP under /_fake/)
    def reset(self) -> None:
        self.store.reset()

    def configure(self, polls_per_state: int | None = None, anthropic_eventual_404: bool | None = None,
                  keys: dict[str, str] | None = None) -> None:
        with self.store.lock:
            if polls_per_state is not None:
                self.store.default_polls = int(polls_per_state)
            if anthropic_eventual_404 is not None:
                self.store.default_eventual_404 = bool(anthropic_eventual_404)
            self.store.keys.update(keys or {})

    def add_fault(self, **spec: Any) -> None:
        """provider, method, path_regex, status, retry_after, times, delay_seconds, body (see README)."""
        with self.store.lock:
            self.store.faults.append(Fault.from_json(spec))

    def clear_faults(self) -> None:
        with self.store.lock:
            self.store.faults.clear()

    def state(self) -> JSON:
        with self.store.lock:
            return self.store.snapshot()

    def batch_action(self, provider: str, batch_id: str, action: str, args: JSON | None = None) -> JSON:
        """expire | fail | complete | cancel | settings on one batch; returns {provider, id, state, kind}."""
        args = args or {}
        with self.store.lock:
            prov = self.providers.get(provider)
            b: Batch | None = None
            if prov is not None:
                b = self.store.get_batch(provider, batch_id.removeprefix("batches/"))
            if prov is None or b is None:
                raise HttpError(404, f"no {provider} batch {batch_id}")
            if action == "expire":
                finish(b, "expired")
            elif action == "fail":
                finish(b, "failed", args.get("reason") or "batch rejected by the fake (control plane)")
            elif action == "complete":
                finish(b, "completed")
            elif action == "cancel":  # provider-side cancel, as if the job were cancelled elsewhere
                finish(b, "cancelled")
            elif action == "settings":
                if "polls_per_state" in args:
                    b.polls_per_state = max(1, int(args["polls_per_state"]))
                if "cancel_race" in args:
                    b.cancel_race = bool(args["cancel_race"])
                if "eventual_404" in args:
                    b.eventual_404 = bool(args["eventual_404"])
            prov.ensure_final(b)
            return {"provider": provider, "id": b.id, "state": b.state, "kind": b.kind}

    def expire(self, provider: str, batch_id: str) -> JSON:
        return self.batch_action(provider, batch_id, "expire")

    def fail(self, provider: str, batch_id: str, reason: str | None = None) -> JSON:
        return self.batch_action(provider, batch_id, "fail", {"reason": reason})

    def complete(self, provider: str, batch_id: str) -> JSON:
        return self.batch_action(provider, batch_id, "complete")

    def settings(self, provider: str, batch_id: str, **kw: Any) -> JSON:
        return self.batch_action(provider, batch_id, "settings", kw)

    # --- request handling
    def control(self, req: Request) -> Response:
        try:
            body = req.json() if req.body else {}
            if req.path == "/_fake/reset" and req.method == "POST":
                self.reset()
            elif req.path == "/_fake/faults" and req.method == "POST":
                self.add_fault(**body)
            elif req.path == "/_fake/faults" and req.method == "DELETE":
                self.clear_faults()
            elif req.path == "/_fake/config" and req.method == "POST":
                self.configure(**body)
            elif req.path == "/_fake/state" and req.method == "GET":
                return json_response(200, self.state())
            elif (m := CONTROL_BATCH.match(req.path)) and req.method == "POST":
                return json_response(200, self.batch_action(m.group(1), m.group(2), m.group(3), body))
            else:
                return json_response(404, {"error": f"unknown control endpoint {req.method} {req.path}"})
        except HttpError as e:
            return json_response(e.status, {"error": e.message})
        except (ValueError, TypeError) as e:
            return json_response(400, {"error": str(e)})
        return json_response(200, {"ok": True})

    def handle(self, req: Request) -> Response:
        if req.path.startswith("/_fake/"):
            return self.control(req)
        arrived = time.monotonic()
        name = req.path.split("/")[1] if req.path.count("/") >= 1 else ""
        prov = self.providers.get(name)
        if prov is None:
            return json_response(404, {"error": f"unknown provider prefix in {req.path}; "
                                                f"use one of {list(PROVIDERS)}"})
        fault = take_fault(self.store, name, req.method, req.path)
        if fault is not None:
            if fault.delay_seconds:
                time.sleep(fault.delay_seconds)  # simulates a slow / timing-out provider
            if fault.status:
                resp = (json_response(fault.status, fault.body) if fault.body is not None
                        else prov.fault_response(fault.status, f"injected fault: HTTP {fault.status}"))
                if fault.retry_after is not None:
                    resp.headers["Retry-After"] = str(int(fault.retry_after)) \
                        if float(fault.retry_after).is_integer() else str(fault.retry_after)
                self._log(name, req, resp.status, True, arrived)
                return resp
        with self.store.lock:
            resp = prov.dispatch(req)
            self._log(name, req, resp.status, False, arrived)
        return resp

    def _log(self, provider: str, req: Request, status: int, fault: bool, arrived: float) -> None:
        """`at` is when the request arrived (time.monotonic()), so tests can measure the gaps a
        client left between requests (Retry-After, backoff)."""
        with self.store.lock:
            self.store.log.append({"provider": provider, "method": req.method, "path": req.path,
                                   "status": status, "fault": fault, "at": arrived})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: ProviderFake

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request.build(self.command, self.path, headers, self._read_body(), self.fake.base_url)
        try:
            resp = self.fake.handle(req)
        except Exception as e:  # a bug in the fake: answer 500 rather than hang the client
            resp = json_response(500, {"error": {"message": f"provider fake crashed: {e!r}", "type": "fake_bug"}})
        try:
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

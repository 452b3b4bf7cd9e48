"""HTTP server, dispatch to provider modules, and the `/_fake/` control plane."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .anthropic import Anthropic
from .base import Provider
from .conformance import Violation
from .core import (
    JSON,
    PROVIDERS,
    Batch,
    Fault,
    HttpError,
    Request,
    Response,
    Store,
    Target,
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
# Every fake started in this process, so one fixture can fail any test that made one see a violation.
LIVE: weakref.WeakSet[ProviderFake] = weakref.WeakSet()


def live_fakes() -> list[ProviderFake]:
    return list(LIVE)


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
        self._release = threading.Event()  # set: hung requests give up (faults cleared, fake stopped)
        self._refusing = False
        self._conns: set[socket.socket] = set()  # open client connections (dropped when refusing)
        self._conns_lock = threading.Lock()

    # --- lifecycle
    def start(self) -> ProviderFake:
        self._listen(self._port)
        LIVE.add(self)
        return self

    def _listen(self, port: int) -> None:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer((self._host, port), handler)
        self._server.daemon_threads = True
        self._port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="provider-fake", daemon=True)
        self._thread.start()

    def _close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def stop(self) -> None:
        self._release.set()
        self._refusing = False
        self._close()

    def refuse_connections(self) -> None:
        """Close the listening socket and drop every open connection: connecting to the port is
        refused (a provider that is down) until `accept_connections`."""
        self._refusing = True
        self._close()
        with self._conns_lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def accept_connections(self) -> None:
        """Listen again, on the same port."""
        if self._refusing:
            self._refusing = False
            self._listen(self._port)

    def __enter__(self) -> ProviderFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None or self._refusing, "fake not started"
        return self._port

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
        self._release.set()

    def configure(self, polls_per_state: int | None = None, anthropic_eventual_404: bool | None = None,
                  keys: dict[str, str] | None = None, **overrides: Any) -> None:
        """Defaults for new batches. `reported_status` / `reported_counts` (None clears) make every new
        batch report that status / those counts whatever it really does (see `settings`)."""
        unknown = set(overrides) - {"reported_status", "reported_counts"}
        if unknown:
            raise TypeError(f"unknown configure options {sorted(unknown)}")
        with self.store.lock:
            if polls_per_state is not None:
                self.store.default_polls = int(polls_per_state)
            if anthropic_eventual_404 is not None:
                self.store.default_eventual_404 = bool(anthropic_eventual_404)
            self.store.keys.update(keys or {})
            for key, value in overrides.items():
                if value is None:
                    self.store.default_overrides.pop(key, None)
                else:
                    self.store.default_overrides[key] = value

    def add_fault(self, **spec: Any) -> None:
        """provider, method, path_regex, status, retry_after, times (None: forever), delay_seconds, body,
        raw_body, hang, reset, batch, kind (see README)."""
        fault = Fault.from_json(spec)
        with self.store.lock:
            if fault.hang and self._release.is_set():
                self._release = threading.Event()
            self.store.faults.append(fault)

    def clear_faults(self) -> None:
        with self.store.lock:
            self.store.faults.clear()
            self._release.set()  # hung requests give up and drop their connections

    def state(self) -> JSON:
        with self.store.lock:
            return self.store.snapshot()

    def request_bodies(self, provider: str, method: str, path_regex: str) -> list[bytes]:
        """The bodies of the requests this provider received (since the last reset) whose method
        matches and whose path `re.search`es `path_regex`, oldest first."""
        with self.store.lock:
            return [body for p, m, path, body in self.store.bodies
                    if p == provider and m == method and re.search(path_regex, path)]

    def cancel_calls(self, provider: str, batch_id: str) -> int:
        """How many cancel requests for this provider batch reached the fake (faulted ones included)."""
        with self.store.lock:
            return self.store.cancels[provider].get(batch_id.removeprefix("batches/"), 0)

    def violations(self) -> list[Violation]:
        """Spec violations seen so far (requests that break the provider's spec, or answers of the fake's
        that do; see conformance.py)."""
        with self.store.lock:
            return list(self.store.violations)

    def take_violations(self) -> list[Violation]:
        """The violations seen so far, forgotten: a test that breaks a spec on purpose takes them and
        asserts on them; the conformance fixture fails any test that leaves one behind."""
        with self.store.lock:
            taken, self.store.violations = self.store.violations, []
            return taken

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
                unknown = set(args) - {"polls_per_state", "cancel_race", "eventual_404", "reported_status",
                                       "reported_counts"}
                if unknown:
                    raise HttpError(400, f"unknown settings {sorted(unknown)}")
                if "polls_per_state" in args:
                    b.polls_per_state = max(1, int(args["polls_per_state"]))
                if "cancel_race" in args:
                    b.cancel_race = bool(args["cancel_race"])
                if "eventual_404" in args:
                    b.eventual_404 = bool(args["eventual_404"])
                if "reported_status" in args:
                    b.reported_status = args["reported_status"]
                if "reported_counts" in args:
                    b.reported_counts = args["reported_counts"]
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
            elif req.path == "/_fake/violations" and req.method == "DELETE":
                return json_response(200, [v.as_json() for v in self.take_violations()])
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
        with self.store.lock:
            self.store.bodies.append((name, req.method, req.path, req.body))
            target = prov.target(req)
            if target.kind == "cancel" and target.batch_id:
                counts = self.store.cancels[name]
                counts[target.batch_id] = counts.get(target.batch_id, 0) + 1
            if prov.spec is not None:
                self.store.violations += prov.spec.check_request(req.method, req.path, req.query, req.headers,
                                                                 req.body)
        fault = take_fault(self.store, name, req.method, req.path, target)
        if fault is not None:
            resp = self._faulted(prov, req, fault)
            if resp is not None:
                self._log(name, req, resp.status, True, target, arrived)
                return resp
        with self.store.lock:
            self.store.off_spec = False
            resp = prov.dispatch(req)
            if prov.spec is not None and not self.store.off_spec:
                self.store.violations += prov.spec.check_response(req.method, req.path, resp.status, resp.headers,
                                                                  resp.body)
            self._log(name, req, resp.status, False, target, arrived)
        return resp

    def _faulted(self, prov: Provider, req: Request, fault: Fault) -> Response | None:
        """The answer a fault gives, or None when the request then proceeds normally (a pure delay)."""
        if fault.hang:
            release = self._release
            release.wait()  # until clear_faults() or stop(); then the connection is dropped unanswered
            return Response(0)
        if fault.reset:
            return Response(0)
        if fault.delay_seconds:
            time.sleep(fault.delay_seconds)  # simulates a slow / timing-out provider
        if fault.raw_body is not None:
            return Response(fault.status or 200, fault.raw_body.encode("utf-8", errors="surrogateescape"),
                            {"Content-Type": "application/octet-stream"})
        if not fault.status:
            return None
        resp = (json_response(fault.status, fault.body) if fault.body is not None
                else prov.fault_response(req, fault.status, f"injected fault: HTTP {fault.status}"))
        if fault.retry_after is not None:
            resp.headers["Retry-After"] = str(int(fault.retry_after)) \
                if float(fault.retry_after).is_integer() else str(fault.retry_after)
        return resp

    def _log(self, provider: str, req: Request, status: int, fault: bool, target: Target, arrived: float) -> None:
        """`at` is when the request arrived (time.monotonic()), so tests can measure the gaps a
        client left between requests (Retry-After, backoff)."""
        with self.store.lock:
            self.store.log.append({"provider": provider, "method": req.method, "path": req.path,
                                   "status": status, "fault": fault, "batch": target.batch_id,
                                   "kind": target.kind, "at": arrived})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: ProviderFake

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._conns_lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._conns_lock:
            self.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

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
        if resp.status == 0:  # a provider that drops the connection
            self.close_connection = True
            return
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

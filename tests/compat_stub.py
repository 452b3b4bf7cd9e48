"""A loopback OpenAI-compatible server (what Ollama or vLLM serve), for executor providers.

It answers `POST /v1/chat/completions` and `/v1/embeddings` with OpenAI-shaped bodies and usage
(prompt tokens = words of the message text, 5 completion tokens), after `latency` seconds, and
records what a capacity test needs to see from outside Sluice: how many requests were in flight
at once (`peak`), over time (`timeline`), and how many it answered 429. `throttle(n)` makes the
next `n` requests get a 429 with `Retry-After: 0`.

    with CompatStub(latency=0.05) as stub:
        stub.url            # http://127.0.0.1:PORT/v1
        stub.peak           # most requests in flight at once so far

Run as a process: `python -m tests.compat_stub --port 0 --latency 0.05` prints `PORT <n>`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class CompatStub:
    def __init__(self, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.served = 0
        self.throttled = 0
        self.pending_429 = 0
        self.timeline: list[tuple[float, int]] = []  # (time, in flight after a request started)
        self._host, self._port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> CompatStub:
        handler = type("Handler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer((self._host, self._port), handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 128
        self._thread = threading.Thread(target=self._server.serve_forever, name="compat-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> CompatStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    def throttle(self, count: int) -> None:
        """Answer the next `count` requests 429."""
        with self.lock:
            self.pending_429 = count

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = self.in_flight
            self.timeline.clear()

    def answer(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if self.pending_429 > 0:
                self.pending_429 -= 1
                self.throttled += 1
                return 429, {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                       "code": "rate_limited"}}
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.timeline.append((time.monotonic(), self.in_flight))
        try:
            if self.latency:
                time.sleep(self.latency)
            return 200, _body(path, body if isinstance(body, dict) else {})
        finally:
            with self.lock:
                self.in_flight -= 1
                self.served += 1


def _words(body: dict[str, Any]) -> int:
    text = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            text.append(content)
    raw = body.get("input")
    text.extend([raw] if isinstance(raw, str) else [x for x in raw or [] if isinstance(x, str)])
    return max(len(" ".join(text).split()), 1)


def _body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    prompt = _words(body)
    if path.endswith("/embeddings"):
        return {"object": "list", "model": body.get("model", ""),
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 1_700_000_000,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "stub says hello"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: CompatStub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        status, answer = self.stub.answer(self.path, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    stub = CompatStub(args.latency, port=args.port).start()
    print(f"PORT {stub.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    main()

"""`OpenAICompatibleExecutor` (Ollama, vLLM, any OpenAI-compatible server without a batch API):
whole batches through the real Sluice engine against a tiny stdlib OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from adapters.base import ProviderError, RequestLine
from adapters.openai_compatible import OpenAICompatibleExecutor, request_path
from adapters.sim import SimProvider
from service.domain.model import Price
from service.providers.registry import load_entries
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from sluice.v1 import batch_pb2
from tests.harness import chat_line, gateway, make_settings

PRICE = Price(input_per_mtok=1.0, output_per_mtok=4.0, batch_discount=0.0)
LATENCY = 0.02  # the server's simulated work per request, so concurrent requests overlap
RETRY_AFTER = 1.5  # longer than the engine's own first backoff (0.25-0.5 s), so ignoring it shows


class Local:
    """An OpenAI-compatible server on 127.0.0.1 (like `ollama serve` at `/v1`).

    Markers in the user text: `FAIL` → 400 with an OpenAI error body; `BUSY` → 429 + Retry-After the
    first time; `BOOM` → 500 the first time. It records the peak number of requests in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.seen: dict[str, int] = {}
        self.paths: list[str] = []
        self.arrivals: dict[str, list[float]] = {}  # user text -> when each request for it arrived
        self.auth: set[str] = set()
        self.traceparents: list[str | None] = []  # each request's traceparent header (tests/test_observability.py)
        local = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                with local.lock:
                    local.traceparents.append(self.headers.get("traceparent"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = local.handle(self.path, body, self.headers.get("Authorization", ""))
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "x-request-id": "req-local",
                             "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handle(self, path: str, body: dict[str, Any], auth: str) -> tuple[int, Any, dict[str, str]]:
        arrived = time.monotonic()
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.paths.append(path)
            self.auth.add(auth)
        try:
            time.sleep(LATENCY)  # simulated model latency (server side), not test synchronisation
            if path == "/v1/embeddings":
                text = body["input"]
                n = len(text.split())
                return 200, {"object": "list", "model": body["model"],
                             "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                             "usage": {"prompt_tokens": n, "total_tokens": n}}, {}
            if path != "/v1/chat/completions":
                return 404, {"error": {"message": f"no route {path}", "type": "not_found", "code": None}}, {}
            text = body["messages"][-1]["content"]
            with self.lock:
                self.arrivals.setdefault(text, []).append(arrived)
                self.seen[text] = self.seen.get(text, 0) + 1
                first = self.seen[text] == 1
            if "FAIL" in text:
                return 400, {"error": {"message": "bad request: FAIL", "type": "invalid_request_error",
                                       "param": "messages", "code": "bad_marker"}}, {}
            if "BUSY" in text and first:
                return (429, {"error": {"message": "slow down", "type": "rate_limit_error"}},
                        {"Retry-After": str(RETRY_AFTER)})
            if "BOOM" in text and first:
                return 500, {"error": {"message": "internal", "type": "server_error"}}, {}
            p = len(text.split())
            return 200, {"id": "chatcmpl-x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " + text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": p, "completion_tokens": 2, "total_tokens": p + 2}}, {}
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def local() -> Iterator[Local]:
    server = Local()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def router_for(local: Local, concurrency: int = 2) -> Router:
    executor = OpenAICompatibleExecutor("local", base_url=local.url, api_key="ollama",
                                        options={"concurrency": concurrency})
    return Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                   "local": ProviderEntry(provider=executor, models={"llama3.2"}, prices={"llama3.2": PRICE})})


async def test_batch_through_the_executor(local: Local, db_url: str) -> None:
    texts = {f"ok{i}": f"question number {i}" for i in range(8)}
    texts |= {"bad": "please FAIL", "busy": "BUSY at first", "boom": "BOOM once"}
    db = db_url
    async with gateway(make_settings(db), router_for(local, concurrency=2)) as (_, c):
        created = await c.create([chat_line(cid, text, model="local/llama3.2") for cid, text in texts.items()])
        batch = await c.wait_for(created.id, timeout=30)
        results = {r.custom_id: r for r in await c.results(created.id)}
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (11, 10, 1)
    ok = results["ok3"]
    assert ok.status == "completed" and ok.status_code == 200 and ok.response["choices"][0]["message"]["content"] \
        == "ok question number 3"
    assert ok.usage.input_tokens == 3 and ok.usage.output_tokens == 2
    assert ok.usage.input_cost == pytest.approx(3 / 1e6) and ok.usage.output_cost == pytest.approx(8 / 1e6)
    bad = results["bad"]
    assert bad.status == "failed" and bad.status_code == 400
    assert bad.error.code == "bad_marker" and bad.error.message == "bad request: FAIL"
    assert bad.response["error"]["param"] == "messages"
    # 429 and 500 were retried by the engine and then succeeded.
    assert results["busy"].status == "completed" and results["boom"].status == "completed"
    assert local.seen["BUSY at first"] == 2 and local.seen["BOOM once"] == 2
    busy = local.arrivals["BUSY at first"]
    assert busy[1] - busy[0] >= RETRY_AFTER, f"retried {busy[1] - busy[0]:.2f}s after a 429 asking for {RETRY_AFTER}s"
    assert local.peak <= 2 and local.peak == 2
    assert set(local.paths) == {"/v1/chat/completions"} and local.auth == {"Bearer ollama"}


async def test_embeddings_batch(local: Local, db_url: str) -> None:
    body = struct_pb2.Struct()
    body.update({"model": "local/llama3.2", "input": "four words of input"})
    db = db_url
    async with gateway(make_settings(db), router_for(local)) as (_, c):
        created = await c.create([batch_pb2.BatchRequestLine(custom_id="e", method="POST", url="/v1/embeddings",
                                                             body=body)], endpoint="/v1/embeddings")
        batch = await c.wait_for(created.id, timeout=30)
        (result,) = await c.results(created.id)
    assert batch.status == "completed" and result.usage.input_tokens == 4 and result.usage.output_tokens == 0


async def test_execute_directly(local: Local) -> None:
    executor = OpenAICompatibleExecutor("local", base_url=local.url, api_key="", options={})
    assert executor.concurrency == 8
    line = RequestLine(5, "x", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    result = await executor.execute(line)
    assert result.ok and result.index == 5 and result.request_id == "req-local"
    busy = RequestLine(6, "y", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user",
                                                                                     "content": "BUSY now"}]})
    with pytest.raises(ProviderError) as info:
        await executor.execute(busy)
    assert info.value.retryable and info.value.status_code == 429
    assert info.value.retry_after == pytest.approx(RETRY_AFTER)
    missing = await executor.execute(RequestLine(7, "z", "/v1/completions", {"model": "m", "prompt": "hi"}))
    assert not missing.ok and missing.status_code == 404 and missing.body is not None
    assert missing.body["error"]["message"] == "no route /v1/completions"
    assert local.auth == {""}
    await executor.aclose()


async def test_unreachable_is_retryable() -> None:
    executor = OpenAICompatibleExecutor("local", base_url="http://127.0.0.1:9/v1", api_key="", options={})
    with pytest.raises(ProviderError) as info:
        await executor.execute(RequestLine(0, "x", "/v1/chat/completions", {"model": "m", "messages": []}))
    assert info.value.retryable
    await executor.aclose()


@pytest.mark.parametrize(("base", "url", "want"), [
    ("http://h:11434/v1", "/v1/chat/completions", "/chat/completions"),
    ("http://h:11434/v1/", "/v1/embeddings", "/embeddings"),
    ("http://h:8000", "/v1/chat/completions", "/v1/chat/completions"),
    ("http://h:8000/openai", "/v1/responses", "/v1/responses"),
])
def test_request_path(base: str, url: str, want: str) -> None:
    assert request_path(base, url) == want


def test_providers_yaml(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text("""
providers:
  ollama:
    kind: openai_compatible
    base_url: http://127.0.0.1:11434/v1
    options: {concurrency: 3}
    models: [llama3.2]
""")
    entry = load_entries(path, {})["ollama"]
    assert isinstance(entry.provider, OpenAICompatibleExecutor) and entry.provider.concurrency == 3

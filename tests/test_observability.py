"""Metrics, traces and JSON logs, from outside: the real `sluice run` (server + Envoy) in a child
process, an OpenAI-compatible provider on loopback, Prometheus' own parser for the exposition, and
a loopback OTLP/HTTP receiver that decodes what the server exports."""

from __future__ import annotations

import io
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from service.runtime.envoy import EnvoyProcess, render_config
from tests.e2e import Stack, free_port, start_stack
from tests.test_adapter_openai_compatible import Local

PROVIDERS = """
providers:
  local:
    kind: openai_compatible
    base_url: {url}
    api_key_env: SLUICE_TEST_LOCAL_KEY
    options: {{concurrency: 2}}
    models: [llama3.2]
    prices:
      llama3.2: {{input_per_mtok: 1.0, output_per_mtok: 4.0, batch_discount: 0.0}}
"""


@pytest.fixture
def local() -> Iterator[Local]:
    server = Local()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _providers(tmp_path: Path, local: Local) -> dict[str, str]:
    path = tmp_path / "providers.yaml"
    path.write_text(PROVIDERS.format(url=local.url))
    return {"SLUICE_PROVIDERS_FILE": str(path), "SLUICE_TEST_LOCAL_KEY": "ollama"}


def _jsonl(texts: dict[str, str]) -> bytes:
    return "\n".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "local/llama3.2", "messages": [{"role": "user", "content": t}]}})
                     for cid, t in texts.items()).encode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, **headers: str) -> Samples:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def _run_batch(stack: Stack, texts: dict[str, str], headers: dict[str, str] | None = None) -> Any:
    """Upload the lines as a file (returns the size of the whole multipart body sent) and run them."""
    client, http = stack.sdk(), stack.http()
    upload = http.build_request("POST", "/v1/files", data={"purpose": "batch"},
                                files={"file": ("in.jsonl", io.BytesIO(_jsonl(texts)), "application/jsonl")})
    form_bytes = len(upload.read())
    uploaded = http.send(upload)
    assert uploaded.status_code == 200, uploaded.text
    batch = client.batches.create(input_file_id=uploaded.json()["id"], endpoint="/v1/chat/completions",
                                  completion_window="24h", extra_headers=headers or {})
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {batch.status}\n{stack.log_tail()}"
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    return batch, form_bytes


def test_metrics_count_a_batch_on_the_metrics_port_and_through_envoy(tmp_path: Path, local: Local) -> None:
    metrics_port = free_port()
    receiver = _Upstream()  # the webhook receiver: answers 200
    hooks = tmp_path / "webhooks.yaml"
    hooks.write_text(f"webhooks:\n  - id: ops\n    project: alpha\n    url: http://127.0.0.1:{receiver.port}/hook\n"
                     f"    secret: whsec_{'A' * 32}\nallow_networks: [127.0.0.0/8]\n")
    texts = {"a": "first question", "b": "second question here", "c": "third", "bad": "please FAIL",
             "busy": "BUSY at first"}
    with start_stack(tmp_path / "stack", f"sqlite+aiosqlite:///{tmp_path}/db.sqlite",
                     SLUICE_METRICS_PORT=str(metrics_port), SLUICE_WEBHOOKS_FILE=str(hooks),
                     **_providers(tmp_path, local)) as stack:
        batch, form_bytes = _run_batch(stack, texts)
        assert batch.status == "completed" and batch.request_counts.completed == 4
        client = stack.sdk()
        output = client.files.content(batch.output_file_id).content
        missing = stack.http().get("/v1/batches/batch_doesnotexist")
        assert missing.status_code == 404

        _until("the webhook delivery", lambda: value(scrape(f"http://127.0.0.1:{metrics_port}/metrics"),
                                                      "sluice_webhook_deliveries_total", outcome="delivered"))
        direct = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        via_envoy = scrape(f"{stack.url}/metrics")
    receiver.close()

    for samples in (direct, via_envoy):
        # RPCs: by service, method and code, with latency (the REST calls went through the transcoder).
        rpc = {"grpc_type": "unary", "grpc_service": "sluice.v1.BatchService"}
        assert value(samples, "grpc_server_handled_total", **rpc, grpc_method="CreateBatch", grpc_code="OK") == 1
        assert value(samples, "grpc_server_handled_total", **rpc, grpc_method="GetBatch", grpc_code="NOT_FOUND") == 1
        assert value(samples, "grpc_server_handling_seconds_count", **rpc, grpc_method="CreateBatch") == 1
        assert value(samples, "grpc_server_started_total", **rpc, grpc_method="CreateBatch") == 1
        assert value(samples, "grpc_server_handled_total", grpc_type="client_stream",
                     grpc_service="sluice.v1.FileService", grpc_method="UploadFile", grpc_code="OK") == 1
        # Lines, tokens and cost by provider and (declared) model, equal to what the batch says.
        line = {"provider": "local", "model": "llama3.2"}
        assert value(samples, "sluice_lines_total", **line, status="completed") == 4
        assert value(samples, "sluice_lines_total", **line, status="failed") == 1
        assert value(samples, "sluice_tokens_total", **line, kind="input") == batch.usage.input_tokens > 0
        assert value(samples, "sluice_tokens_total", **line, kind="output") == batch.usage.output_tokens == 8
        assert value(samples, "sluice_cost_dollars_total", **line) == pytest.approx(
            batch.to_dict()["usage"]["total_cost"], rel=1e-9)
        # Provider calls by outcome, and the retry after the 429.
        call = {"provider": "local", "operation": "execute"}
        assert value(samples, "sluice_provider_calls_total", **call, outcome="ok") == 4
        assert value(samples, "sluice_provider_calls_total", **call, outcome="error_response") == 1
        assert value(samples, "sluice_provider_calls_total", **call, outcome="retryable_error") == 1
        assert value(samples, "sluice_provider_call_duration_seconds_count", **call) == 6
        assert value(samples, "sluice_provider_retries_total", **call) == 1
        assert value(samples, "sluice_provider_backoff_seconds_count", **call) == 1
        # Bytes through the file API.
        assert value(samples, "sluice_file_upload_bytes_total") == form_bytes
        assert value(samples, "sluice_file_download_bytes_total") == len(output) > 0
        # Gauges from the database.
        assert value(samples, "sluice_batches", status="completed", provider="local") == 1
        assert value(samples, "sluice_batches_waiting") == 0
        assert value(samples, "sluice_engine_leases_held") == 0
        assert "process_resident_memory_bytes" in names(samples)
        # The batch.completed event, delivered once.
        assert value(samples, "sluice_webhook_deliveries_total", outcome="delivered") == 1
        assert value(samples, "sluice_webhook_delivery_duration_seconds_count") == 1
    # No label value is a batch id or a custom_id.
    labels = {v for _, pairs in direct for _, v in pairs}
    assert not any(v.startswith(("batch_", "file-")) or v in texts for v in labels)


class _Upstream:
    """A stand-in for the metrics port, and a webhook receiver: answers every GET with a fixed
    body, every POST with 204."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = b"up 1\n"
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("allow", "public", "status"), [
    (None, False, 200),                 # the default rule: loopback clients are admitted
    (("10.0.0.0/8",), False, 403),      # a rule that leaves loopback out: this client is refused
    (("10.0.0.0/8",), True, 200),       # public: no rule at all
])
def test_envoy_admits_metrics_clients_by_their_own_address(tmp_path: Path, allow: tuple[str, ...] | None,
                                                           public: bool, status: int) -> None:
    """Loopback is the only address a test can connect from, so the refusal is proved by a rule that
    does not admit loopback, rendered exactly as the default one is. The rule matches the TCP peer
    (`direct_remote_ip`): an X-Forwarded-For naming an admitted address changes nothing."""
    upstream = _Upstream()
    http_port = free_port()
    extra: dict[str, Any] = {"metrics_allow": allow} if allow else {}
    config = render_config("127.0.0.1", http_port, free_port(), free_port(), tmp_path, health_check=False,
                           metrics_port=upstream.port, metrics_public=public, **extra)
    try:
        with EnvoyProcess(config, "127.0.0.1", http_port):
            for headers in ({}, {"x-forwarded-for": "10.1.2.3"}):
                r = httpx.get(f"http://127.0.0.1:{http_port}/metrics", headers=headers, timeout=10)
                assert r.status_code == status, r.text
                if status == 200:
                    assert r.text == "up 1\n"
                else:
                    assert r.json()["error"]["message"]  # Envoy's refusal, in OpenAI's envelope
            # Only /metrics reaches the metrics port.
            assert httpx.get(f"http://127.0.0.1:{http_port}/metrics/x", timeout=10).status_code == 404
    finally:
        upstream.close()


def test_no_metrics_route_without_a_metrics_port(tmp_path: Path) -> None:
    http_port = free_port()
    config = render_config("127.0.0.1", http_port, free_port(), free_port(), tmp_path, health_check=False)
    assert "sluice_metrics" not in config.read_text()
    with EnvoyProcess(config, "127.0.0.1", http_port):
        r = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10)
        assert r.status_code == 404 and r.json()["error"]


# --------------------------------------------------------------------------- traces


class OtlpReceiver:
    """A loopback OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.spans += [span for rs in request.resource_spans for ss in rs.scope_spans
                                       for span in ss.spans]
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value or v.int_value or v.bool_value
    return out


SERVER, CLIENT = 2, 3  # opentelemetry.proto Span.SpanKind


def _is_sql(span: Any) -> bool:
    return any(key.startswith("db.") for key in _attrs(span))


def _is_http(span: Any) -> bool:
    return span.kind == CLIENT and any(key in _attrs(span) for key in ("http.request.method", "http.method"))


def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def test_a_rest_traceparent_reaches_the_server_sql_and_provider_spans(tmp_path: Path, local: Local) -> None:
    receiver = OtlpReceiver()
    trace_id, parent_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_span}-01"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
           "SLUICE_LOG_FORMAT": "json", **_providers(tmp_path, local)}
    try:
        with start_stack(tmp_path / "stack", f"sqlite+aiosqlite:///{tmp_path}/db.sqlite", **env) as stack:
            batch, _ = _run_batch(stack, {"a": "hello there", "b": "general kenobi"},
                                  headers={"traceparent": traceparent})
            assert batch.status == "completed"

            def spans() -> list[Any] | None:
                found = receiver.of_trace(trace_id)
                # the RPC, the engine's step, the HTTP calls to the provider, and SQL statements
                ok = (any(s.kind == SERVER for s in found) and len([s for s in found if _is_http(s)]) >= 2
                      and any(s.name == "sluice.engine.step" for s in found) and any(_is_sql(s) for s in found))
                return found if ok and len(local.traceparents) >= 2 else None
            found = _until("the trace's spans at the receiver", spans)
            log_lines = (stack.work_dir / "sluice.stderr").read_text().splitlines()
    finally:
        receiver.close()
    by_id = {s.span_id: s for s in found}
    server = [s for s in found if s.kind == SERVER and s.name == "/sluice.v1.BatchService/CreateBatch"]
    assert len(server) == 1, [s.name for s in found]
    assert server[0].parent_span_id.hex() == parent_span  # continued the client's trace, through Envoy
    assert _attrs(server[0])["sluice.batch_id"] == batch.id
    sql = [s for s in found if _is_sql(s)]
    assert any(by_id.get(s.parent_span_id) is server[0] for s in sql)  # SQL inside the RPC
    steps = [s for s in found if s.name == "sluice.engine.step"]
    assert steps and all(_attrs(s)["sluice.batch_id"] == batch.id for s in steps)
    provider_calls = [s for s in found if _is_http(s) and by_id.get(s.parent_span_id) in steps]
    assert len(provider_calls) == 2  # one per line, children of the engine's step
    # The provider saw the same trace id in its traceparent header.
    assert all(tp is not None and tp.split("-")[1] == trace_id for tp in local.traceparents)
    # JSON logs: every Python log line is JSON (gRPC's C core writes its own lines, which are not
    # Python logging's); a line logged inside the trace carries its ids.
    assert not [line for line in log_lines if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", line)]
    records = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r.get("trace_id") == trace_id and len(r.get("span_id", "")) == 16 for r in records), records[-5:]

"""OpenAI, Azure OpenAI and Groq native batch adapters: whole batches through the real Sluice engine
against the loopback provider fake, plus unit tests of the shared OpenAI-format normalisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.base import BatchJob, LineError, ProviderError, ProviderState, RequestLine, TokenUsage
from adapters.openai import AzureOpenAIAdapter, GroqAdapter, OpenAIAdapter
from adapters.openai_format import (
    batch_errors,
    openai_batch_status,
    openai_status,
    result_from_output_line,
    usage_from_openai,
)
from service.providers.registry import load_entries
from tests import native_scenarios as sc
from tests.harness import chat_line, gateway
from tests.native_scenarios import Flavor, fake_server  # noqa: F401  (module-scoped fixture)
from tests.provider_fake import ProviderFake

OPENAI = Flavor("openai", OpenAIAdapter, "gpt-4o-mini", detailed_usage=True)
AZURE = Flavor("azure", AzureOpenAIAdapter, "gpt-4o-mini-batch", detailed_usage=True)
GROQ = Flavor("groq", GroqAdapter, "llama-3.1-8b-instant", detailed_usage=False)
FLAVORS = [pytest.param(f, id=f.provider) for f in (OPENAI, AZURE, GROQ)]


@pytest.fixture
def fake(fake_server: ProviderFake) -> ProviderFake:  # noqa: F811
    return sc.fresh(fake_server)


@pytest.fixture
def db(db_url: str) -> str:
    """Both backends (conftest's `db_url`)."""
    return db_url


# --------------------------------------------------------------------------- whole batches


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_full_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.full_batch(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_cancel(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.cancel_batch(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_cancel_that_loses_the_race_ends_completed(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.cancel_loses_the_race(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_cancel_before_submission(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.cancel_before_submission(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_expiry(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.expire_batch(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_transient_faults_do_not_fail_the_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.transient_faults(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_non_retryable_submit_error_fails_the_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.submit_rejected(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_provider_side_failure(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.provider_failed(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_restart_mid_poll_creates_one_provider_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.restart_mid_poll(fake, db, flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_find_submitted_recovers_a_lost_submission(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    await sc.recover_lost_submission(fake, db, flavor)


async def test_embeddings_and_responses_batches(fake: ProviderFake, db: str) -> None:
    """Non-chat endpoints go through unchanged, with their own usage shapes."""
    from google.protobuf import struct_pb2

    from sluice.v1 import batch_pb2

    def line(cid: str, url: str, body: dict[str, Any]) -> batch_pb2.BatchRequestLine:
        s = struct_pb2.Struct()
        s.update({"model": OPENAI.sluice_model, **body})
        return batch_pb2.BatchRequestLine(custom_id=cid, method="POST", url=url, body=s)

    async with gateway(sc.settings(db), sc.make_router(fake, OPENAI)) as (_, c):
        emb = await c.create([line("e1", "/v1/embeddings", {"input": "three little words"})],
                             endpoint="/v1/embeddings")
        resp = await c.create([line("r1", "/v1/responses", {"input": "THINK twice"})], endpoint="/v1/responses")
        emb_batch = await c.wait_for(emb.id)
        resp_batch = await c.wait_for(resp.id)
        (e1,) = await c.results(emb.id)
        (r1,) = await c.results(resp.id)
    assert emb_batch.status == resp_batch.status == "completed"
    assert e1.status == "completed" and e1.usage.input_tokens == 3 and e1.usage.output_tokens == 0
    assert len(e1.response["data"][0]["embedding"]) == 8
    assert r1.status == "completed" and r1.usage.input_tokens == 2
    assert r1.usage.output_tokens == 3 + 3 and r1.usage.output_tokens_details.reasoning_tokens == 3


async def test_azure_wire_details(fake: ProviderFake, db: str) -> None:
    """Azure: api-key header, api-version on every call, endpoint without /v1, the upload waited
    for until `processed`, and a zero-byte error file read as no lines."""
    await sc.full_batch(fake, db, AZURE)
    requests = [r for r in fake.state()["requests"] if r["provider"] == "azure"]
    assert all(r["status"] < 400 for r in requests), requests
    assert any(r["method"] == "GET" and r["path"].startswith("/azure/openai/files/file-") for r in requests)
    with fake.store.lock:
        (batch,) = fake.store.batches["azure"].values()
        assert batch.data["endpoint"] == "/chat/completions"
        inp = fake.store.files["azure"][batch.data["input_file_id"]].data
    assert json.loads(inp.splitlines()[0])["url"] == "/chat/completions"


async def test_azure_one_deployment_per_batch(fake: ProviderFake, db: str) -> None:
    """Two deployments in one batch are refused at create, naming the second line (Azure would
    answer model_mismatch after the upload)."""
    router = sc.make_router(fake, AZURE)
    router.entries["azure"].models.add("other-deployment")
    await sc.refused_at_create(fake, db, router, [chat_line("a", "hi", model="azure/gpt-4o-mini-batch"),
                                                  chat_line("b", "hi", model="azure/other-deployment")],
                               "mixed_models", "requests[1].body.model")


async def test_azure_deployment_map_and_api_version(fake: ProviderFake) -> None:
    adapter = AzureOpenAIAdapter("azure", base_url=fake.url("azure"), api_key=fake.key("azure"),
                                 options={"deployments": {"gpt-4o-mini": "gpt-4o-mini-batch"}})
    line = RequestLine(0, "x", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    assert adapter.encode_line(line) == {"custom_id": "sl-0", "method": "POST", "url": "/chat/completions",
                                         "body": {"model": "gpt-4o-mini-batch", "messages": []}}
    assert adapter.query() == {"api-version": "2024-10-21"}
    v1 = AzureOpenAIAdapter("azure", base_url="https://r.openai.azure.com/openai/v1", api_key="k",
                            options={"api_version": "2025-01-01"})
    assert v1.query() is None and v1.endpoint_path("/v1/chat/completions") == "/v1/chat/completions"
    dated = AzureOpenAIAdapter("azure", base_url="https://r.openai.azure.com/openai", api_key="k",
                               options={"api_version": "2025-01-01"})
    assert dated.query() == {"api-version": "2025-01-01"}
    await adapter.aclose()


async def test_groq_rejects_non_chat_endpoints(fake: ProviderFake, db: str) -> None:
    from google.protobuf import struct_pb2

    from sluice.v1 import batch_pb2

    body = struct_pb2.Struct()
    body.update({"model": GROQ.sluice_model, "input": "hello"})
    line = batch_pb2.BatchRequestLine(custom_id="e", method="POST", url="/v1/embeddings", body=body)
    await sc.refused_at_create(fake, db, sc.make_router(fake, GROQ), [line], "unsupported_endpoint",
                               "requests[0].url", endpoint="/v1/embeddings")


async def test_groq_completion_window_option(fake: ProviderFake) -> None:
    adapter = GroqAdapter("groq", base_url=fake.url("groq"), api_key=fake.key("groq"),
                          options={"completion_window": "7d"})
    job = BatchJob("batch_w", "/v1/chat/completions", "m", "24h", 1)
    assert adapter.create_body(job, "file-1")["completion_window"] == "7d"

    async def one() -> Any:
        yield RequestLine(0, "a", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})

    pid = await adapter.submit(job, one())
    assert await adapter.find_submitted("batch_w") == pid
    assert await adapter.find_submitted("batch_other") is None
    await adapter.aclose()


async def test_find_submitted_follows_pagination(fake: ProviderFake) -> None:
    adapter = OpenAIAdapter("openai", base_url=fake.url("openai"), api_key=fake.key("openai"), options={})

    async def one() -> Any:
        yield RequestLine(0, "a", "/v1/chat/completions", {"model": "m", "messages": []})

    first = await adapter.submit(BatchJob("batch_first", "/v1/chat/completions", "m", "24h", 1), one())
    for i in range(105):  # push the first one onto the second page of 100
        await adapter.submit(BatchJob(f"batch_{i}", "/v1/chat/completions", "m", "24h", 1), one())
    assert await adapter.find_submitted("batch_first") == first
    adapter.find_pages = 1
    assert await adapter.find_submitted("batch_first") is None
    await adapter.aclose()


async def test_auth_failure_is_not_retryable(fake: ProviderFake) -> None:
    adapter = OpenAIAdapter("openai", base_url=fake.url("openai"), api_key="wrong", options={})
    with pytest.raises(ProviderError) as info:
        await adapter.poll("batch_nope")
    assert not info.value.retryable and info.value.status_code == 401
    await adapter.aclose()


async def test_providers_yaml_builds_the_adapters(fake: ProviderFake, tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(f"""
providers:
  openai:
    base_url: {fake.url("openai")}
    api_key_env: OPENAI_KEY
    models: {{gpt-4o-mini: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}
  azure:
    base_url: {fake.url("azure")}
    api_key_env: AZURE_KEY
    aliases: {{gpt-4o-mini: gpt-4o-mini-batch}}
    options: {{api_version: "2024-10-21"}}
  groq:
    base_url: {fake.url("groq")}
    api_key_env: GROQ_KEY
    batch_discount: 0.25
    models: [llama-3.1-8b-instant]
""")
    entries = load_entries(path, {"OPENAI_KEY": "k1", "AZURE_KEY": "k2", "GROQ_KEY": "k3"})
    assert isinstance(entries["openai"].provider, OpenAIAdapter)
    assert isinstance(entries["azure"].provider, AzureOpenAIAdapter)
    assert isinstance(entries["groq"].provider, GroqAdapter)
    assert entries["groq"].price("llama-3.1-8b-instant").batch_discount == 0.25
    for entry in entries.values():
        await entry.provider.aclose()


# --------------------------------------------------------------------------- unit: normalisation


@pytest.mark.parametrize(("raw", "want"), [
    ("validating", ProviderState.VALIDATING), ("in_progress", ProviderState.IN_PROGRESS),
    ("finalizing", ProviderState.FINALIZING), ("completed", ProviderState.COMPLETED),
    ("failed", ProviderState.FAILED), ("expired", ProviderState.EXPIRED),
    ("cancelling", ProviderState.CANCELLING), ("cancelled", ProviderState.CANCELLED),
    ("Validating", ProviderState.VALIDATING), ("Completed", ProviderState.COMPLETED),  # older Azure previews
    ("InProgress".lower(), ProviderState.IN_PROGRESS), ("canceling", ProviderState.CANCELLING),
    ("something_new", ProviderState.IN_PROGRESS), (None, ProviderState.IN_PROGRESS),
])
def test_openai_status_map(raw: Any, want: ProviderState) -> None:
    assert openai_status(raw) is want


def test_openai_batch_status_counts_and_errors() -> None:
    state = openai_batch_status({
        "status": "Failed", "request_counts": {"total": 10, "completed": 7, "failed": 3},
        "errors": {"object": "list", "data": [{"code": "model_mismatch", "message": "two models", "line": 4,
                                               "param": "body.model"}]}})
    assert state.status is ProviderState.FAILED and state.raw_status == "Failed" and state.ended
    assert (state.total, state.completed, state.failed) == (10, 7, 3)
    assert state.errors[0].code == "model_mismatch" and state.errors[0].line == 4
    bare = openai_batch_status({"status": "in_progress"})
    assert (bare.total, bare.completed, bare.failed, bare.errors) == (None, None, None, ())


def test_batch_errors_shapes() -> None:
    assert batch_errors(None) == () and batch_errors("") == ()
    assert batch_errors("boom")[0].message == "boom"
    assert batch_errors([{"message": "x", "count": 2}])[0].code == "provider_error"


@pytest.mark.parametrize(("usage", "want"), [
    ({"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17,
      "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 3}},
     TokenUsage(input_tokens=10, cached_tokens=4, output_tokens=7, reasoning_tokens=3)),
    ({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 9,
      "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 21},
     TokenUsage(input_tokens=12, cached_tokens=2, output_tokens=9, reasoning_tokens=5)),
    ({"prompt_tokens": 5, "total_tokens": 5}, TokenUsage(input_tokens=5)),  # embeddings
    ({"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": None}, TokenUsage(input_tokens=3,
                                                                                         output_tokens=2)),
    ({"prompt_tokens": "100", "completion_tokens": 1.0}, TokenUsage(input_tokens=100, output_tokens=1)),
    ({"prompt_tokens": 0, "completion_tokens": 4}, TokenUsage(output_tokens=4)),  # Ollama: cached prompt is 0
    (None, TokenUsage()), ("nonsense", TokenUsage()), ({"prompt_tokens": True}, TokenUsage()),
])
def test_usage_normalisation(usage: Any, want: TokenUsage) -> None:
    assert usage_from_openai(usage) == want


def test_output_line_success() -> None:
    r = result_from_output_line({
        "id": "batch_req_1", "custom_id": "sl-7",
        "response": {"status_code": 200, "request_id": "req_1",
                     "body": {"object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}},
        "error": None})
    assert r is not None and r.ok and r.index == 7 and r.request_id == "req_1"
    assert r.usage == TokenUsage(input_tokens=3, output_tokens=2) and r.body is not None


def test_output_line_http_error() -> None:
    body = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": "x"}}
    r = result_from_output_line({"custom_id": "sl-2", "response": {"status_code": 400, "body": body}, "error": None})
    assert r is not None and not r.ok and r.status_code == 400 and r.body == body and r.error is None
    assert r.usage == TokenUsage()
    text = result_from_output_line({"custom_id": "sl-2", "response": {"status_code": 500, "body": "oops"}})
    assert text is not None and text.body == {"error": {"message": "oops", "type": "provider_error",
                                                       "param": None, "code": "500"}}


@pytest.mark.parametrize(("error", "want"), [
    ({"code": "batch_expired", "message": "too late"}, LineError("batch_expired", "too late", "batch_error")),
    ({"code": "batch_cancelled", "message": "stop"}, LineError("batch_cancelled", "stop", "batch_error")),
    ({"code": "request_timeout", "message": "slow"}, LineError("request_timeout", "slow", "provider_error")),
    ("engine crashed", LineError("provider_error", "engine crashed", "provider_error")),  # vLLM plain string
])
def test_output_line_batch_error(error: Any, want: LineError) -> None:
    r = result_from_output_line({"custom_id": "sl-0", "response": None, "error": error})
    assert r is not None and not r.ok and r.status_code == 0 and r.error == want


def test_output_line_foreign_or_broken() -> None:
    assert result_from_output_line({"custom_id": "request-1", "response": {"status_code": 200, "body": {}}}) is None
    assert result_from_output_line("not an object") is None
    empty = result_from_output_line({"custom_id": "sl-1"})
    assert empty is not None and empty.error is not None and empty.error.code == "missing_response"
    no_body = result_from_output_line({"custom_id": "sl-1", "response": {"status_code": 200, "body": None}})
    assert no_body is not None and not no_body.ok

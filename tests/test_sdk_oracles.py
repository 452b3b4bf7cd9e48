"""The providers' official Python SDKs as the oracle (pinned in pyproject's dev extras).

1. Each SDK drives a whole batch through the provider fake: create, retrieve, list, cancel and the
   results, exactly as a user of that SDK would. Whatever the SDK sends must be accepted (the SDK
   wins over the fake), and what the fake answers must be what the SDK's response models declare:
   the Stainless SDKs (`anthropic`, `openai`, `groq`) build their objects without validating, so
   each object is validated again, strictly, from its own data (`strict`); `mistralai` and
   `google-genai` validate as they parse.
2. The adapters' request bodies validate against the SDKs' typed request parameters (the
   TypedDicts users of the SDK write): tests/sdk_types.py checks them strictly (no undeclared
   field, every required one, every Literal). The fake runs the same checks on all Anthropic, Groq
   and Gemini traffic (tests/provider_fake/sdk_conformance.py), so every adapter test does too.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import groq
import openai
import pydantic
import pytest
from google import genai
from google.genai import types as gtypes
from mistralai.client import Mistral

from adapters.anthropic import AnthropicAdapter, custom_id, to_messages_params
from adapters.base import BatchJob, NativeBatchAdapter, RequestLine
from adapters.chat_format import UnsupportedRequest
from adapters.gemini import GeminiAdapter, to_generate_content_request
from adapters.mistral import MistralAdapter, to_mistral_body
from adapters.openai import AzureOpenAIAdapter, GroqAdapter, OpenAIAdapter
from tests.provider_fake import ProviderFake
from tests.provider_fake.sdk_conformance import sdk_checker
from tests.sdk_types import type_errors


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ProviderFake]:
    with ProviderFake() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: ProviderFake) -> ProviderFake:
    fake_server.reset()
    fake_server.configure(polls_per_state=1)
    return fake_server


def strict(obj: Any) -> Any:
    """A Stainless SDK object validated from its own data (the SDK itself only `construct`s)."""
    type(obj).model_validate(obj.to_dict())
    return obj


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# --------------------------------------------------------------------------- 1. SDKs drive whole batches


def test_anthropic_sdk(fake: ProviderFake) -> None:
    c = anthropic.Anthropic(api_key=fake.key("anthropic"), base_url=fake.base_url + "/anthropic", max_retries=0,
                            timeout=10)

    def request(cid: str, text: str) -> Any:
        return {"custom_id": cid, "params": {"model": "claude-x", "max_tokens": 64, "system": "be brief",
                                             "messages": [{"role": "user", "content": text}]}}

    created = strict(c.messages.batches.create(requests=[request("a", "hello there"), request("b", "FAIL it")]))
    assert created.processing_status == "in_progress" and created.request_counts.processing == 2
    done = strict(c.messages.batches.retrieve(created.id))
    assert done.processing_status == "ended" and done.results_url
    assert [strict(b).id for b in c.messages.batches.list(limit=10)] == [created.id]
    results = {r.custom_id: strict(r).result for r in c.messages.batches.results(created.id)}
    assert results["a"].type == "succeeded" and results["b"].type == "errored"
    assert results["a"].message.content[0].text == "echo: hello there"  # type: ignore[union-attr]
    slow = c.messages.batches.create(requests=[request("s", "SLOW one")])
    assert strict(c.messages.batches.cancel(slow.id)).processing_status == "canceling"
    ended = strict(c.messages.batches.retrieve(slow.id))
    assert ended.processing_status == "ended" and ended.request_counts.canceled == 1
    assert strict(c.messages.batches.delete(created.id)).id == created.id
    with pytest.raises(anthropic.NotFoundError):
        c.messages.batches.retrieve("msgbatch_nope")
    assert fake.cancel_calls("anthropic", slow.id) == 1


def test_anthropic_sdk_version_is_served(fake: ProviderFake) -> None:
    from anthropic._constants import ANTHROPIC_API_VERSION

    from tests.provider_fake.anthropic import VERSIONS
    assert ANTHROPIC_API_VERSION in VERSIONS
    adapter = AnthropicAdapter("anthropic", base_url=fake.base_url + "/anthropic", api_key="k")
    assert adapter.http.client.headers["anthropic-version"] == ANTHROPIC_API_VERSION


def test_groq_sdk(fake: ProviderFake) -> None:
    c = groq.Groq(api_key=fake.key("groq"), base_url=fake.base_url + "/groq", max_retries=0, timeout=10)
    rows = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "llama-3.1-8b-instant", "messages": [{"role": "user", "content": text}]}}
            for cid, text in (("a", "hello"), ("b", "FAIL"))]
    f = strict(c.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch"))
    b = strict(c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"))
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        b = strict(c.batches.retrieve(b.id))
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.completed == 1
    assert [x.id for x in strict(c.batches.list()).data] == [b.id]
    out = [json.loads(x) for x in c.files.content(b.output_file_id or "").text().splitlines()]
    assert out[0]["custom_id"] == "a"
    other = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert strict(c.batches.cancel(other.id)).status == "cancelling"
    assert strict(c.files.info(f.id)).id == f.id
    assert strict(c.files.delete(f.id)).deleted


def test_gemini_sdk_inline_and_file(fake: ProviderFake, request: pytest.FixtureRequest) -> None:
    c = genai.Client(api_key=fake.key("gemini"),
                     http_options=gtypes.HttpOptions(base_url=fake.base_url + "/gemini/", api_version="v1beta"))
    request.addfinalizer(c.close)  # its HTTP clients are not closed when it is collected
    inline = [gtypes.InlinedRequest(contents="hello there", metadata={"key": "a"}),
              {"contents": [{"parts": [{"text": "please FAIL"}], "role": "user"}],
               "config": {"system_instruction": "be brief", "temperature": 0.2, "max_output_tokens": 20}}]
    job = c.batches.create(model="gemini-test", src=inline, config={"display_name": "sdk"})
    assert job.name and job.state == gtypes.JobState.JOB_STATE_PENDING
    while not job.done:
        job = c.batches.get(name=job.name)
    assert job.state == gtypes.JobState.JOB_STATE_SUCCEEDED
    responses = job.dest.inlined_responses if job.dest else None
    assert responses and responses[0].response and responses[0].response.text == "echo: hello there"
    assert responses[1].error and responses[1].error.code == 3
    assert [j.name for j in c.batches.list(config={"page_size": 10})] == [job.name]
    second = c.batches.create(model="gemini-test", src=inline)
    assert second.name
    c.batches.cancel(name=second.name)
    assert c.batches.get(name=second.name).state == gtypes.JobState.JOB_STATE_CANCELLED
    lines = [{"key": k, "request": {"contents": [{"parts": [{"text": t}], "role": "user"}]}}
             for k, t in (("a", "hi"), ("b", "FAIL"))]
    uploaded = c.files.upload(file=io.BytesIO(jsonl(lines)), config={"mime_type": "jsonl", "display_name": "in"})
    assert uploaded.name
    file_job = c.batches.create(model="gemini-test", src=uploaded.name)
    while not file_job.done:
        file_job = c.batches.get(name=file_job.name or "")
    assert file_job.dest and file_job.dest.file_name
    out = {json.loads(x)["key"]: json.loads(x) for x in c.files.download(file=file_job.dest.file_name).splitlines()}
    assert "response" in out["a"] and "error" in out["b"]


@pytest.mark.parametrize("flavor", ["openai", "azure"])
def test_openai_sdk(fake: ProviderFake, flavor: str) -> None:
    c: openai.OpenAI
    if flavor == "azure":
        c = openai.AzureOpenAI(api_key=fake.key("azure"), azure_endpoint=fake.base_url + "/azure",
                               api_version="2024-10-21", max_retries=0, timeout=10)
        url = "/chat/completions"
    else:
        c = openai.OpenAI(api_key=fake.key("openai"), base_url=fake.url("openai"), max_retries=0, timeout=10)
        url = "/v1/chat/completions"
    rows = [{"custom_id": cid, "method": "POST", "url": url,
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}}
            for cid, text in (("a", "hello"), ("b", "FAIL"))]
    # Azure's FileState (pending, running, deleting, ...) is wider than the openai SDK's FileObject
    # status: for Azure files its own spec is the authority (the fake checks that), not this SDK.
    check_file = strict if flavor == "openai" else (lambda obj: obj)
    f = check_file(c.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch"))
    while f.status != "processed":  # Azure: pending first
        f = check_file(c.files.retrieve(f.id))
    b = strict(c.batches.create(input_file_id=f.id, endpoint=url, completion_window="24h",  # type: ignore[arg-type]
                                metadata={"sluice_batch_id": "batch_x"}))
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        b = strict(c.batches.retrieve(b.id))
    assert b.status == "completed" and b.request_counts and b.request_counts.completed == 1
    assert [strict(x).id for x in c.batches.list(limit=10)] == [b.id]
    out = [json.loads(x) for x in c.files.content(b.output_file_id or "").text.splitlines()]
    assert out[0]["custom_id"] == "a" and out[0]["response"]["status_code"] == 200
    other = c.batches.create(input_file_id=f.id, endpoint=url, completion_window="24h")  # type: ignore[arg-type]
    assert strict(c.batches.cancel(other.id)).status == "cancelling"
    assert f.id in [check_file(x).id for x in c.files.list().data]  # one page (Azure's FileList has no cursor)
    assert strict(c.files.delete(f.id)).deleted


def test_mistral_sdk(fake: ProviderFake) -> None:
    with Mistral(api_key=fake.key("mistral"), server_url=fake.base_url + "/mistral") as c:
        rows = [{"custom_id": cid, "body": {"messages": [{"role": "user", "content": text}]}}
                for cid, text in (("a", "hello"), ("b", "FAIL"))]
        f = c.files.upload(file={"file_name": "in.jsonl", "content": jsonl(rows)}, purpose="batch")
        job = c.batch.jobs.create(input_files=[f.id], model="mistral-small-latest", endpoint="/v1/chat/completions",
                                  metadata={"sluice_batch_id": "batch_x"})
        while job.status not in ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"):
            job = c.batch.jobs.get(job_id=job.id)
        assert job.status == "SUCCESS" and (job.succeeded_requests, job.failed_requests) == (1, 1)
        listed = c.batch.jobs.list(page=0, page_size=10)
        assert [j.id for j in listed.data or []] == [job.id]
        out = [json.loads(x) for x in c.files.download(file_id=job.output_file or "").read().splitlines()]
        assert out[0]["custom_id"] == "a"
        inline = c.batch.jobs.create(requests=rows, model="m", endpoint="/v1/chat/completions")
        assert c.batch.jobs.cancel(job_id=inline.id).status == "CANCELLATION_REQUESTED"
        assert c.files.retrieve(file_id=f.id).deleted is False
        assert c.files.delete(file_id=f.id).deleted


# --------------------------------------------------------------------------- 2. adapters' bodies, SDK-typed


CHAT_BODIES = {
    "plain": {"messages": [{"role": "user", "content": "hi"}]},
    "system-stop-limits": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                           "stop": ["END"], "max_completion_tokens": 30, "temperature": 0.3, "top_p": 0.9,
                           "seed": 7, "user": "u-1"},
    "tools": {"messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather by city",
                                                    "parameters": {"type": "object",
                                                                   "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "required", "parallel_tool_calls": False},
    "image": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
    "json": {"messages": [{"role": "user", "content": "give json"}], "response_format": {"type": "json_object"}},
}


def chat_params() -> list[Any]:
    return [pytest.param({"model": "m", **body}, id=name) for name, body in CHAT_BODIES.items()]


@pytest.mark.parametrize("body", chat_params())
def test_anthropic_params_are_the_sdks(body: dict[str, Any]) -> None:
    from anthropic.types.messages.batch_create_params import BatchCreateParams
    try:
        params = to_messages_params(body)
    except UnsupportedRequest:
        return  # refused before anything is sent (asserted in test_adapter_anthropic)
    assert type_errors({"requests": [{"custom_id": custom_id(0, "batch_x"), "params": params}]},
                       BatchCreateParams) == []


@pytest.mark.parametrize("body", chat_params())
def test_gemini_requests_are_the_sdks(body: dict[str, Any]) -> None:
    checker = sdk_checker("gemini")
    assert checker is not None
    try:
        request = to_generate_content_request(body)
    except UnsupportedRequest:
        return
    inline = [{"request": request, "metadata": {"key": "sl-0"}}]
    create = {"batch": {"display_name": "batch_x", "input_config": {"requests": {"requests": inline}}}}
    problems = checker.check_request("POST", "/gemini/v1beta/models/m:batchGenerateContent", {},
                                     {"x-goog-api-key": "k", "content-type": "application/json"},
                                     json.dumps(create).encode())
    assert problems == []


@pytest.mark.parametrize("body", chat_params())
def test_mistral_bodies_are_the_sdks(body: dict[str, Any]) -> None:
    from mistralai.client.models.chatcompletionrequest import ChatCompletionRequestTypedDict
    line_body = to_mistral_body(body, "/v1/chat/completions")
    assert "model" not in line_body  # set once on the job
    assert type_errors({**line_body, "model": "m"}, ChatCompletionRequestTypedDict) == []


def test_mistral_embeddings_body_is_the_sdks() -> None:
    """The SDK's TypedDict names `inputs` what its model sends as `input` (a pydantic alias): the wire
    names are the model's aliases, so the model is the oracle here."""
    from mistralai.client.models.embeddingrequest import EmbeddingRequest
    body = {**to_mistral_body({"model": "e", "input": ["a", "b"], "dimensions": 8}, "/v1/embeddings"), "model": "e"}
    wire_names = {f.alias or name for name, f in EmbeddingRequest.model_fields.items()}
    assert set(body) <= wire_names
    EmbeddingRequest.model_validate(body)


@pytest.mark.parametrize("body", chat_params())
@pytest.mark.parametrize("sdk", ["openai", "groq"])
def test_openai_family_lines_are_the_sdks(body: dict[str, Any], sdk: str) -> None:
    adapter = (OpenAIAdapter if sdk == "openai" else GroqAdapter)(sdk, base_url="http://127.0.0.1:9", api_key="k")
    line = adapter.encode_line(RequestLine(0, "a", "/v1/chat/completions", body))
    if sdk == "openai":
        from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming as Params
    else:
        from groq.types.chat.completion_create_params import CompletionCreateParams as Params
    assert type_errors(line["body"], Params) == []


def test_openai_create_bodies_are_the_sdks() -> None:
    from groq.types.batch_create_params import BatchCreateParams as GroqCreate
    from openai.types.batch_create_params import BatchCreateParams as OpenAICreate
    job = BatchJob("batch_x", "/v1/chat/completions", "m", "24h", 1)
    for adapter, params in ((OpenAIAdapter("o", base_url="http://x/v1", api_key="k"), OpenAICreate),
                            (GroqAdapter("g", base_url="http://x/v1", api_key="k"), GroqCreate)):
        assert type_errors(adapter.create_body(job, "file-1"), params) == []
    from openai.types import EmbeddingCreateParams
    from openai.types.responses.response_create_params import ResponseCreateParamsNonStreaming
    oa = OpenAIAdapter("o", base_url="http://x/v1", api_key="k")
    emb = oa.encode_line(RequestLine(0, "e", "/v1/embeddings", {"model": "t", "input": ["a"], "dimensions": 8}))
    assert type_errors(emb["body"], EmbeddingCreateParams) == []
    resp = oa.encode_line(RequestLine(0, "r", "/v1/responses", {"model": "t", "input": "hi", "max_output_tokens": 9}))
    assert type_errors(resp["body"], ResponseCreateParamsNonStreaming) == []


async def lines_of(bodies: list[dict[str, Any]], url: str = "/v1/chat/completions") -> AsyncIterator[RequestLine]:
    for i, body in enumerate(bodies):
        yield RequestLine(i, f"c{i}", url, body)


@pytest.mark.parametrize("provider", ["anthropic", "gemini", "groq", "openai", "azure", "mistral"])
async def test_adapter_submits_pass_the_oracles(fake: ProviderFake, provider: str) -> None:
    """A whole submit of every body above the adapter can express: the fake checks each request
    against the spec or the SDK (a violation fails this test at teardown), and the create body is
    checked here once more against the SDK's own create params."""
    adapters: dict[str, NativeBatchAdapter] = {
        "anthropic": AnthropicAdapter("anthropic", base_url=fake.base_url + "/anthropic",
                                      api_key=fake.key("anthropic")),
        "gemini": GeminiAdapter("gemini", base_url=fake.base_url + "/gemini", api_key=fake.key("gemini")),
        "groq": GroqAdapter("groq", base_url=fake.url("groq"), api_key=fake.key("groq")),
        "openai": OpenAIAdapter("openai", base_url=fake.url("openai"), api_key=fake.key("openai")),
        "azure": AzureOpenAIAdapter("azure", base_url=fake.url("azure"), api_key=fake.key("azure")),
        "mistral": MistralAdapter("mistral", base_url=fake.url("mistral"), api_key=fake.key("mistral")),
    }
    adapter = adapters.pop(provider)
    for other in adapters.values():
        await other.aclose()
    bodies = [{"model": "m", **b} for name, b in CHAT_BODIES.items()
              if not (provider == "anthropic" and name == "json")]  # Anthropic refuses response_format
    try:
        await adapter.submit(BatchJob("batch_x", "/v1/chat/completions", "m", "24h", len(bodies)), lines_of(bodies))
    finally:
        await adapter.aclose()
    assert sum(fake.state()["batch_creates"].values()) == 1
    if provider == "mistral":
        from mistralai.client.models.createbatchjobrequest import CreateBatchJobRequestTypedDict
        (create,) = fake.request_bodies("mistral", "POST", r"/batch/jobs$")
        assert type_errors(json.loads(create), CreateBatchJobRequestTypedDict) == []
    if provider in ("openai", "azure"):
        from openai.types.batch_create_params import BatchCreateParams
        (create,) = fake.request_bodies(provider, "POST", r"/batches$")
        body = json.loads(create)
        if provider == "azure":  # Azure's dated API spells endpoints without /v1 (its own spec types it string)
            body["endpoint"] = "/v1" + body["endpoint"]
        assert type_errors(body, BatchCreateParams) == []


def test_type_errors_catch_what_pydantic_lets_through() -> None:
    """The oracle is strict where pydantic's own TypedDict validation is not."""
    from anthropic.types.messages.batch_create_params import BatchCreateParams
    bad = {"requests": [{"custom_id": "a", "params": {"model": "m", "max_tokens": 5, "temperature": 0.2,
                                                      "messages": [{"role": "user", "content": "x", "name": "n"}]}}]}
    pydantic.TypeAdapter(BatchCreateParams).validate_python(bad)  # pydantic: fine
    problems = type_errors(bad, BatchCreateParams)
    assert problems[0] == "requests[0].params: unknown field 'temperature' (not in MessageCreateParamsNonStreaming)"
    assert any(p.startswith("requests[0].params.messages[0]") for p in problems[1:])


# --------------------------------------------------------------------------- 3. the SDKs' enums


def literal_values(model: type[pydantic.BaseModel], field: str) -> list[str]:
    import typing
    return [v for v in typing.get_args(model.model_fields[field].annotation) if isinstance(v, str)]


@pytest.mark.parametrize("state", [s.value for s in gtypes.JobState])
def test_every_gemini_job_state_is_read(state: str) -> None:
    from adapters.gemini import STATES, state_name
    assert state_name(state) in STATES, f"google-genai has job state {state}: decide how Sluice reads it"
    assert state_name(state.replace("JOB_STATE_", "BATCH_STATE_")) in STATES  # the REST spelling


@pytest.mark.parametrize("status", literal_values(anthropic.types.messages.MessageBatch, "processing_status"))
def test_every_anthropic_processing_status_is_read(status: str) -> None:
    from adapters.anthropic import batch_status
    counts = {"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 0}
    assert batch_status({"processing_status": status, "request_counts": counts}).raw_status == status
    assert status in ("in_progress", "canceling", "ended"), f"anthropic has status {status}: map it"


@pytest.mark.parametrize("kind", ["succeeded", "errored", "canceled", "expired"])
def test_every_anthropic_result_type_is_read(kind: str) -> None:
    import typing

    from anthropic.types.messages.message_batch_result import MessageBatchResult

    from adapters.anthropic import to_line_result
    members = [typing.get_args(m.model_fields["type"].annotation)[0] for m in typing.get_args(
        typing.get_args(MessageBatchResult)[0] if typing.get_origin(MessageBatchResult) is typing.Annotated
        else MessageBatchResult)]
    assert sorted(members) == ["canceled", "errored", "expired", "succeeded"]  # the SDK's result types
    result = {"type": kind, "message": {"id": "m", "content": [], "stop_reason": "end_turn"},
              "error": {"type": "error", "error": {"type": "api_error", "message": "x"}}}
    line = to_line_result(0, result)
    assert line.error is None or line.error.code != "provider_error" or kind == "errored"

"""The adapters against what the providers' official specs say they may answer (OpenAI 2.3.0,
Azure OpenAI 2024-10-21, Mistral, Together 2.0.0; vendored in tests/provider_fake/specs/).

Each answer is served by the provider fake as a canned response (a fault with status 200 and a
body), so it goes through the adapter's real HTTP code: the spec's own examples, every value of
each status enum, `null` in each optional field, fields the adapter has never seen, and each
documented error envelope. The values come from the vendored documents, so a spec update that adds
a status or a field shows up here.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from adapters.base import BatchJob, NativeBatchAdapter, ProviderError, ProviderState, RequestLine
from adapters.mistral import MistralAdapter
from adapters.openai import AzureOpenAIAdapter, OpenAIAdapter
from adapters.together import TogetherAdapter
from tests.provider_fake import ProviderFake
from tests.spec_samples import assert_valid, enum_values, examples, optional_properties, synthesize

S = ProviderState
MARK = "documented-error-envelope-message"


@dataclass(frozen=True)
class Case:
    provider: str
    document: str
    batch_schema: str
    status_schema: str
    batch_id: str
    status_path: str  # regex of the batch GET, below the provider's base
    adapter: Callable[[ProviderFake], NativeBatchAdapter]
    expected: dict[str, ProviderState]  # every documented status -> what Sluice must read
    errors: tuple[str, ...]  # pointers of the documented error envelopes

    def schema(self, name: str) -> str:
        return f"#/definitions/{name}" if self.document == "azure.json" else f"#/components/schemas/{name}"


OPENAI_STATES = {s.value: s for s in ProviderState}
MISTRAL_ID = str(uuid.UUID(int=7))
TOGETHER_ID = str(uuid.UUID(int=8))
CASES = {
    "openai": Case("openai", "openai.json", "#/components/schemas/Batch",
                   "#/components/schemas/Batch/properties/status", "batch_spec", r"/batches/batch_spec$",
                   lambda f: OpenAIAdapter("openai", base_url=f.url("openai"), api_key=f.key("openai")),
                   OPENAI_STATES, ("#/components/schemas/ErrorResponse",)),
    "azure": Case("azure", "azure.json", "#/definitions/Batch", "#/definitions/BatchStatus", "batch_spec",
                  r"/batches/batch_spec$",
                  lambda f: AzureOpenAIAdapter("azure", base_url=f.url("azure"), api_key=f.key("azure")),
                  OPENAI_STATES, ("#/definitions/ErrorResponse",)),
    "together": Case("together", "together.json", "#/components/schemas/BatchJob",
                     "#/components/schemas/BatchJobStatus", TOGETHER_ID, f"/batches/{TOGETHER_ID}$",
                     lambda f: TogetherAdapter("together", base_url=f.url("together"), api_key=f.key("together")),
                     {"VALIDATING": S.VALIDATING, "IN_PROGRESS": S.IN_PROGRESS, "COMPLETED": S.COMPLETED,
                      "FAILED": S.FAILED, "EXPIRED": S.EXPIRED, "CANCELLED": S.CANCELLED},
                     ("#/components/schemas/BatchErrorResponse",)),
    "mistral": Case("mistral", "mistral.json", "#/components/schemas/BatchJob",
                    "#/components/schemas/BatchJobStatus", MISTRAL_ID, f"/batch/jobs/{MISTRAL_ID}$",
                    lambda f: MistralAdapter("mistral", base_url=f.url("mistral"), api_key=f.key("mistral")),
                    {"QUEUED": S.VALIDATING, "RUNNING": S.IN_PROGRESS, "SUCCESS": S.COMPLETED, "FAILED": S.FAILED,
                     "TIMEOUT_EXCEEDED": S.EXPIRED, "CANCELLATION_REQUESTED": S.CANCELLING,
                     "CANCELLED": S.CANCELLED},
                    ("#/components/schemas/HTTPValidationError",)),
}
PROVIDERS = list(CASES)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ProviderFake]:
    with ProviderFake() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: ProviderFake) -> ProviderFake:
    fake_server.reset()
    return fake_server


def batch_object(case: Case, **changes: Any) -> dict[str, Any]:
    """A complete batch object of the spec (every property), valid against it, with `changes`."""
    obj: dict[str, Any] = synthesize(case.document, case.batch_schema)
    obj["id"] = case.batch_id
    if case.provider == "mistral":  # uuid-formatted ids
        obj.update(input_files=[MISTRAL_ID], output_file=MISTRAL_ID, error_file=MISTRAL_ID)
    obj.update(changes)
    return obj


def serve(fake: ProviderFake, case: Case, path: str, body: Any, status: int = 200, method: str = "GET") -> None:
    fake.add_fault(provider=case.provider, method=method, path_regex=path, status=status, body=body, times=None)


async def poll_with(fake: ProviderFake, case: Case, body: Any) -> Any:
    serve(fake, case, case.status_path, body)
    adapter = case.adapter(fake)
    try:
        return await adapter.poll(case.batch_id)
    finally:
        await adapter.aclose()


# --------------------------------------------------------------------------- statuses


def status_params() -> list[Any]:
    return [pytest.param(CASES[p], value, id=f"{p}-{value}")
            for p in PROVIDERS for value in enum_values(CASES[p].document, CASES[p].status_schema)]


@pytest.mark.parametrize(("case", "value"), status_params())
async def test_every_documented_status_is_read(fake: ProviderFake, case: Case, value: str) -> None:
    assert value in case.expected, f"{case.provider} documents status {value!r}: decide how Sluice reads it"
    body = batch_object(case, status=value)
    assert_valid(case.document, case.batch_schema, body)
    state = await poll_with(fake, case, body)
    assert state.status is case.expected[value] and state.raw_status == value


@pytest.mark.parametrize("case", [CASES[p] for p in PROVIDERS], ids=PROVIDERS)
async def test_an_undocumented_status_keeps_the_batch_running(fake: ProviderFake, case: Case) -> None:
    state = await poll_with(fake, case, batch_object(case, status="SOMETHING_NEW"))
    assert state.status is S.IN_PROGRESS and not state.ended


# --------------------------------------------------------------------------- nulls and unknown fields


def optional_params() -> list[Any]:
    return [pytest.param(CASES[p], name, id=f"{p}-{name}")
            for p in PROVIDERS for name in optional_properties(CASES[p].document, CASES[p].batch_schema)
            if name != "status"]


@pytest.mark.parametrize(("case", "name"), optional_params())
async def test_null_in_an_optional_field(fake: ProviderFake, case: Case, name: str) -> None:
    """Live APIs send `null` where the specs say a field is optional (OpenAI's own examples do)."""
    value = next(iter(case.expected))
    state = await poll_with(fake, case, batch_object(case, status=value, **{name: None}))
    assert state.status is case.expected[value]


@pytest.mark.parametrize("case", [CASES[p] for p in PROVIDERS], ids=PROVIDERS)
async def test_unknown_fields_are_ignored(fake: ProviderFake, case: Case) -> None:
    value = next(v for v in case.expected if case.expected[v] is S.FAILED)
    plain = await poll_with(fake, case, batch_object(case, status=value))
    fake.clear_faults()
    extra = batch_object(case, status=value, brand_new_field={"nested": [1, 2]}, another=None)
    for field in extra.values():
        if isinstance(field, dict):
            field["unheard_of"] = "x"
    assert await poll_with(fake, case, extra) == plain


# --------------------------------------------------------------------------- the spec's own examples


def openai_examples() -> list[Any]:
    return [pytest.param(path, method, example, id=f"{method}-{path}-{i}")
            for path, method in (("/batches/{batch_id}", "get"), ("/batches", "post"),
                                 ("/batches/{batch_id}/cancel", "post"))
            for i, example in enumerate(examples("openai.json", method, path))]


@pytest.mark.parametrize(("path", "method", "example"), openai_examples())
async def test_openai_batch_examples(fake: ProviderFake, path: str, method: str, example: Any) -> None:
    """OpenAI's documented Batch examples (`"errors": null`, counts 100/95/5, metadata) are read."""
    state = await poll_with(fake, CASES["openai"], example)
    assert state.raw_status == example["status"] and state.status is OPENAI_STATES[example["status"]]
    counts = example["request_counts"]
    assert (state.total, state.completed, state.failed) == (counts["total"], counts["completed"], counts["failed"])
    assert state.errors == ()


async def test_openai_list_and_file_examples(fake: ProviderFake) -> None:
    case = CASES["openai"]
    (listing,) = examples("openai.json", "get", "/batches")
    serve(fake, case, r"/batches$", listing)
    (uploaded,) = examples("openai.json", "post", "/files")
    serve(fake, case, r"/files$", uploaded, method="POST")
    adapter = case.adapter(fake)
    try:
        assert await adapter.find_submitted("batch_not_there") is None  # read every listed batch
        file_obj = await adapter.upload(io.BytesIO(b"{}\n"), "x.jsonl")
        assert file_obj["id"] == uploaded["id"]
        await adapter.wait_file_ready(file_obj)  # the example has no status: nothing to wait for
    finally:
        await adapter.aclose()


async def test_mistral_file_example_and_job(fake: ProviderFake) -> None:
    """Mistral's documented upload answer (with `bytes: null`, against its own schema) still names the
    file; a job made of the schema's examples is read."""
    case = CASES["mistral"]
    (uploaded,) = examples("mistral.json", "post", "/v1/files")
    assert uploaded["bytes"] is None
    serve(fake, case, r"/files$", uploaded, method="POST")
    serve(fake, case, r"/batch/jobs$", batch_object(case, status="QUEUED"), method="POST")
    adapter = case.adapter(fake)

    async def one() -> Any:
        yield RequestLine(0, "a", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    try:
        assert await adapter.submit(BatchJob("batch_m", "/v1/chat/completions", "m", "24h", 1), one()) == MISTRAL_ID
    finally:
        await adapter.aclose()


async def test_together_examples(fake: ProviderFake) -> None:
    """Together documents examples per property: a job made of them, and the create answer
    `BatchJobWithWarning` with a warning."""
    case = CASES["together"]
    job = synthesize("together.json", "#/components/schemas/BatchJob")
    assert job["status"] == "IN_PROGRESS" and job["id"] == "01234567-8901-2345-6789-012345678901"
    case = Case(**{**case.__dict__, "batch_id": job["id"], "status_path": f"/batches/{job['id']}$"})
    state = await poll_with(fake, case, job)
    assert state.status is S.IN_PROGRESS
    created = synthesize("together.json", "#/components/schemas/BatchJobWithWarning")
    assert_valid("together.json", "#/components/schemas/BatchJobWithWarning", created)
    adapter = case.adapter(fake)
    assert adapter.created_id(created) == job["id"]  # type: ignore[attr-defined]
    await adapter.aclose()


# --------------------------------------------------------------------------- Azure's own shapes


async def test_azure_errors_shape_is_read(fake: ProviderFake) -> None:
    """Azure 2024-10-21 `BatchErrors`: `data` is one `BatchErrorData`, `line` a string."""
    case = CASES["azure"]
    errors = {"object": "list", "data": {"code": "jsonlValidationFailed", "message": "line 5 is not JSON",
                                         "param": "input_file_id", "line": "5"}}
    body = batch_object(case, status="failed", errors=errors)
    assert_valid("azure.json", "#/definitions/Batch", body)
    state = await poll_with(fake, case, body)
    assert state.status is S.FAILED
    (item,) = state.errors
    assert (item.code, item.message, item.param, item.line) == ("jsonlValidationFailed", "line 5 is not JSON",
                                                                  "input_file_id", 5)


FILE_EXPECTATIONS = {
    # status -> "ready" (a batch may use it), "rejected" (never will be), "waits" (until ready or a timeout)
    "openai": {"uploaded": "ready", "processed": "ready", "error": "rejected"},
    "azure": {"uploaded": "waits", "pending": "waits", "running": "waits", "processed": "ready",
              "error": "rejected", "deleting": "rejected", "deleted": "rejected"},
}


def file_params() -> list[Any]:
    pointers = {"openai": ("openai.json", "#/components/schemas/OpenAIFile/properties/status"),
                "azure": ("azure.json", "#/definitions/FileState")}
    return [pytest.param(CASES[p], value, id=f"{p}-{value}")
            for p, (doc, ptr) in pointers.items() for value in enum_values(doc, ptr)]


@pytest.mark.parametrize(("case", "value"), file_params())
async def test_every_documented_file_status(fake: ProviderFake, case: Case, value: str) -> None:
    expect = FILE_EXPECTATIONS[case.provider].get(value)
    assert expect, f"{case.provider} documents file status {value!r}: decide whether a batch may use it"
    file_obj = {"id": "file-spec", "object": "file", "bytes": 3, "created_at": 1, "filename": "x.jsonl",
                "purpose": "batch", "status": value}
    serve(fake, case, r"/files/file-spec$", file_obj)
    adapter = case.adapter(fake)
    adapter.file_ready_timeout = 0.2  # type: ignore[attr-defined]
    try:
        if expect == "ready":
            await adapter.wait_file_ready(file_obj)  # type: ignore[attr-defined]
            return
        with pytest.raises(ProviderError) as info:
            await adapter.wait_file_ready(file_obj)  # type: ignore[attr-defined]
    finally:
        await adapter.aclose()
    if expect == "rejected":
        assert not info.value.retryable and info.value.code == "file_rejected"
    else:
        assert info.value.retryable and info.value.code == "file_not_ready"


async def test_azure_never_creates_a_batch_from_a_file_being_deleted(fake: ProviderFake) -> None:
    case = CASES["azure"]
    serve(fake, case, r"/files$", {"id": "file-del", "object": "file", "bytes": 3, "created_at": 1,
                                   "filename": "x.jsonl", "purpose": "batch", "status": "deleting"},
          status=201, method="POST")
    adapter = case.adapter(fake)

    async def one() -> Any:
        yield RequestLine(0, "a", "/v1/chat/completions", {"model": "d", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    try:
        with pytest.raises(ProviderError) as info:
            await adapter.submit(BatchJob("batch_d", "/v1/chat/completions", "d", "24h", 1), one())
    finally:
        await adapter.aclose()
    assert info.value.code == "file_rejected" and not info.value.retryable
    assert not any(r["method"] == "POST" and r["path"].endswith("/batches") for r in fake.state()["requests"])


# --------------------------------------------------------------------------- documented error envelopes


def with_message(obj: Any) -> Any:
    if isinstance(obj.get("error"), dict):
        obj["error"]["message"] = MARK
    elif "error" in obj:
        obj["error"] = MARK
    elif isinstance(obj.get("detail"), list):
        obj["detail"][0]["msg"] = MARK
    return obj


def error_params() -> list[Any]:
    return [pytest.param(CASES[p], pointer, status, id=f"{p}-{pointer.rsplit('/', 1)[1]}-{status}")
            for p in PROVIDERS for pointer in CASES[p].errors
            for status in ((422,) if "HTTPValidation" in pointer else (400, 401, 404, 429, 500))]


@pytest.mark.parametrize(("case", "pointer", "status"), error_params())
async def test_documented_error_envelopes(fake: ProviderFake, case: Case, pointer: str, status: int) -> None:
    body = with_message(synthesize(case.document, pointer))
    assert_valid(case.document, pointer, body)
    serve(fake, case, case.status_path, body, status=status)
    adapter = case.adapter(fake)
    try:
        with pytest.raises(ProviderError) as info:
            await adapter.poll(case.batch_id)
    finally:
        await adapter.aclose()
    assert MARK in info.value.message and info.value.status_code == status
    assert info.value.retryable is (status in (429, 500))

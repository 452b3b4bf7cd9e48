"""Mistral batch-jobs adapter: translations (unit) and whole batches through Sluice and the fake."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from adapters.base import BatchJob, ProviderState, RequestLine
from adapters.mistral import MistralAdapter, job_status, to_mistral_body
from tests.harness import gateway, make_settings
from tests.native_chat_scenarios import (
    MISTRAL,
    cancel_batch,
    expire_batch,
    fresh,
    full_batch,
    line,
    make_router,
    mixed_results,
    recover_lost_submission,
    requests_to,
    restart_mid_poll,
    results_by_id,
    serve_fake,
    submit_rejected,
    transient_faults,
)
from tests.native_scenarios import refused_at_create
from tests.provider_fake import ProviderFake


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ProviderFake]:
    yield from serve_fake()


@pytest.fixture
def fake(fake_server: ProviderFake) -> ProviderFake:
    return fresh(fake_server)


# --------------------------------------------------------------------------- translation


def test_chat_body_drops_openai_only_fields() -> None:
    body = to_mistral_body({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 4, "user": "u",
                            "max_completion_tokens": 9, "logprobs": True, "stream_options": {}, "temperature": 0.3,
                            "tools": [], "tool_choice": "auto", "response_format": {"type": "json_object"}},
                           "/v1/chat/completions")
    assert body == {"messages": [{"role": "user", "content": "x"}], "random_seed": 4, "max_tokens": 9,
                    "temperature": 0.3, "tools": [], "tool_choice": "auto", "response_format": {"type": "json_object"}}
    assert to_mistral_body({"model": "e", "input": ["a"], "dimensions": 8}, "/v1/embeddings") == {
        "input": ["a"], "output_dimension": 8}


def test_job_statuses_and_counts() -> None:
    expected = {"QUEUED": ProviderState.VALIDATING, "RUNNING": ProviderState.IN_PROGRESS,
                "SUCCESS": ProviderState.COMPLETED, "FAILED": ProviderState.FAILED,
                "TIMEOUT_EXCEEDED": ProviderState.EXPIRED, "CANCELLATION_REQUESTED": ProviderState.CANCELLING,
                "CANCELLED": ProviderState.CANCELLED, "SOMETHING_NEW": ProviderState.IN_PROGRESS}
    for raw, status in expected.items():
        assert job_status({"status": raw}).status is status
    s = job_status({"status": "FAILED", "total_requests": 4, "succeeded_requests": 1, "failed_requests": 2,
                    "completed_requests": 3, "errors": [{"message": "bad line 2", "count": 1}]})
    assert (s.total, s.completed, s.failed) == (4, 1, 2)
    assert s.errors[0].message == "bad line 2"


# --------------------------------------------------------------------------- whole batches


async def test_full_batch(fake: ProviderFake, db_url: str) -> None:
    await full_batch(fake, db_url, MISTRAL)
    assert fake.state()["file_uploads"]["mistral"] == 1
    job = next(iter(fake.store.batches["mistral"].values()))
    assert job.data["metadata"] == {"sluice_batch_id": job.data["metadata"]["sluice_batch_id"]}
    assert job.data["metadata"]["sluice_batch_id"].startswith("batch_")
    assert job.data["model"] == "mistral-test" and job.data["endpoint"] == "/v1/chat/completions"
    assert all("model" not in item.body for item in job.items)


async def test_mixed_success_and_failure(fake: ProviderFake, db_url: str) -> None:
    await mixed_results(fake, db_url, MISTRAL)


async def test_cancel_keeps_finished_results(fake: ProviderFake, db_url: str) -> None:
    await cancel_batch(fake, db_url, MISTRAL)


async def test_expiry_keeps_finished_results(fake: ProviderFake, db_url: str) -> None:
    await expire_batch(fake, db_url, MISTRAL, {"ok": "hello world", "s1": "SLOW one"}, "expired",
                       {"ok": "completed", "s1": "expired"})


async def test_expiry_before_start(fake: ProviderFake, db_url: str) -> None:
    await expire_batch(fake, db_url, MISTRAL, {"a": "hello world"}, "expired", {"a": "expired"}, start=False)


async def test_transient_faults_while_polling(fake: ProviderFake, db_url: str) -> None:
    await transient_faults(fake, db_url, MISTRAL)


async def test_submit_rejected_with_422_detail(fake: ProviderFake, db_url: str) -> None:
    detail = {"detail": [{"loc": ["body", "model"], "msg": "Invalid model: mistral-test", "type": "value_error"}]}
    await submit_rejected(fake, db_url, MISTRAL, status=422, body=detail, message="Invalid model: mistral-test")


async def test_mixed_models_refused_at_create(fake: ProviderFake, sqlite_url: str) -> None:
    other = line(MISTRAL, "b", "x")
    other.body["model"] = "mistral/mistral-other"
    await refused_at_create(fake, sqlite_url, make_router(fake, MISTRAL), [line(MISTRAL, "a", "hi"), other],
                            "mixed_models", "requests[1].body.model")


async def test_embeddings_batch(fake: ProviderFake, db_url: str) -> None:
    async with gateway(make_settings(db_url, poll_seconds=0.05), make_router(fake, MISTRAL)) as (_, c):
        created = await c.create([line(MISTRAL, "e1", "three little words", url="/v1/embeddings"),
                                  line(MISTRAL, "e2", "two words", url="/v1/embeddings")], endpoint="/v1/embeddings")
        done = await c.wait_for(created.id)
        results = await results_by_id(c, created.id)
    assert done.status == "completed"
    assert results["e1"]["response"]["object"] == "list"
    assert len(results["e1"]["response"]["data"][0]["embedding"]) == 8
    assert int(results["e1"]["usage"]["input_tokens"]) == 3
    assert done.usage.input_tokens == 5


async def test_restart_mid_poll(fake: ProviderFake, db_url: str) -> None:
    await restart_mid_poll(fake, db_url, MISTRAL)


async def test_crash_during_create_finds_the_job(fake: ProviderFake, db_url: str) -> None:
    await recover_lost_submission(fake, db_url, MISTRAL)
    assert fake.state()["file_uploads"]["mistral"] == 1


async def test_find_submitted_pages_through_the_list(fake: ProviderFake) -> None:
    adapter = MistralAdapter("mistral", base_url=fake.url("mistral"), api_key=fake.key("mistral"),
                             options={"list_page_size": 2})

    async def lines() -> AsyncIterator[RequestLine]:
        yield RequestLine(0, "a", "/v1/chat/completions",
                          {"model": "m", "messages": [{"role": "user", "content": "hi"}]})

    try:
        first = await adapter.submit(BatchJob("batch_first", "/v1/chat/completions", "m", "24h", 1), lines())
        for n in range(5):
            await adapter.submit(BatchJob(f"batch_{n}", "/v1/chat/completions", "m", "24h", 1), lines())
        assert await adapter.find_submitted("batch_first") == first
        assert await adapter.find_submitted("batch_never") is None
        assert len(requests_to(fake, MISTRAL, "GET", "/batch/jobs")) >= 3
    finally:
        await adapter.aclose()

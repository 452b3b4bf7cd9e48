"""Gemini batch-mode adapter: translations (unit) and whole batches through Sluice and the fake."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from adapters.base import BatchJob, ProviderState, RequestLine
from adapters.chat_format import UnsupportedRequest
from adapters.gemini import (
    GeminiAdapter,
    operation_status,
    state_name,
    to_chat_completion,
    to_generate_content_request,
    to_line_result,
    usage_of,
)
from tests.native_chat_scenarios import (
    GEMINI,
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


# --------------------------------------------------------------------------- request translation


def test_chat_to_generate_content_request() -> None:
    request = to_generate_content_request({
        "model": "gemini-x", "max_completion_tokens": 50, "temperature": 0.1, "top_p": 0.5, "stop": ["END"],
        "n": 2, "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
    })
    assert request == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "hello"}]},
                     {"role": "user", "parts": [{"text": "bye"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.1, "topP": 0.5, "seed": 3, "candidateCount": 2,
                             "stopSequences": ["END"], "responseMimeType": "application/json",
                             "responseJsonSchema": {"type": "object"}},
    }


def test_tools_and_tool_turns() -> None:
    request = to_generate_content_request({
        "model": "m", "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
        ],
    })
    assert request["tools"] == [{"functionDeclarations": [{"name": "get_weather",
                                                           "parametersJsonSchema": {"type": "object"}}]}]
    assert request["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert request["contents"][1] == {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                                                    "args": {"city": "Oslo"}}}]}
    assert request["contents"][2] == {"role": "user", "parts": [{"functionResponse": {
        "name": "get_weather", "response": {"temp": 20}}}]}
    with pytest.raises(UnsupportedRequest):
        to_generate_content_request({"messages": [{"role": "tool", "tool_call_id": "zz", "content": "x"}]})


# --------------------------------------------------------------------------- response translation


def test_response_with_thoughts_and_cache() -> None:
    body, usage = to_chat_completion({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "thinking...", "thought": True},
                                                               {"text": "Hello"}, {"text": " world"}]},
                        "finishReason": "MAX_TOKENS"}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 4, "thoughtsTokenCount": 6,
                          "cachedContentTokenCount": 8, "toolUsePromptTokenCount": 2, "totalTokenCount": 22},
        "modelVersion": "gemini-x-001", "responseId": "resp-1",
    }, "gemini-x", "fallback")
    assert body["id"] == "resp-1" and body["model"] == "gemini-x-001"
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 8},
                             "completion_tokens_details": {"reasoning_tokens": 6}}
    assert (usage.input_tokens, usage.cached_tokens, usage.output_tokens, usage.reasoning_tokens) == (12, 8, 10, 6)
    assert usage_of({"promptTokenCount": "5"}).input_tokens == 5


def test_function_call_and_blocked_prompt() -> None:
    body, _ = to_chat_completion({"candidates": [{"content": {"parts": [
        {"functionCall": {"name": "f", "args": {"a": 1}}}]}, "finishReason": "STOP"}]}, "m", "x")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    blocked, _ = to_chat_completion({"promptFeedback": {"blockReason": "SAFETY"}}, "m", "x")
    assert blocked["choices"][0]["finish_reason"] == "content_filter"


def test_per_request_error_and_states() -> None:
    r = to_line_result(4, {"error": {"code": 3, "message": "bad request"}}, "m")
    assert (r.index, r.status_code) == (4, 400)
    assert r.body == {"error": {"message": "bad request", "type": "invalid_request_error", "param": None,
                                "code": "INVALID_ARGUMENT"}}
    assert to_line_result(0, {"error": {"code": 8, "message": "quota"}}, "m").status_code == 429
    assert state_name("JOB_STATE_RUNNING") == state_name("BATCH_STATE_RUNNING") == "RUNNING"
    s = operation_status({"name": "batches/x", "metadata": {"state": "JOB_STATE_SUCCEEDED", "batchStats": {
        "requestCount": "5", "successfulRequestCount": "4", "failedRequestCount": "1"}}})
    assert (s.status, s.total, s.completed, s.failed) == (ProviderState.COMPLETED, 5, 4, 1)
    assert operation_status({"metadata": {"state": "BATCH_STATE_EXPIRED"}}).status is ProviderState.EXPIRED
    failed = operation_status({"done": True, "metadata": {"state": "BATCH_STATE_FAILED"},
                               "error": {"code": 3, "message": "bad file"}})
    assert failed.status is ProviderState.FAILED and failed.errors[0].message == "bad file"
    assert operation_status({"metadata": {"state": "BATCH_STATE_PENDING"}}).total == 0


# --------------------------------------------------------------------------- whole batches


async def test_full_batch_inline(fake: ProviderFake, db_url: str) -> None:
    await full_batch(fake, db_url, GEMINI)
    creates = requests_to(fake, GEMINI, "POST", "models/gemini-test:batchGenerateContent")
    assert len(creates) == 1
    assert fake.state()["file_uploads"]["gemini"] == 0


async def test_full_batch_file_mode(fake: ProviderFake, db_url: str) -> None:
    """Above the inline limit the lines go through the resumable upload and come back in a file."""
    await full_batch(fake, db_url, GEMINI.with_options(inline_limit_bytes=100))
    assert fake.state()["file_uploads"]["gemini"] == 1
    assert requests_to(fake, GEMINI, "GET", ":download")


async def test_mixed_success_and_failure(fake: ProviderFake, db_url: str) -> None:
    await mixed_results(fake, db_url, GEMINI)


async def test_mixed_success_and_failure_file_mode(fake: ProviderFake, db_url: str) -> None:
    await mixed_results(fake, db_url, GEMINI.with_options(inline_limit_bytes=1))


async def test_cancel(fake: ProviderFake, db_url: str) -> None:
    """A cancelled Gemini batch has no results: every line ends batch_cancelled."""
    await cancel_batch(fake, db_url, GEMINI, partial=False)


async def test_expiry_has_no_results(fake: ProviderFake, db_url: str) -> None:
    await expire_batch(fake, db_url, GEMINI, {"ok": "hello world", "s1": "SLOW one"}, "expired",
                       {"ok": "expired", "s1": "expired"})


async def test_transient_faults_while_polling(fake: ProviderFake, db_url: str) -> None:
    await transient_faults(fake, db_url, GEMINI)


async def test_submit_rejected(fake: ProviderFake, db_url: str) -> None:
    await submit_rejected(fake, db_url, GEMINI)


async def test_mixed_models_refused_at_create(fake: ProviderFake, sqlite_url: str) -> None:
    other = line(GEMINI, "b", "x")
    other.body["model"] = "gemini/gemini-other"
    await refused_at_create(fake, sqlite_url, make_router(fake, GEMINI), [line(GEMINI, "a", "hi"), other],
                            "mixed_models", "requests[1].body.model")


async def test_embeddings_refused_at_create(fake: ProviderFake, sqlite_url: str) -> None:
    await refused_at_create(fake, sqlite_url, make_router(fake, GEMINI),
                            [line(GEMINI, "a", "hi", url="/v1/embeddings")], "unsupported_endpoint", "requests[0].url",
                            endpoint="/v1/embeddings")


async def test_restart_mid_poll(fake: ProviderFake, db_url: str) -> None:
    await restart_mid_poll(fake, db_url, GEMINI)


async def test_crash_during_create_finds_the_batch(fake: ProviderFake, db_url: str) -> None:
    await recover_lost_submission(fake, db_url, GEMINI)


async def test_find_submitted_pages_through_the_list(fake: ProviderFake) -> None:
    adapter = GeminiAdapter("gemini", base_url=fake.base_url + "/gemini", api_key=fake.key("gemini"),
                            options={"list_page_size": 2})

    async def lines() -> AsyncIterator[RequestLine]:
        yield RequestLine(0, "a", "/v1/chat/completions",
                          {"model": "g", "messages": [{"role": "user", "content": "hi"}]})

    try:
        first = await adapter.submit(BatchJob("batch_first", "/v1/chat/completions", "g", "24h", 1), lines())
        for n in range(5):  # push it past the first two pages of 2
            await adapter.submit(BatchJob(f"batch_{n}", "/v1/chat/completions", "g", "24h", 1), lines())
        assert await adapter.find_submitted("batch_first") == first
        assert await adapter.find_submitted("batch_never") is None
        assert len(requests_to(fake, GEMINI, "GET", "/v1beta/batches")) >= 3
    finally:
        await adapter.aclose()

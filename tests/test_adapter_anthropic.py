"""Anthropic Message Batches adapter: translations (unit) and whole batches through Sluice and the fake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from adapters.anthropic import (
    AnthropicAdapter,
    batch_status,
    batch_tag,
    parse_custom_id,
    to_chat_completion,
    to_line_result,
    to_messages_params,
    usage_of,
)
from adapters.base import BatchJob, ProviderError, ProviderState, RequestLine
from adapters.chat_format import UnsupportedRequest
from service.domain.model import now
from tests.harness import gateway, make_settings, until
from tests.native_chat_scenarios import (
    ANTHROPIC,
    HOLD,
    cancel_batch,
    crash_while_creating,
    expire_batch,
    fresh,
    full_batch,
    line,
    make_router,
    mixed_results,
    requests_to,
    restart_mid_poll,
    results_by_id,
    serve_fake,
    submit_rejected,
    submit_unsupported,
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


def test_system_messages_extracted_and_max_tokens_defaulted() -> None:
    params = to_messages_params({
        "model": "claude-x", "temperature": 0.2, "top_p": 0.9, "stop": "END", "seed": 7, "logprobs": False,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "developer", "content": "no lies"},
                     {"role": "user", "content": "hi"},
                     {"role": "user", "content": [{"type": "text", "text": "there"}]}],
    })
    assert params == {
        "model": "claude-x", "max_tokens": 4096, "system": "be brief\n\nno lies",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        "stop_sequences": ["END"],  # no sampling parameters: the Messages API (anthropic SDK >= 1.0) has none
    }
    assert to_messages_params({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 99)["max_tokens"] == 99
    assert to_messages_params({"model": "m", "max_tokens": 5, "max_completion_tokens": 7,
                               "messages": [{"role": "user", "content": "x"}]})["max_tokens"] == 7


def test_tools_tool_choice_and_tool_turns() -> None:
    params = to_messages_params({
        "model": "m", "max_tokens": 10, "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": {"type": "object", "properties": {"city": {}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        ],
    })
    assert params["tools"] == [{"name": "get_weather", "description": "Weather",
                                "input_schema": {"type": "object", "properties": {"city": {}}}}]
    assert params["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert params["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Oslo?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
    ]
    assert to_messages_params({"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}],
                               "tool_choice": "required",
                               "messages": [{"role": "user", "content": "x"}]})["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize("body, problem", [
    ({"n": 2}, "n=2"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_unsupported_requests(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(UnsupportedRequest, match=problem):
        to_messages_params({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})


# --------------------------------------------------------------------------- response translation


def test_message_to_chat_completion_with_tool_calls_and_cache_usage() -> None:
    body, usage = to_chat_completion({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20,
                  "output_tokens": 7, "service_tier": "batch"},
    })
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["id"] == "msg_1" and body["model"] == "claude-x"
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == [{"id": "toolu_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]
    assert body["usage"] == {"prompt_tokens": 35, "completion_tokens": 7, "total_tokens": 42,
                             "prompt_tokens_details": {"cached_tokens": 20},
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    assert (usage.input_tokens, usage.cached_tokens, usage.output_tokens) == (35, 20, 7)
    assert usage_of({"input_tokens": 3, "output_tokens": 1}).input_tokens == 3


@pytest.mark.parametrize("stop_reason, finish", [("end_turn", "stop"), ("max_tokens", "length"),
                                                  ("stop_sequence", "stop"), ("refusal", "content_filter")])
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    body, _ = to_chat_completion({"id": "m", "content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason})
    assert body["choices"][0]["finish_reason"] == finish


def test_errored_canceled_expired_results() -> None:
    errored = to_line_result(3, {"type": "errored", "error": {
        "type": "error", "error": {"type": "overloaded_error", "message": "busy"}, "request_id": "req_9"}})
    assert (errored.index, errored.status_code, errored.request_id) == (3, 529, "req_9")
    assert errored.body == {"error": {"message": "busy", "type": "overloaded_error", "param": None,
                                      "code": "overloaded_error"}}
    assert to_line_result(0, {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad"}}}).status_code == 400
    for kind, code in (("canceled", "batch_cancelled"), ("expired", "batch_expired")):
        r = to_line_result(1, {"type": kind})
        assert r.status_code == 0 and r.error is not None and r.error.code == code and not r.ok


def test_batch_status_mapping() -> None:
    counts = {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0}
    assert batch_status({"processing_status": "in_progress", "request_counts": {**counts, "processing": 3,
                                                                                 "succeeded": 0, "errored": 0}}
                        ) .status is ProviderState.IN_PROGRESS
    s = batch_status({"processing_status": "ended", "request_counts": counts})
    assert (s.status, s.total, s.completed, s.failed) == (ProviderState.COMPLETED, 3, 2, 1)
    assert batch_status({"processing_status": "canceling", "request_counts": counts}).status is ProviderState.CANCELLING
    assert batch_status({"processing_status": "ended", "cancel_initiated_at": "2026-01-01T00:00:00Z",
                         "request_counts": {**counts, "canceled": 1}}).status is ProviderState.CANCELLED
    assert batch_status({"processing_status": "ended", "request_counts": {
        "processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 4}}).status is ProviderState.EXPIRED
    assert batch_status({"processing_status": "ended", "request_counts": {
        **counts, "expired": 1}}).status is ProviderState.COMPLETED


async def test_404_is_retryable_only_right_after_create(fake: ProviderFake) -> None:
    adapter = AnthropicAdapter("anthropic", base_url=fake.base_url + "/anthropic", api_key=fake.key("anthropic"),
                               options={"not_found_retries": 1})
    try:
        with pytest.raises(ProviderError) as first:
            await adapter.poll("msgbatch_unknown")
        assert first.value.retryable and first.value.status_code == 404
        with pytest.raises(ProviderError) as second:
            await adapter.poll("msgbatch_unknown")
        assert not second.value.retryable
        assert await adapter.find_submitted("batch_x") is None
    finally:
        await adapter.aclose()


def test_sends_version_and_key_headers() -> None:
    adapter = AnthropicAdapter("anthropic", base_url="http://127.0.0.1:1", api_key="k")
    headers = adapter.http.client.headers
    assert headers["x-api-key"] == "k" and headers["anthropic-version"] == ANTHROPIC_API_VERSION  # the SDK's


# --------------------------------------------------------------------------- whole batches


async def test_full_batch(fake: ProviderFake, db_url: str) -> None:
    await full_batch(fake, db_url, ANTHROPIC)
    create = requests_to(fake, ANTHROPIC, "POST", "/messages/batches")
    assert len(create) == 1


async def test_mixed_success_and_failure(fake: ProviderFake, db_url: str) -> None:
    await mixed_results(fake, db_url, ANTHROPIC)


async def test_cancel_keeps_finished_results(fake: ProviderFake, db_url: str) -> None:
    await cancel_batch(fake, db_url, ANTHROPIC)


async def test_expiry_of_every_request(fake: ProviderFake, db_url: str) -> None:
    await expire_batch(fake, db_url, ANTHROPIC, {"s1": "SLOW one", "s2": "SLOW two"}, "expired",
                       {"s1": "expired", "s2": "expired"})


async def test_partial_expiry_ends_completed(fake: ProviderFake, db_url: str) -> None:
    """`ended` with only some requests expired is `completed`; the expired line is stored as
    expired with a batch_expired error (the engine maps the provider's per-line expiry)."""
    await expire_batch(fake, db_url, ANTHROPIC, {"ok": "hello world", "s1": "SLOW one"}, "completed",
                       {"ok": "completed", "s1": "expired"})


async def test_transient_faults_while_polling(fake: ProviderFake, db_url: str) -> None:
    await transient_faults(fake, db_url, ANTHROPIC)


async def test_submit_rejected(fake: ProviderFake, db_url: str) -> None:
    await submit_rejected(fake, db_url, ANTHROPIC)


async def test_eventual_404_right_after_create(fake: ProviderFake, db_url: str) -> None:
    fake.configure(anthropic_eventual_404=True)
    async with gateway(make_settings(db_url, poll_seconds=0.05), make_router(fake, ANTHROPIC)) as (_, c):
        created = await c.create([line(ANTHROPIC, "a", "hello world")])
        done = await c.wait_for(created.id)
        results = await results_by_id(c, created.id)
    assert done.status == "completed"
    assert results["a"]["status"] == "completed"
    gets = [r["status"] for r in requests_to(fake, ANTHROPIC, "GET", "/messages/batches/")
            if not r["path"].endswith("/results")]
    assert gets[0] == 404 and 200 in gets


async def test_n_greater_than_one_fails_at_submit(fake: ProviderFake, db_url: str) -> None:
    await submit_unsupported(fake, db_url, ANTHROPIC, [line(ANTHROPIC, "a", "hi"), line(ANTHROPIC, "b", "x", n=2)],
                             "line 1 (custom_id 'b'): n=2 is not supported")


async def test_embeddings_endpoint_refused_at_create(fake: ProviderFake, sqlite_url: str) -> None:
    await refused_at_create(fake, sqlite_url, make_router(fake, ANTHROPIC),
                            [line(ANTHROPIC, "a", "hi", url="/v1/embeddings")], "unsupported_endpoint",
                            "requests[0].url", endpoint="/v1/embeddings")


async def test_restart_mid_poll(fake: ProviderFake, sqlite_url: str) -> None:
    await restart_mid_poll(fake, sqlite_url, ANTHROPIC)


# --------------------------------------------------------------------------- lost submissions


def two_lines() -> Any:
    async def gen() -> Any:
        for i in range(2):
            yield RequestLine(i, f"c{i}", "/v1/chat/completions",
                              {"model": "claude-test", "messages": [{"role": "user", "content": f"line {i}"}]})
    return gen()


def adapter_for(fake: ProviderFake, **options: Any) -> AnthropicAdapter:
    return AnthropicAdapter("anthropic", base_url=fake.base_url + "/anthropic", api_key=fake.key("anthropic"),
                            options=options)


async def test_custom_ids_carry_a_tag_of_the_sluice_batch(fake: ProviderFake) -> None:
    adapter = adapter_for(fake)
    try:
        pid = await adapter.submit(BatchJob("batch_a", "/v1/chat/completions", "claude-test", "24h", 2), two_lines())
    finally:
        await adapter.aclose()
    with fake.store.lock:
        ids = [item.custom_id for item in fake.store.batches["anthropic"][pid].items]
    assert ids == [f"sl-0-{batch_tag('batch_a')}", f"sl-1-{batch_tag('batch_a')}"]
    assert parse_custom_id(ids[1]) == (1, batch_tag("batch_a"))
    assert parse_custom_id("sl-7") == (7, None)  # batches submitted before the tag still read
    assert parse_custom_id("other-7") is None


async def test_find_submitted_by_count_time_and_tag(fake: ProviderFake) -> None:
    """In progress: undecidable (retryable, never a guess); ended: adopted only with this batch's tag;
    other counts and batches created before the submit started are not candidates."""
    adapter = adapter_for(fake, find_skew_seconds=5)
    job = BatchJob("batch_a", "/v1/chat/completions", "claude-test", "24h", 2)
    since = now()
    try:
        assert await adapter.find_submitted("batch_a", job=job, since=since) is None  # nothing there yet
        pid = await adapter.submit(job, two_lines())
        with pytest.raises(ProviderError) as undecided:
            await adapter.find_submitted("batch_a", job=job, since=since)
        assert undecided.value.retryable and undecided.value.code == "submission_undecided"
        assert pid in undecided.value.message
        fake.complete("anthropic", pid)
        assert await adapter.find_submitted("batch_a", job=job, since=since) == pid
        # the same batch is not another Sluice batch's, nor one of another size, nor an older one
        other = BatchJob("batch_b", "/v1/chat/completions", "claude-test", "24h", 2)
        assert await adapter.find_submitted("batch_b", job=other, since=since) is None
        three = BatchJob("batch_a", "/v1/chat/completions", "claude-test", "24h", 3)
        assert await adapter.find_submitted("batch_a", job=three, since=since) is None
        assert await adapter.find_submitted("batch_a", job=job, since=since + 3600) is None
        assert await adapter.find_submitted("batch_a") is None  # without the job: cannot tell
    finally:
        await adapter.aclose()
    assert fake.state()["batch_creates"]["anthropic"] == 1


async def test_crash_during_create_does_not_duplicate_the_batch(fake: ProviderFake, sqlite_url: str) -> None:
    """Sluice stops while the create call is in flight; Anthropic creates the batch. The next Sluice
    waits while that batch (same size, created since the submit started) runs, then adopts it."""
    fake.configure(polls_per_state=HOLD)
    batch_id = await crash_while_creating(fake, sqlite_url, ANTHROPIC, [line(ANTHROPIC, "a", "hello world"),
                                                                        line(ANTHROPIC, "b", "FAIL this")])
    settings = make_settings(sqlite_url, poll_seconds=0.05)
    (pid,) = fake.state()["batches"]["anthropic"]
    def lists() -> int:
        return len([r for r in requests_to(fake, ANTHROPIC, "GET", "/messages/batches")
                    if r["path"].endswith("/batches")])
    lists_before = lists()
    async with gateway(settings, make_router(fake, ANTHROPIC)) as (_, c):
        async def asked_twice() -> bool:
            return lists() - lists_before >= 2
        await until("Sluice to look for the lost submission twice", asked_twice)
        assert fake.state()["batch_creates"]["anthropic"] == 1  # no second batch while undecided
        assert (await c.get(batch_id)).status == "validating"
        fake.complete("anthropic", pid)  # Anthropic finishes the batch nobody is polling
        done = await c.wait_for(batch_id, timeout=30)
        results = await results_by_id(c, batch_id)
    assert done.status == "completed" and done.provider_batch_id == pid, done
    assert results["a"]["status"] == "completed" and results["b"]["status"] == "failed"
    assert fake.state()["batch_creates"]["anthropic"] == 1

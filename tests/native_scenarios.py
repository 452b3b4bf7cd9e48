"""Whole-batch scenarios for OpenAI-shaped native batch adapters (OpenAI, Azure, Groq, Together):
a real in-process Sluice (gRPC, engine, SQLite) in front of the loopback provider fake.

Each scenario takes a `Flavor` (which fake provider, which adapter, which model) so the four
providers run the same checks. Progress at the fake is driven explicitly when a test needs a batch
to stay in one state: the fake is configured with a huge `polls_per_state` ("held"), and `step`
moves one batch exactly one state under the fake's lock. Nothing sleeps to synchronise: every wait
polls a condition with a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from adapters.base import BatchJob, NativeBatchAdapter, RequestLine
from adapters.sim import SimProvider
from service.domain.model import Price
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from service.runtime.config import Settings
from service.storage.db import create_engine
from service.storage.repository import Store
from sluice.v1 import batch_pb2
from tests.harness import Client, assert_files_match_results, chat_line, gateway, make_settings, md, until
from tests.provider_fake import ProviderFake
from tests.provider_fake.core import advance
from tests.rpc_errors import expect_error

HOLD = 10**9  # polls_per_state that keeps a fake batch where it is
PRICE = Price(input_per_mtok=2.0, output_per_mtok=8.0, batch_discount=0.5)
WAIT = 30.0


@dataclass(frozen=True)
class Flavor:
    provider: str  # fake provider name, also Sluice's provider name
    adapter: type[NativeBatchAdapter]
    model: str  # the provider's model (Azure: the deployment)
    detailed_usage: bool  # cached/reasoning token details reported
    has_cancelling: bool = True  # cancel goes through a `cancelling` state at the provider
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def sluice_model(self) -> str:
        return f"{self.provider}/{self.model}"


# --------------------------------------------------------------------------- fake control


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ProviderFake]:
    with ProviderFake() as fake:
        yield fake


def fresh(fake: ProviderFake) -> ProviderFake:
    fake.reset()
    fake.configure(polls_per_state=1)
    return fake


def step(fake: ProviderFake, provider: str, provider_batch_id: str) -> str:
    """Move a held fake batch exactly one state (atomically: the fake's handlers take the same
    lock, so no poll by Sluice can slip in between). Returns the new state."""
    with fake.store.lock:
        batch = fake.store.get_batch(provider, provider_batch_id)
        assert batch is not None
        batch.polls_per_state = 1
        advance(batch)
        batch.polls_per_state = HOLD
        fake.providers[provider].ensure_final(batch)
        return batch.state


def release(fake: ProviderFake, provider: str, provider_batch_id: str) -> None:
    fake.settings(provider, provider_batch_id, polls_per_state=1)


def fake_state(fake: ProviderFake, provider: str, provider_batch_id: str) -> str:
    return str(fake.state()["batches"][provider][provider_batch_id]["state"])


def waits_after_faults(fake: ProviderFake, provider: str, status: int) -> list[float]:
    """For each injected `status` fault, how long the client waited before its next request to
    that provider (measured at the fake, from arrival to arrival)."""
    log = [r for r in fake.state()["requests"] if r["provider"] == provider]
    return [log[i + 1]["at"] - r["at"] for i, r in enumerate(log[:-1]) if r["fault"] and r["status"] == status]


# --------------------------------------------------------------------------- Sluice side


def make_adapter(fake: ProviderFake, flavor: Flavor) -> NativeBatchAdapter:
    return flavor.adapter(flavor.provider, base_url=fake.url(flavor.provider),
                          api_key=fake.key(flavor.provider), options=dict(flavor.options))


def make_router(fake: ProviderFake, flavor: Flavor) -> Router:
    return Router({
        SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
        flavor.provider: ProviderEntry(provider=make_adapter(fake, flavor), models={flavor.model},
                                       prices={flavor.model: PRICE}),
    })


def settings(db: str) -> Settings:
    return make_settings(db, poll_seconds=0.05)


def lines(flavor: Flavor, texts: dict[str, str]) -> list[batch_pb2.BatchRequestLine]:
    return [chat_line(cid, text, model=flavor.sluice_model) for cid, text in texts.items()]


async def refused_at_create(fake: ProviderFake, db: str, router: Router, lines: list[batch_pb2.BatchRequestLine],
                            code: str, param: str, endpoint: str = "/v1/chat/completions") -> None:
    """A batch the provider cannot take (its declared capabilities) is refused at create with a 400
    naming the line, and nothing is stored or sent to the provider."""
    async with gateway(settings(db), router) as (app, c):
        err = await expect_error(c.create(lines, endpoint=endpoint), grpc.StatusCode.INVALID_ARGUMENT)
        assert (err.envelope["code"], err.envelope["param"]) == (code, param), err.envelope
        assert await app.store.count_batches("alpha") == 0
    state = fake.state()
    assert sum(state["batch_creates"].values()) == 0 and sum(state["file_uploads"].values()) == 0


async def provider_id(c: Client, batch_id: str) -> str:
    async def check() -> str:
        return str((await c.get(batch_id)).provider_batch_id)

    value: str = await until("the provider batch id", check)
    return value


async def results_by_id(c: Client, batch_id: str) -> dict[str, dict[str, Any]]:
    return {r.custom_id: json_format.MessageToDict(r, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True)
            for r in await c.results(batch_id)}


def expected_usage(flavor: Flavor, text: str) -> dict[str, int]:
    """The fake's token formula (tests/provider_fake/__init__.py) for a one-message chat line."""
    prompt = max(1, len(text.split()))
    reasoning = 3 if "THINK" in text else 0
    output = 1 + len(text.split()) + reasoning
    cached = prompt // 2 if "CACHE" in text else 0
    return {"input": prompt, "output": output, "cached": cached if flavor.detailed_usage else 0,
            "reasoning": reasoning if flavor.detailed_usage else 0}


def cost(tokens: int, per_mtok: float) -> float:
    return tokens * per_mtok * (1 - PRICE.batch_discount) / 1_000_000


# --------------------------------------------------------------------------- scenarios


TEXTS = {"a": "hello there", "b": "please FAIL this one", "c": "CACHE THINK about it carefully",
         "d": "one two three four five"}


async def full_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """Mixed success and failure, results joined on custom_id (the fake reverses them), usage, cost."""
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, TEXTS))
        assert created.status == "validating" and created.provider == flavor.provider
        batch = await c.wait_for(created.id, timeout=WAIT)
        assert batch.status == "completed", batch
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 3, 1)
        assert batch.provider_batch_id and batch.completed_at and batch.in_progress_at and batch.finalizing_at
        results = await results_by_id(c, created.id)
        await assert_files_match_results(c, batch)

    assert set(results) == set(TEXTS)
    for cid in ("a", "c", "d"):
        r = results[cid]
        assert r["status"] == "completed" and r["status_code"] == 200, r
        assert r["index"] == list(TEXTS).index(cid)
        assert r["response"]["choices"][0]["message"]["content"] == f"echo: {TEXTS[cid]}"
        want = expected_usage(flavor, TEXTS[cid])
        usage = r["usage"]
        assert usage["input_tokens"] == want["input"] and usage["output_tokens"] == want["output"], (cid, usage)
        assert usage["input_tokens_details"]["cached_tokens"] == want["cached"]
        assert usage["output_tokens_details"]["reasoning_tokens"] == want["reasoning"]
        assert usage["input_cost"] == pytest.approx(cost(want["input"], PRICE.input_per_mtok))
        assert usage["output_cost"] == pytest.approx(cost(want["output"], PRICE.output_per_mtok))
    failed = results["b"]
    assert failed["status"] == "failed" and failed["status_code"] == 400
    assert failed["error"]["code"] == "fake_fail_marker" and "FAIL marker" in failed["error"]["message"]
    assert failed["usage"]["input_tokens"] == 0

    ok = [expected_usage(flavor, TEXTS[cid]) for cid in ("a", "c", "d")]
    assert batch.usage.input_tokens == sum(u["input"] for u in ok)
    assert batch.usage.output_tokens == sum(u["output"] for u in ok)
    assert batch.usage.input_tokens_details.cached_tokens == sum(u["cached"] for u in ok)
    assert batch.usage.total_cost == pytest.approx(sum(cost(u["input"], 2.0) + cost(u["output"], 8.0) for u in ok))
    state = fake.state()
    assert state["batch_creates"][flavor.provider] == 1 and state["file_uploads"][flavor.provider] == 1
    assert state["batches"][flavor.provider][batch.provider_batch_id]["kind"] == "completed"


async def cancel_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """Cancel reaches the provider; Sluice says cancelled only once the provider confirms; the work
    done before the cancel is kept, the unfinished line is cancelled."""
    fake.configure(polls_per_state=HOLD)
    texts = {"done1": "first answer", "slow": "a SLOW one", "done2": "second answer", "bad": "FAIL please"}
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, texts))
        pid = await provider_id(c, created.id)
        # No wait for Sluice's own in_progress: a cancel is accepted in validating and in_progress
        # alike (one conditional UPDATE), whichever the engine has reached by now.
        assert step(fake, flavor.provider, pid).lower() == "in_progress"
        cancelled = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
        assert cancelled.status == "cancelling"
        target = "cancelling" if flavor.has_cancelling else "cancelled"

        async def provider_saw_cancel() -> bool:
            return fake_state(fake, flavor.provider, pid).lower() == target

        await until("the cancel to reach the provider", provider_saw_cancel)
        if flavor.has_cancelling:
            # The provider has not confirmed yet: Sluice must still say cancelling.
            assert (await c.get(created.id)).status == "cancelling"
            release(fake, flavor.provider, pid)
        batch = await c.wait_for(created.id, timeout=WAIT)
        assert batch.status == "cancelled" and batch.cancelled_at, batch
        results = await results_by_id(c, created.id)
        await assert_files_match_results(c, batch)
    assert results["done1"]["status"] == "completed" and results["done2"]["status"] == "completed"
    assert results["done1"]["response"]["choices"][0]["message"]["content"] == "echo: first answer"
    assert results["bad"]["status"] == "failed" and results["bad"]["status_code"] == 400
    assert results["slow"]["status"] == "cancelled" and results["slow"]["error"]["code"] == "batch_cancelled"
    assert batch.request_counts.completed == 2
    assert fake.state()["batches"][flavor.provider][pid]["kind"] == "cancelled"
    assert any(r["path"].endswith(f"/batches/{pid}/cancel") and r["method"] == "POST"
               for r in fake.state()["requests"])


async def cancel_loses_the_race(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """The provider completes the batch before it sees the cancel (`cancelling -> completed`, the
    documented race): Sluice ends `completed` with every result, keeping `cancelling_at`."""
    fake.configure(polls_per_state=HOLD)
    texts = {"a": "first answer", "b": "second answer", "c": "FAIL this one"}
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, texts))
        pid = await provider_id(c, created.id)
        assert step(fake, flavor.provider, pid).lower() == "in_progress"
        fake.settings(flavor.provider, pid, cancel_race=True)
        cancelled = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
        assert cancelled.status == "cancelling"

        async def provider_saw_cancel() -> bool:
            return any(r["path"].endswith(f"/batches/{pid}/cancel") for r in fake.state()["requests"])

        await until("the cancel to reach the provider", provider_saw_cancel)
        release(fake, flavor.provider, pid)
        batch = await c.wait_for(created.id, timeout=WAIT)
        assert batch.status == "completed", batch
        assert batch.HasField("cancelling_at") and batch.HasField("completed_at")
        assert not batch.HasField("cancelled_at")
        assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
        results = await results_by_id(c, created.id)
        await assert_files_match_results(c, batch)
    assert [results[cid]["status"] for cid in texts] == ["completed", "completed", "failed"]
    assert fake.state()["batches"][flavor.provider][pid]["kind"] == "completed"
    assert any(r["path"].endswith(f"/batches/{pid}/cancel") for r in fake.state()["requests"])


async def cancel_before_submission(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """A cancel while the batch is still `validating` at Sluice, before anything reached the
    provider: it ends `cancelled` and nothing is ever submitted."""
    async with gateway(settings(db), make_router(fake, flavor)) as (app, c):
        await app.engine.stop()
        created = await c.create(lines(flavor, {"a": "hello", "b": "world"}))
        cancelled = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
        assert cancelled.status == "cancelling"
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        batch = await c.wait_for(created.id, timeout=WAIT)
        assert batch.status == "cancelled" and not batch.provider_batch_id, batch
        assert {r.status for r in await c.results(created.id)} == {"cancelled"}
        await assert_files_match_results(c, batch)
    state = fake.state()
    assert state["batch_creates"][flavor.provider] == 0 and state["file_uploads"][flavor.provider] == 0


async def expire_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """The provider expires the batch: finished work is kept, the rest is expired."""
    fake.configure(polls_per_state=HOLD)
    texts = {"done": "quick answer", "slow": "a SLOW request"}
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, texts))
        pid = await provider_id(c, created.id)
        step(fake, flavor.provider, pid)
        fake.expire(flavor.provider, pid)
        batch = await c.wait_for(created.id, timeout=WAIT)
        assert batch.status == "expired" and batch.expired_at, batch
        results = await results_by_id(c, created.id)
        await assert_files_match_results(c, batch)
    assert results["done"]["status"] == "completed" and results["done"]["usage"]["input_tokens"] == 2
    assert results["slow"]["status"] == "expired" and results["slow"]["error"]["code"] == "batch_expired"
    assert batch.usage.input_tokens == 2  # completed work in an expired batch is billed


async def transient_faults(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """429 + Retry-After on the upload and 500s on polls slow the batch down but never fail it."""
    p = flavor.provider
    # Retry-After (0.2 s) is longer than the engine's own backoff after one failure (0.05-0.1 s here).
    fake.add_fault(provider=p, method="POST", path_regex=r"/files(/upload)?$", status=429, retry_after=0.2, times=1)
    fake.add_fault(provider=p, method="GET", path_regex=r"/batches/[^/]+$", status=500, times=3)
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, {"x": "hello", "y": "world FAIL"}))
        batch = await c.wait_for(created.id, timeout=WAIT)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    (waited,) = waits_after_faults(fake, p, 429)
    assert waited >= 0.2, f"the next request came {waited:.3f}s after a 429 with Retry-After: 0.2"
    state = fake.state()
    faulted = [(r["method"], r["status"]) for r in state["requests"] if r["fault"]]
    assert faulted.count(("POST", 429)) == 1 and faulted.count(("GET", 500)) == 3
    assert state["faults_pending"] == [0, 0]
    assert state["batch_creates"][p] == 1


async def submit_rejected(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """A non-retryable 400 when creating the batch fails it, with the provider's message in `errors`."""
    fake.add_fault(provider=flavor.provider, method="POST", path_regex=r"/batches$", status=400, times=1,
                   body={"error": {"message": "Invalid value for 'endpoint'.", "type": "invalid_request_error",
                                   "param": "endpoint", "code": "invalid_value"}})
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, {"x": "hello"}))
        batch = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert batch.status == "failed" and batch.failed_at
    assert len(batch.errors.data) == 1 and "Invalid value for 'endpoint'" in batch.errors.data[0].message
    assert "HTTP 400" in batch.errors.data[0].message
    assert not batch.provider_batch_id
    assert fake.state()["batch_creates"][flavor.provider] == 0
    assert results == {}  # like OpenAI: a batch that failed validation has no per-request results


async def provider_failed(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """The provider fails the whole batch: Sluice fails it with the provider's errors."""
    fake.configure(polls_per_state=HOLD)
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, {"x": "hello"}))
        pid = await provider_id(c, created.id)
        fake.fail(flavor.provider, pid, "input rejected by policy")
        batch = await c.wait_for(created.id, timeout=WAIT)
    assert batch.status == "failed"
    assert any("input rejected by policy" in e.message for e in batch.errors.data), batch.errors


async def restart_mid_poll(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """Sluice stops while the batch runs at the provider; a new Sluice on the same database
    resumes polling the same provider batch and completes it. Exactly one batch was created."""
    fake.configure(polls_per_state=HOLD)
    texts = {"a": "hello there", "b": "FAIL it"}
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, texts))
        pid = await provider_id(c, created.id)
        step(fake, flavor.provider, pid)
        assert fake_state(fake, flavor.provider, pid).lower() == "in_progress"
        await c.wait_for(created.id, {"in_progress"}, timeout=WAIT)
    release(fake, flavor.provider, pid)  # the provider carries on while Sluice is down
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        batch = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert batch.status == "completed" and batch.provider_batch_id == pid
    assert results["a"]["status"] == "completed" and results["b"]["status"] == "failed"
    state = fake.state()
    assert state["batch_creates"][flavor.provider] == 1 and state["file_uploads"][flavor.provider] == 1


async def recover_lost_submission(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """A crash between 'submit started' and 'provider id stored': on restart Sluice asks the
    provider (`find_submitted`) and adopts the batch it finds instead of submitting again."""
    p = flavor.provider
    texts = {"a": "hello there", "b": "FAIL it"}
    fake.add_fault(provider=p, method="POST", path_regex=r"/files(/upload)?$", status=503, times=HOLD)
    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines(flavor, texts))

        async def submit_tried() -> bool:
            return any(r["fault"] and r["method"] == "POST" for r in fake.state()["requests"])

        await until("Sluice to try the upload", submit_tried)
    fake.clear_faults()
    assert fake.state()["batch_creates"][p] == 0

    # What the crashed Sluice got through: the provider has the batch; the database has no id.
    adapter = make_adapter(fake, flavor)

    async def request_lines() -> Any:
        for i, (cid, text) in enumerate(texts.items()):
            yield RequestLine(i, cid, "/v1/chat/completions",
                              {"model": flavor.model, "messages": [{"role": "user", "content": text}],
                               "max_tokens": 16})

    pid = await adapter.submit(BatchJob(created.id, "/v1/chat/completions", flavor.model, "24h", len(texts)),
                               request_lines())
    await adapter.aclose()
    store = Store(create_engine(db))
    await store.mark_submit_started(created.id)
    await store.make_due(created.id)
    await store.close()

    async with gateway(settings(db), make_router(fake, flavor)) as (_, c):
        batch = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert batch.status == "completed" and batch.provider_batch_id == pid
    assert results["a"]["status"] == "completed" and results["b"]["status"] == "failed"
    state = fake.state()
    assert state["batch_creates"][p] == 1 and state["file_uploads"][p] == 1

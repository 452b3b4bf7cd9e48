"""Mistral batch jobs (`/v1/batch/jobs` with uploaded input files).

The lines are uploaded as one JSONL file (purpose `batch`) of `{custom_id, body}` (no
method/url; the model is set once on the job, so every line must name the same model), then a
job is created with `input_files`, `model`, `endpoint` and `metadata {"sluice_batch_id": …}`.
`find_submitted` pages through the job list (newest first) looking for that metadata, so a job
created just before a crash is found instead of submitted twice.

Statuses: QUEUED → validating, RUNNING → in_progress, SUCCESS → completed, FAILED → failed,
TIMEOUT_EXCEEDED → expired, CANCELLATION_REQUESTED → cancelling, CANCELLED → cancelled (an
unknown status is read as in_progress). Results: the `output_file` and `error_file`, whose lines
are OpenAI-shaped (`{custom_id, response:{status_code, body}, error}`). Validation failures come
back as 422 `{"detail": [...]}` and fail the batch.

Chat bodies are passed through with OpenAI-only fields Mistral would reject dropped or renamed
(`seed` → `random_seed`, `max_completion_tokens` → `max_tokens`). Supported endpoints:
`/v1/chat/completions`, `/v1/embeddings`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from adapters.base import (
    BatchJob,
    Capabilities,
    LineResult,
    NativeBatchAdapter,
    ProviderError,
    ProviderState,
    ProviderStatus,
    RequestLine,
    provider_line_id,
)
from adapters.chat_format import CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT
from adapters.openai_format import as_int, batch_errors, map_status, results_from_files, spool_jsonl

log = logging.getLogger(__name__)

STATUSES: dict[str, ProviderState] = {
    "QUEUED": ProviderState.VALIDATING, "RUNNING": ProviderState.IN_PROGRESS, "SUCCESS": ProviderState.COMPLETED,
    "FAILED": ProviderState.FAILED, "TIMEOUT_EXCEEDED": ProviderState.EXPIRED,
    "CANCELLATION_REQUESTED": ProviderState.CANCELLING, "CANCELLED": ProviderState.CANCELLED,
}
ENDPOINTS = (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT)
METADATA_KEY = "sluice_batch_id"
DEFAULT_FIND_PAGES = 20
# OpenAI chat fields Mistral does not accept; dropped.
CHAT_DROPPED = frozenset({"model", "user", "store", "metadata", "stream", "stream_options", "service_tier",
                          "reasoning_effort", "logit_bias", "logprobs", "top_logprobs", "modalities", "audio",
                          "web_search_options", "prediction_content", "max_completion_tokens", "seed"})
EMBEDDINGS_DROPPED = frozenset({"model", "user"})


def to_mistral_body(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """An OpenAI request body as Mistral's (the model is set on the job, not per line)."""
    if endpoint == EMBEDDINGS_ENDPOINT:
        out = {k: v for k, v in body.items() if k not in EMBEDDINGS_DROPPED}
        if "dimensions" in out:
            out["output_dimension"] = out.pop("dimensions")
        return out
    out = {k: v for k, v in body.items() if k not in CHAT_DROPPED}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if body.get("seed") is not None:
        out["random_seed"] = body["seed"]
    return out


def job_status(job: dict[str, Any]) -> ProviderStatus:
    raw = job.get("status")
    return ProviderStatus(status=map_status(raw, STATUSES, fold=str.upper), raw_status=str(raw),
                          total=as_int(job.get("total_requests")), completed=as_int(job.get("succeeded_requests")),
                          failed=as_int(job.get("failed_requests")), errors=batch_errors(job.get("errors")))


class MistralAdapter(NativeBatchAdapter):
    kind = "mistral"
    # Mistral fixes the model per job.
    capabilities = Capabilities(endpoints=frozenset(ENDPOINTS), one_model_per_job=True, finds_lost_submissions=True)

    def __init__(self, name: str, *, base_url: str = "https://api.mistral.ai/v1", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        options = self.options
        self.timeout_hours = int(options.get("timeout_hours", 24))
        self.find_pages = int(options.get("find_max_pages", DEFAULT_FIND_PAGES))
        self.page_size = int(options.get("list_page_size", 100))

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, job: BatchJob, lines: AsyncIterable[RequestLine]) -> str:
        def encode(line: RequestLine) -> dict[str, Any]:
            return {"custom_id": provider_line_id(line.index), "body": to_mistral_body(line.body, job.endpoint)}

        spool, count = await spool_jsonl(lines, encode)
        try:
            if not count:
                raise ProviderError(f"{self.name}: the batch has no requests", provider=self.name, retryable=False)
            uploaded = await self.http.json("POST", "/files", data={"purpose": "batch"},
                                            files={"file": (f"{job.batch_id}.jsonl", spool, "application/jsonl")})
        finally:
            spool.close()
        created = await self.http.json("POST", "/batch/jobs", json={
            "input_files": [uploaded["id"]], "model": job.model, "endpoint": job.endpoint,
            "metadata": {METADATA_KEY: job.batch_id}, "timeout_hours": self.timeout_hours})
        return str(created["id"])

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        for page in range(self.find_pages):
            listing = await self.http.json("GET", "/batch/jobs", params={
                "page": page, "page_size": self.page_size, "order_by": "-created"})
            jobs = listing.get("data") or []
            for found in jobs:
                if (found.get("metadata") or {}).get(METADATA_KEY) == batch_id and found.get("id"):
                    return str(found["id"])
            if len(jobs) < self.page_size or (page + 1) * self.page_size >= as_int(listing.get("total")):
                return None
        log.warning("%s: batch %s not found in the first %d pages of jobs", self.name, batch_id, self.find_pages)
        return None

    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        return job_status(await self.http.json("GET", f"/batch/jobs/{provider_batch_id}"))

    async def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        job = await self.http.json("GET", f"/batch/jobs/{provider_batch_id}")
        async for result in results_from_files(self.http, (job.get("output_file"), job.get("error_file"))):
            yield result

    async def send_cancel(self, provider_batch_id: str) -> None:
        await self.http.json("POST", f"/batch/jobs/{provider_batch_id}/cancel")

"""Native batch adapters for the OpenAI family: OpenAI, Azure OpenAI and Groq (OpenAI's Batch
and Files API reference, Microsoft's Azure OpenAI batch docs, Groq's Batch API docs).

All three share one flow, implemented once in `OpenAIAdapter`:

1. spool the lines as OpenAI `BatchRequestInput` JSONL into a temporary file (never one big string);
2. upload it (`POST /files`, multipart, purpose `batch`) and wait while the file is `pending` (Azure);
3. `POST /batches` with `metadata.sluice_batch_id`, so `find_submitted` can recognise it after a crash;
4. `poll` maps `status` + `request_counts` + `errors`; `results` streams both the output and the error
   file line by line (either may be absent or zero-byte) and joins on `custom_id` = `sl-<index>`.

The subclasses only override hooks: auth header and query, endpoint spelling, allowed endpoints, how
batches are listed, and per-line checks. Every HTTP call goes through `HttpClient`, so only
`ProviderError` leaves an adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import IO, Any

from adapters.base import (
    BatchJob,
    Capabilities,
    LineResult,
    NativeBatchAdapter,
    ProviderError,
    ProviderStatus,
    RequestLine,
)
from adapters.openai_format import (
    openai_batch_status,
    openai_input_line,
    results_from_files,
    spool_jsonl,
)

log = logging.getLogger(__name__)

METADATA_KEY = "sluice_batch_id"
# A file in one of these will never become usable (Azure's FileState has `deleting` and `deleted`).
FAILED_FILE_STATUSES = frozenset({"error", "failed", "deleting", "deleted"})


def require(obj: Any, key: str, provider: str) -> str:
    """A non-empty string field of a provider response; a malformed answer is a retryable error."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    if not isinstance(value, str) or not value:
        raise ProviderError(f"{provider} sent a response without {key!r}", provider=provider, retryable=True,
                            code="invalid_provider_response")
    return value


class OpenAIAdapter(NativeBatchAdapter):
    """OpenAI's Files + Batches API (`base_url` like `https://api.openai.com/v1`).

    Options: `organization`, `project` (OpenAI headers), `completion_window` (overrides the
    batch's), `find_pages` (how many pages of 100 batches `find_submitted` looks through, default
    10), `file_ready_timeout` (seconds to wait for a `pending` upload, default 300).
    """

    kind = "openai"
    capabilities = Capabilities(max_lines=50_000, max_bytes=200 * 2**20, finds_lost_submissions=True)
    file_purpose = "batch"
    # File statuses a batch may be created from ("": the provider reports none). Every other status
    # is waited on (`file_ready_timeout`) or, in FAILED_FILE_STATUSES, fails the submit.
    ready_file_statuses = frozenset({"processed", "uploaded", ""})
    upload_path = "/files"

    def __init__(self, name: str, *, base_url: str = "", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        self.find_pages = int(self.options.get("find_pages", 10))
        self.file_ready_timeout = float(self.options.get("file_ready_timeout", 300.0))

    # --- hooks --------------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if self.options.get("organization"):
            headers["OpenAI-Organization"] = str(self.options["organization"])
        if self.options.get("project"):
            headers["OpenAI-Project"] = str(self.options["project"])
        return headers

    def endpoint_path(self, endpoint: str) -> str:
        """How this provider spells a Sluice endpoint (`/v1/chat/completions`) in `endpoint`/`url`."""
        return endpoint

    def encode_line(self, line: RequestLine) -> dict[str, Any]:
        return openai_input_line(line, self.endpoint_path(line.url))

    def create_body(self, job: BatchJob, file_id: str) -> dict[str, Any]:
        return {"input_file_id": file_id, "endpoint": self.endpoint_path(job.endpoint),
                "completion_window": str(self.options.get("completion_window") or job.completion_window),
                "metadata": {METADATA_KEY: job.batch_id}}

    def created_id(self, response: Any) -> str:
        return require(response, "id", self.name)

    def status_of(self, batch: Mapping[str, Any]) -> ProviderStatus:
        return openai_batch_status(batch)

    async def list_batches(self) -> AsyncIterator[Mapping[str, Any]]:
        """Recent batches, newest first, following OpenAI's `after` cursor for `find_pages` pages."""
        after: str | None = None
        for _ in range(self.find_pages):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = await self.http.json("GET", "/batches", params=params)
            data = page.get("data") if isinstance(page, Mapping) else None
            if not isinstance(data, list) or not data:
                return
            for batch in data:
                if isinstance(batch, Mapping):
                    yield batch
            last = page.get("last_id") or (data[-1].get("id") if isinstance(data[-1], Mapping) else None)
            if not page.get("has_more") or not last:
                return
            after = str(last)

    def sluice_id_of(self, batch: Mapping[str, Any]) -> str | None:
        metadata = batch.get("metadata")
        value = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
        return str(value) if value else None

    # --- plumbing -----------------------------------------------------------------------------

    def upload_form(self, filename: str) -> dict[str, str]:
        """The form fields of the upload besides `file`."""
        return {"purpose": self.file_purpose}

    async def upload(self, spool: IO[bytes], filename: str) -> Mapping[str, Any]:
        """Multipart `POST {upload_path}`; httpx streams the spooled file in chunks."""
        file_obj = await self.http.json("POST", self.upload_path, data=self.upload_form(filename),
                                        files={"file": (filename, spool, "application/jsonl")})
        require(file_obj, "id", self.name)
        return dict(file_obj)

    async def wait_file_ready(self, file_obj: Mapping[str, Any]) -> None:
        """Azure answers uploads with `status: pending` and wants `processed` before a batch
        references the file. OpenAI says `processed` (or `uploaded`) at once. A status that is
        neither ready nor failed (`pending`, `running`, one Sluice does not know) is waited on."""
        file_id = str(file_obj["id"])
        deadline = time.monotonic() + self.file_ready_timeout
        delay = 0.05
        while True:
            status = str(file_obj.get("status") or "").lower()
            if status in FAILED_FILE_STATUSES:
                details = file_obj.get("status_details") or status
                raise ProviderError(f"{self.name} rejected the input file {file_id}: {details}", provider=self.name,
                                    retryable=False, code="file_rejected")
            if status in self.ready_file_statuses:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"{self.name} did not process the input file {file_id} within "
                                    f"{self.file_ready_timeout:.0f}s", provider=self.name, retryable=True,
                                    code="file_not_ready")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            file_obj = await self.http.json("GET", f"/files/{file_id}")

    # --- NativeBatchAdapter -------------------------------------------------------------------

    async def submit(self, job: BatchJob, lines: AsyncIterable[RequestLine]) -> str:
        spool, count = await spool_jsonl(lines, self.encode_line)
        try:
            if count == 0:
                raise ProviderError(f"batch {job.batch_id} has no lines to submit", provider=self.name,
                                    retryable=False, code="empty_batch")
            file_obj = await self.upload(spool, f"sluice-{job.batch_id}.jsonl")
        finally:
            spool.close()
        await self.wait_file_ready(file_obj)
        created = await self.http.json("POST", "/batches", json=self.create_body(job, str(file_obj["id"])))
        return self.created_id(created)

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        async for batch in self.list_batches():
            if self.sluice_id_of(batch) == batch_id and batch.get("id"):
                return str(batch["id"])
        return None

    async def get_batch(self, provider_batch_id: str) -> Mapping[str, Any]:
        batch = await self.http.json("GET", f"/batches/{provider_batch_id}")
        if not isinstance(batch, Mapping):
            raise ProviderError(f"{self.name} sent a batch that is not an object", provider=self.name,
                                retryable=True, code="invalid_provider_response")
        return batch

    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        return self.status_of(await self.get_batch(provider_batch_id))

    async def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        batch = await self.get_batch(provider_batch_id)
        async for result in results_from_files(self.http, (batch.get("output_file_id"), batch.get("error_file_id"))):
            yield result

    async def send_cancel(self, provider_batch_id: str) -> None:
        await self.http.json("POST", f"/batches/{provider_batch_id}/cancel")


class AzureOpenAIAdapter(OpenAIAdapter):
    """Azure OpenAI (Microsoft's Azure OpenAI batch docs). `base_url` is
    `https://{resource}.openai.azure.com/openai` for the dated API (`api-version` query, paths and
    endpoints without `/v1`), or `…/openai/v1` for the v1 surface (no `api-version`, OpenAI spelling).

    Options: `api_version` (default `2024-10-21`), `deployments` (model → deployment name; the router's
    aliases usually do this already). Every line must use the same deployment (Azure's `model_mismatch`):
    intake refuses a batch that mixes models for it.
    """

    kind = "azure"
    capabilities = Capabilities(one_model_per_job=True, max_lines=100_000, max_bytes=200 * 2**20,
                                finds_lost_submissions=True)
    DEFAULT_API_VERSION = "2024-10-21"
    # Azure's FileState: uploaded, pending, running, processed, error, deleting, deleted. Only
    # `processed` files may back a batch.
    ready_file_statuses = frozenset({"processed"})

    def __init__(self, name: str, *, base_url: str = "", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        self.v1_surface = self.base_url.endswith("/v1")
        self.api_version = str(self.options.get("api_version") or self.DEFAULT_API_VERSION)
        self.deployments: dict[str, str] = {str(k): str(v) for k, v in (self.options.get("deployments") or {}).items()}

    def headers(self) -> dict[str, str]:
        return {"api-key": self.api_key}

    def query(self) -> dict[str, str] | None:
        return None if self.v1_surface else {"api-version": self.api_version}

    def endpoint_path(self, endpoint: str) -> str:
        return endpoint if self.v1_surface else endpoint.removeprefix("/v1")

    def encode_line(self, line: RequestLine) -> dict[str, Any]:
        model = str(line.body.get("model") or "")
        if model in self.deployments:
            line = RequestLine(line.index, line.custom_id, line.url, {**line.body, "model": self.deployments[model]})
        return super().encode_line(line)


class GroqAdapter(OpenAIAdapter):
    """Groq (Groq's Batch API docs): OpenAI-compatible at `https://api.groq.com/openai/v1`, chat completions
    only, `completion_window` from 24h to 7d (option `completion_window`), and a batch list
    without pagination."""

    kind = "groq"
    capabilities = Capabilities(endpoints=frozenset({"/v1/chat/completions"}), max_lines=50_000,
                                max_bytes=200 * 2**20, finds_lost_submissions=True)

    async def list_batches(self) -> AsyncIterator[Mapping[str, Any]]:
        page = await self.http.json("GET", "/batches")
        data = page.get("data") if isinstance(page, Mapping) else page
        for batch in data if isinstance(data, list) else []:
            if isinstance(batch, Mapping):
                yield batch

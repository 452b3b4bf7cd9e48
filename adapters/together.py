"""Together's native batch API (Together's Batch API docs): OpenAI-like, with these differences handled here.

- Upload: exactly as Together's OpenAPI spec (togethercomputer/openapi, 2.0.0) documents it, its only
  upload: multipart `POST /files/upload` with `purpose=batch-api`, `file_name` and `file` (the bytes,
  streamed from the spool). Older SDKs used a redirect flow (`POST /files` → 302 → `PUT` to a signed
  URL → `POST /files/{id}/preprocess`) that the spec does not have; it is gone.
- Input lines are `{custom_id, body}` (no `method`/`url`); endpoints: chat and text completions.
- Create answers `{"job": {...}, "warning": ...}`; statuses are UPPERCASE; timestamps ISO-8601;
  no per-request counts (only `progress`); a failed job has a plain-string `error`.
- No metadata on jobs: `find_submitted` recognises the batch by its input file, which is named after
  Sluice's batch id (`sluice-<batch_id>.jsonl`). `GET /batches` is a bare JSON array.

Output and error files are OpenAI-shaped, so results, cancel and the HTTP plumbing are
`OpenAIAdapter`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from adapters.base import BatchJob, Capabilities, ProviderStatus, RequestLine, provider_line_id
from adapters.openai import OpenAIAdapter, require
from adapters.openai_format import together_job_status


def _items(payload: Any) -> list[Mapping[str, Any]]:
    """A list response: a bare array (Together's batches) or `{data: [...]}` (its files)."""
    data = payload.get("data") if isinstance(payload, Mapping) else payload
    return [x for x in data if isinstance(x, Mapping)] if isinstance(data, list) else []


class TogetherAdapter(OpenAIAdapter):
    """Together (`base_url` like `https://api.together.xyz/v1`). Option: `completion_window`."""

    kind = "together"
    capabilities = Capabilities(endpoints=frozenset({"/v1/chat/completions", "/v1/completions"}), max_lines=50_000,
                                max_bytes=100 * 2**20, finds_lost_submissions=True)
    file_purpose = "batch-api"
    upload_path = "/files/upload"  # the spec's only upload: multipart purpose, file_name, file

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def encode_line(self, line: RequestLine) -> dict[str, Any]:
        return {"custom_id": provider_line_id(line.index), "body": line.body}

    def create_body(self, job: BatchJob, file_id: str) -> dict[str, Any]:
        return {"input_file_id": file_id, "endpoint": job.endpoint,
                "completion_window": str(self.options.get("completion_window") or job.completion_window)}

    def created_id(self, response: Any) -> str:
        job = response.get("job") if isinstance(response, Mapping) and "job" in response else response
        return require(job, "id", self.name)

    def status_of(self, batch: Mapping[str, Any]) -> ProviderStatus:
        return together_job_status(batch)

    def upload_form(self, filename: str) -> dict[str, str]:
        return {"purpose": self.file_purpose, "file_name": filename}

    async def list_batches(self) -> AsyncIterator[Mapping[str, Any]]:
        for job in _items(await self.http.json("GET", "/batches")):
            yield job

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        name = f"sluice-{batch_id}.jsonl"
        files = {str(f["id"]) for f in _items(await self.http.json("GET", "/files"))
                 if f.get("filename") == name and f.get("id")}
        if not files:
            return None
        async for job_obj in self.list_batches():
            if str(job_obj.get("input_file_id")) in files and job_obj.get("id"):
                return str(job_obj["id"])
        return None

"""Together's native batch API (Together's Batch API docs): OpenAI-like, with these differences handled here.

- Upload: purpose `batch-api`. Default is the documented redirect flow: form `POST /files`
  (`purpose`, `file_name`, `file_type=jsonl`) → 302 with `Location` (a signed URL) and
  `X-Together-File-Id` → `PUT` the bytes there (no credentials, explicit Content-Length) →
  `POST /files/{id}/preprocess`. Option `upload: multipart` sends one multipart `POST /files` instead.
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
from typing import IO, Any

from adapters.base import BatchJob, Capabilities, ProviderError, ProviderStatus, RequestLine, provider_line_id
from adapters.http import HttpClient
from adapters.openai import OpenAIAdapter, require
from adapters.openai_format import together_job_status

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024


async def _chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := spool.read(CHUNK):
        yield chunk


def _items(payload: Any) -> list[Mapping[str, Any]]:
    """A list response: a bare array (Together's batches) or `{data: [...]}` (its files)."""
    data = payload.get("data") if isinstance(payload, Mapping) else payload
    return [x for x in data if isinstance(x, Mapping)] if isinstance(data, list) else []


class TogetherAdapter(OpenAIAdapter):
    """Together (`base_url` like `https://api.together.xyz/v1`). Options: `upload`
    (`redirect`, default, or `multipart`), `completion_window`."""

    kind = "together"
    capabilities = Capabilities(endpoints=frozenset({"/v1/chat/completions", "/v1/completions"}), max_lines=50_000,
                                max_bytes=100 * 2**20, finds_lost_submissions=True)
    file_purpose = "batch-api"

    def __init__(self, name: str, *, base_url: str = "", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        self.upload_mode = str(self.options.get("upload") or "redirect")
        self._signed: HttpClient | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def signed(self) -> HttpClient:
        """A client without credentials, for the pre-signed upload URL (often another host)."""
        if self._signed is None:
            self._signed = HttpClient(self.name, "", {})
        return self._signed

    async def aclose(self) -> None:
        await super().aclose()
        if self._signed is not None:
            signed, self._signed = self._signed, None
            await signed.aclose()

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

    async def upload(self, spool: IO[bytes], filename: str) -> Mapping[str, Any]:
        if self.upload_mode == "multipart":
            return await super().upload(spool, filename)
        response = await self.http.request("POST", "/files", data={
            "purpose": self.file_purpose, "file_name": filename, "file_type": "jsonl"})
        location = response.headers.get("location")
        file_id = response.headers.get("x-together-file-id")
        if response.status_code not in REDIRECTS or not location or not file_id:
            raise ProviderError(f"{self.name} did not answer the upload with a signed URL "
                                f"(HTTP {response.status_code})", provider=self.name, retryable=True,
                                code="invalid_provider_response")
        spool.seek(0, 2)
        size = spool.tell()
        spool.seek(0)
        await self.signed.request("PUT", location, content=_chunks(spool),
                                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        file_obj = await self.http.json("POST", f"/files/{file_id}/preprocess")
        return dict(file_obj) if isinstance(file_obj, Mapping) and file_obj.get("id") else {"id": file_id}

    async def list_batches(self) -> AsyncIterator[Mapping[str, Any]]:
        for job in _items(await self.http.json("GET", "/batches")):
            yield job

    async def find_submitted(self, batch_id: str) -> str | None:
        name = f"sluice-{batch_id}.jsonl"
        files = {str(f["id"]) for f in _items(await self.http.json("GET", "/files"))
                 if f.get("filename") == name and f.get("id")}
        if not files:
            return None
        async for job in self.list_batches():
            if str(job.get("input_file_id")) in files and job.get("id"):
                return str(job["id"])
        return None

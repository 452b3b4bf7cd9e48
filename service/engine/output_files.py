"""OpenAI-style output and error files, written when a batch ends.

Successful requests go to the output file, failed ones (HTTP status >= 400, or no response:
cancelled, expired, lost) to the error file, in OpenAI's `BatchRequestOutput` line format
`{id, custom_id, response: {status_code, request_id, body} | null, error: {code, message} | null}`.
File ids derive from the batch id, so writing them again after a crash replaces, never doubles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from service.domain.model import FileStatus, now
from service.storage.repository import OutputFileIds, Store
from service.storage.tables import BatchRow, FileRow, ResultRow

CHUNK_BYTES = 1024 * 1024
OUTPUT_TTL = 30 * 24 * 3600
MERGE_PAGE = 1000


def output_line(batch_id: str, row: ResultRow) -> dict[str, Any]:
    response = None
    if row.status_code:
        body = json.loads(row.response_json) if row.response_json else None
        response = {"status_code": row.status_code, "request_id": row.request_id or "", "body": body}
    error = {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None
    digest = hashlib.sha256(f"{batch_id}:{row.idx}".encode()).hexdigest()[:24]
    return {"id": f"batch_req_{digest}", "custom_id": row.custom_id, "response": response, "error": error}


def _succeeded(row: ResultRow) -> bool:
    return row.error_code is None and 200 <= row.status_code < 300


class _FileWriter:
    """Accumulates lines into ≤1 MiB chunks and stores them as they fill."""

    def __init__(self, store: Store, row: FileRow) -> None:
        self.store, self.row = store, row
        self.buffer = bytearray()
        self.seq = self.size = self.lines = 0
        self.started = False

    async def add(self, line: dict[str, Any]) -> None:
        if not self.started:
            await self.store.discard_file(self.row.id)
            await self.store.begin_file(self.row)
            self.started = True
        self.buffer += json.dumps(line, separators=(",", ":")).encode() + b"\n"
        self.lines += 1
        if len(self.buffer) >= CHUNK_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self.buffer:
            await self.store.add_file_chunk(self.row.id, self.seq, bytes(self.buffer))
            self.seq += 1
            self.size += len(self.buffer)
            self.buffer.clear()

    async def close(self) -> str | None:
        if not self.started:
            return None
        await self._flush()
        await self.store.finish_file(self.row.id, self.size, self.lines)
        return self.row.id


class OutputFiles:
    """The engine's finalizer: writes both files, returns the batch fields that name them."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _row(self, batch: BatchRow, kind: str) -> FileRow:
        t = now()
        return FileRow(id=f"file-{kind}-{batch.id.removeprefix('batch_')}", project=batch.project,
                       filename=f"{batch.id}_{kind}.jsonl", purpose="batch_output", bytes=0, line_count=0,
                       status=FileStatus.UPLOADING, created_at=t, expires_at=t + OUTPUT_TTL)

    async def __call__(self, batch: BatchRow) -> OutputFileIds:
        current = await self.store.engine_batch(batch.id)
        if current.status.terminal:  # ended: its files are final, never discarded
            return OutputFileIds(output_file_id=current.output_file_id, error_file_id=current.error_file_id)
        output = _FileWriter(self.store, self._row(batch, "output"))
        errors = _FileWriter(self.store, self._row(batch, "error"))
        async for row in self._results(batch.id):
            await (output if _succeeded(row) else errors).add(output_line(batch.id, row))
        files = OutputFileIds(output_file_id=await output.close(), error_file_id=await errors.close())
        if batch.chain_id is None:
            return files
        merged_output, merged_errors = await self._merged(batch)
        return OutputFileIds(files.output_file_id, files.error_file_id, merged_output, merged_errors)

    async def _merged(self, batch: BatchRow) -> tuple[str | None, str | None]:
        """A retry's merged files: every line of the chain's first batch, in its order, from the
        latest batch of the chain that ran it (this one included, as it ends)."""
        output = _FileWriter(self.store, self._row(batch, "merged-output"))
        errors = _FileWriter(self.store, self._row(batch, "merged-error"))
        chain = await self.store.chain(batch.project, batch.id)
        after = ""
        while True:
            attempts, more = await self.store.latest_attempts(chain, after, MERGE_PAGE)
            for attempt in attempts:
                if attempt.result is not None:
                    line = output_line(attempt.batch.id, attempt.result)
                    await (output if _succeeded(attempt.result) else errors).add(line)
            if not more or not attempts:
                return await output.close(), await errors.close()
            after = attempts[-1].request.custom_id

    def _results(self, batch_id: str) -> AsyncIterator[ResultRow]:
        return self.store.iter_results(batch_id)

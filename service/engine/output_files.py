"""OpenAI-style output and error files, written when a batch ends.

Successful requests go to the output file, failed ones (HTTP status >= 400, or no response:
cancelled, expired, lost) to the error file, in OpenAI's `BatchRequestOutput` line format
`{id, custom_id, response: {status_code, request_id, body} | null, error: {code, message} | null}`.
File ids derive from the batch id, so writing them again after a crash replaces, never doubles.
Both files are written in one pass over the stored results, each line put together from the stored
response text as it is: no body is parsed and printed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from service.domain.model import FileStatus, now
from service.storage.blobs import BlobWriter
from service.storage.repository import OutputFileIds, Store
from service.storage.tables import BatchRow, FileRow

CHUNK_BYTES = 1024 * 1024
OUTPUT_TTL = 30 * 24 * 3600  # default lifetime of output and error files, as OpenAI's
MERGE_PAGE = 1000


_string = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str, quotes included


def output_line(batch_id: str, row: Any) -> dict[str, Any]:
    """One line of an output or error file, as a JSON value (`output_bytes` writes it)."""
    response = None
    if row.status_code:
        body = json.loads(row.response_json) if row.response_json else None
        response = {"status_code": row.status_code, "request_id": row.request_id or "", "body": body}
    error = {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None
    return {"id": _line_id(batch_id, row.idx), "custom_id": row.custom_id, "response": response, "error": error}


def _line_id(batch_id: str, idx: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{idx}".encode()).hexdigest()[:24]


def output_bytes(batch_id: str, row: Any) -> bytes:
    """`output_line` as a JSONL line, newline included, without parsing the body and printing it
    again: byte for byte `json.dumps(output_line(batch_id, row), separators=(",", ":"))` (tested),
    for a stored result (a ResultRow, or a plain row with its columns)."""
    response = "null"
    if row.status_code:
        response = (f'{{"status_code":{int(row.status_code)},"request_id":{_string(row.request_id or "")},'
                    f'"body":{_body(row)}}}')
    error = (f'{{"code":{_string(row.error_code)},"message":{_string(row.error_message or "")}}}'
             if row.error_code else "null")
    return (f'{{"id":"{_line_id(batch_id, row.idx)}","custom_id":{_string(row.custom_id)},"response":{response},'
            f'"error":{error}}}\n').encode()


def _body(row: Any) -> str:
    """The stored body as the line shows it. A result stored with its served form (`response_pb`,
    migration 0011) has `response_json` as compact `json.dumps` output, which parsing and printing
    again would give back unchanged: it is used as it is. Older results (some stored with other
    separators) are printed again, as before."""
    text: str | None = row.response_json
    if not text:
        return "null"
    verbatim = row.verbatim if hasattr(row, "verbatim") else row.response_pb is not None
    return text if verbatim else json.dumps(json.loads(text), separators=(",", ":"))


def _succeeded(row: Any) -> bool:
    return row.error_code is None and 200 <= row.status_code < 300


class _FileWriter:
    """Accumulates lines into ≤1 MiB chunks and streams them to the blob store as they fill.
    Nothing is created until the first line: a batch without failures has no error file."""

    def __init__(self, store: Store, row: FileRow) -> None:
        self.store, self.row = store, row
        self.buffer = bytearray()
        self.lines = 0
        self.writer: BlobWriter | None = None

    async def add(self, line: dict[str, Any] | bytes) -> None:
        """One line: a JSON value, or a JSONL line already written (`output_bytes`)."""
        if self.writer is None:
            await self.store.discard_file(self.row.id)
            await self.store.begin_file(self.row)
            self.writer = BlobWriter(self.store.blobs, self.row.id)
        self.buffer += line if isinstance(line, bytes) else json.dumps(line, separators=(",", ":")).encode() + b"\n"
        self.lines += 1
        if len(self.buffer) >= CHUNK_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self.buffer and self.writer is not None:
            await self.writer.write(bytes(self.buffer))
            self.buffer.clear()

    async def close(self) -> str | None:
        if self.writer is None:
            return None
        await self._flush()
        size = await self.writer.close()
        await self.store.finish_file(self.row.id, size, self.lines)
        return self.row.id

    async def abort(self) -> None:
        if self.writer is not None:
            await self.writer.abort()


class OutputFiles:
    """The engine's finalizer: writes both files, returns the batch fields that name them."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _row(self, batch: BatchRow, kind: str) -> FileRow:
        t = now()
        return FileRow(id=f"file-{kind}-{batch.id.removeprefix('batch_')}", project=batch.project,
                       filename=f"{batch.id}_{kind}.jsonl", purpose="batch_output", bytes=0, line_count=0,
                       status=FileStatus.UPLOADING, created_at=t,
                       expires_at=t + (batch.output_expires_after or OUTPUT_TTL))

    async def __call__(self, batch: BatchRow) -> OutputFileIds:
        current = await self.store.engine_batch(batch.id)
        if current.status.terminal:  # ended: its files are final, never discarded
            return OutputFileIds(output_file_id=current.output_file_id, error_file_id=current.error_file_id)
        own = await self._write(batch, "output", "error", self._own_lines(batch))
        if batch.chain_id is None:
            return OutputFileIds(*own)
        merged = await self._write(batch, "merged-output", "merged-error", self._merged_lines(batch))
        return OutputFileIds(*own, *merged)

    async def _write(self, batch: BatchRow, output_kind: str, error_kind: str,
                     lines: AsyncIterator[tuple[bool, bytes]]) -> tuple[str | None, str | None]:
        """One streaming pass of (succeeded, line) into an output and an error file. On any failure
        both stay `uploading` (invisible) and are rewritten at the next finalization."""
        output = _FileWriter(self.store, self._row(batch, output_kind))
        errors = _FileWriter(self.store, self._row(batch, error_kind))
        try:
            async for succeeded, line in lines:
                await (output if succeeded else errors).add(line)
            return await output.close(), await errors.close()
        except BaseException:
            await output.abort()
            await errors.abort()
            raise

    async def _own_lines(self, batch: BatchRow) -> AsyncIterator[tuple[bool, bytes]]:
        async for row in self._results(batch.id):
            yield _succeeded(row), output_bytes(batch.id, row)

    async def _merged_lines(self, batch: BatchRow) -> AsyncIterator[tuple[bool, bytes]]:
        """A retry's merged files: every line of the chain's first batch, in its order, from the
        latest batch of the chain up to this one that ran it (this one included, as it ends). A
        retry made after this one does not count: its lines may still be running, and a line must
        not drop out of this batch's files because a later retry has not answered it yet."""
        chain = await self.store.chain(batch.project, batch.id)
        chain = chain[:[b.id for b in chain].index(batch.id) + 1]
        after = ""
        while True:
            attempts, more = await self.store.latest_attempts(chain, after, MERGE_PAGE)
            for attempt in attempts:
                if attempt.result is not None:
                    yield _succeeded(attempt.result), output_bytes(attempt.batch.id, attempt.result)
            if not more or not attempts:
                return
            after = attempts[-1].request.custom_id

    def _results(self, batch_id: str) -> AsyncIterator[Any]:
        return self.store.iter_results(batch_id)

"""Batches built from an uploaded file (CreateBatch with `input_file_id`).

Two passes: the first checks every line against the batch (endpoint, routing, the provider's
capabilities); the second feeds the lines to the store, with the routes the first pass resolved.
Both read the file's line index (`line_index.py`), written when the file was uploaded, so no body
is parsed again, and the stored lines point at their bytes in the file (`NewRequest.line_offset`)
instead of copying the bodies. A file without a whole index (uploaded before it existed) is read
and parsed instead, with the same checks, and its bodies are stored. A file with bad lines gives a
batch in status `failed` with OpenAI's `errors` list, line numbers included, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from service.domain.errors import InvalidRequest, NotFound, clip
from service.domain.model import DEFAULT_LIMITS, BatchError, BatchStatus, Limits, now
from service.intake.jsonl import LineChecks, NumberedProblem, check_lines, parse_line, split_lines
from service.intake.line_index import index_blocks, tokens_of, whole_index
from service.intake.validation import LineValidator
from service.storage.repository import NewRequest, Store, file_gone
from service.storage.tables import BatchRow

_NO_BODY: dict[str, Any] = {}  # a line stored by reference: its body is in the file


class BatchInputs:
    """Turns an uploaded file into a batch's request lines (for CreateBatch with input_file_id)."""

    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits

    async def prepare(self, project: str, file_id: str, validator: LineValidator,
                      row: BatchRow) -> AsyncIterator[NewRequest] | None:
        """Check the file; on problems mark `row` failed and return None, else the lines."""
        try:
            file = await self.store.get_file(project, file_id)
        except NotFound:
            raise NotFound(f"No such File object: {file_id}", param="input_file_id", code="file_not_found") from None
        if file.purpose != "batch":
            raise InvalidRequest(f"File {file_id} has purpose {clip(file.purpose)}; a batch input needs 'batch'.",
                                 param="input_file_id", code="invalid_file_purpose")
        indexed = await whole_index(self.store, file_id, file.line_count)
        if indexed:
            count, problems = await self._check_index(file_id, validator)
        else:
            content = _Measured(self.store.blobs.get(file_id))
            count, problems = await check_lines(split_lines(content), validator, self.limits.max_requests)
            if content.size != file.bytes:
                raise file_gone(file_id)
        if count == 0 or problems:
            row.status, row.failed_at, row.total = BatchStatus.FAILED, now(), 0
            row.errors = [BatchError(p.problem.code, p.problem.message, p.problem.field, p.line)
                          for p in problems] or [BatchError("empty_file", "The input file has no request lines.")]
            return None
        return self._indexed(file_id, validator) if indexed else self._requests(file_id, validator, count)

    async def _check_index(self, file_id: str, validator: LineValidator) -> tuple[int, list[NumberedProblem]]:
        """The checks of `check_lines`, on what the upload recorded of each line."""
        checks = LineChecks(validator, self.limits.max_requests)
        async for url, entries in index_blocks(self.store, file_id):
            for entry in entries:
                checks.check_indexed(entry[0], url, entry[4], entry[2], tokens_of(entry))
        return checks.count, checks.problems

    async def _indexed(self, file_id: str, validator: LineValidator) -> AsyncIterator[NewRequest]:
        """The second pass from the index: each line by reference to its bytes in the file. The
        store holds the file for the create's transaction (`Store.create_batch`), so a file purged
        since the first pass fails the create and leaves nothing behind."""
        routes, part_of = validator.routes, validator.part_of
        n = 0
        async for _, entries in index_blocks(self.store, file_id):
            for _, offset, length, custom_id, model, *_tokens in entries:
                route = routes[model]
                yield NewRequest(custom_id, model, _NO_BODY, route.model, route.provider, part_of(n),
                                 line_offset=offset, line_length=length)
                n += 1

    async def _requests(self, file_id: str, validator: LineValidator, expected: int) -> AsyncIterator[NewRequest]:
        """The second pass, inside the create's transaction: a file whose content went away since
        the first pass (deleted and swept) raises, and the transaction leaves nothing behind."""
        count = 0
        async for _, raw in split_lines(self.store.blobs.get(file_id)):
            line: Any = parse_line(raw)
            yield validator.again(count, line["custom_id"], line["body"])
            count += 1
        if count != expected:
            raise file_gone(file_id)


class _Measured:
    """An async byte stream that counts what passed through."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self.source = source
        self.size = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._run()

    async def _run(self) -> AsyncIterator[bytes]:
        async for chunk in self.source:
            self.size += len(chunk)
            yield chunk

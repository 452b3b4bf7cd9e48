"""Batches built from an uploaded file (CreateBatch with `input_file_id`).

Two streaming passes over the stored file: the first checks every line against the batch
(endpoint, routing, the provider's capabilities); the second feeds the lines to the store, with the
routes the first pass resolved. A file with bad lines gives a batch in status `failed` with OpenAI's
`errors` list, line numbers included, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from service.domain.errors import InvalidRequest, NotFound
from service.domain.model import DEFAULT_LIMITS, BatchError, BatchStatus, Limits, now
from service.intake.jsonl import check_lines, parse_line, split_lines
from service.intake.validation import LineValidator
from service.storage.repository import NewRequest, Store
from service.storage.tables import BatchRow


class BatchInputs:
    """Turns an uploaded file into a batch's request lines (for CreateBatch with input_file_id).

    Two streaming passes over the stored file: the first checks every line against the batch
    (endpoint, routing); the second feeds the lines to the store. A file with bad lines gives a
    batch in status `failed` with OpenAI's `errors` list, line numbers included, as OpenAI does.
    """

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
            raise InvalidRequest(f"File {file_id} has purpose {file.purpose!r}; a batch input needs 'batch'.",
                                 param="input_file_id", code="invalid_file_purpose")
        count, problems = await check_lines(split_lines(self.store.iter_file_chunks(file_id)), validator,
                                            self.limits.max_requests)
        if count == 0 or problems:
            row.status, row.failed_at, row.total = BatchStatus.FAILED, now(), 0
            row.errors = [BatchError(p.problem.code, p.problem.message, p.problem.field, p.line)
                          for p in problems] or [BatchError("empty_file", "The input file has no request lines.")]
            return None
        return self._requests(file_id, validator)

    async def _requests(self, file_id: str, validator: LineValidator) -> AsyncIterator[NewRequest]:
        n = 0
        async for _, raw in split_lines(self.store.iter_file_chunks(file_id)):
            line: Any = parse_line(raw)
            model = line["body"]["model"]
            route = validator.route_of(model)
            yield NewRequest(custom_id=line["custom_id"], model=model, body=line["body"],
                             provider_model=route.model, provider=route.provider, part_no=validator.part_of(n))
            n += 1

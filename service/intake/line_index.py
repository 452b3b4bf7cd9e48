"""The line index of an uploaded file: what creating a batch from it needs to know of each line.

While an upload streams, every line is parsed and checked once (`jsonl.check_upload`); its line
number, byte offset and length, custom_id, model and the token counts of its body are kept here
and stored in blocks (`Store.add_file_index_block`) as the upload goes, so memory stays flat
whatever the file's size. CreateBatch with `input_file_id` then checks the lines against the batch
(endpoint, routing, provider capabilities, estimate) and stores them from this index alone: no body
is parsed again, and the stored lines point at their bytes in the file instead of copying them.

A block is JSON: `{"url": ..., "lines": [[number, offset, length, custom_id, model, input_min,
input_estimate, input_max, own_output (-1: none), choices], ...]}`; the last one also has
`"total"`, the file's line count, so an index cut short is never taken for a whole one (such a
file, like one uploaded before the index existed, is read and parsed instead).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from service.domain.tokens import BodyTokens, body_tokens
from service.storage.repository import NewRequest, Store

BLOCK_LINES = 4096

__all__ = ["BLOCK_LINES", "LineIndexWriter", "index_blocks", "tokens_of", "whole_index"]


def tokens_of(entry: list[Any]) -> BodyTokens:
    """The token counts an index entry keeps of its line's body."""
    own = entry[8]
    return BodyTokens(entry[5], entry[6], entry[7], None if own < 0 else own, entry[9])


class LineIndexWriter:
    """Collects an upload's good lines and stores them a block at a time."""

    def __init__(self, store: Store, file_id: str) -> None:
        self.store = store
        self.file_id = file_id
        self.lines: list[list[Any]] = []
        self.url = ""
        self.seq = 0
        self.total = 0

    async def add(self, number: int, offset: int, length: int, url: str, request: NewRequest) -> None:
        t = body_tokens(url, request.body)
        self.lines.append([number, offset, length, request.custom_id, request.model, t.input_min, t.input_estimate,
                           t.input_max, -1 if t.own_output is None else t.own_output, t.choices])
        self.url = url
        self.total += 1
        if len(self.lines) >= BLOCK_LINES:
            await self._flush(last=False)

    async def close(self) -> None:
        await self._flush(last=True)

    async def _flush(self, last: bool) -> None:
        block: dict[str, Any] = {"url": self.url, "lines": self.lines}
        if last:
            block["total"] = self.total
        # Strings in the index passed `is_text` (no lone surrogate), so orjson can write them.
        await self.store.add_file_index_block(self.file_id, self.seq, orjson.dumps(block))
        self.seq += 1
        self.lines = []


async def whole_index(store: Store, file_id: str, line_count: int) -> bool:
    """True when the file has an index covering all its `line_count` lines."""
    last = await store.last_file_index_block(file_id)
    return last is not None and orjson.loads(last).get("total") == line_count


async def index_blocks(store: Store, file_id: str) -> AsyncIterator[tuple[str, list[list[Any]]]]:
    """(url, entries) block by block, in file order; an entry is [number, offset, length, custom_id,
    model, input_min, input_estimate, input_max, own_output, choices] (`tokens_of` reads the last five)."""
    async for data in store.file_index_blocks(file_id):
        block = orjson.loads(data)
        yield block["url"], block["lines"]

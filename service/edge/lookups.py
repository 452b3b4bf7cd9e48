"""Ids and cursors from the caller, checked before any database look-up.

An id Sluice never hands out (too long, NUL, not valid text, any character outside
`[A-Za-z0-9_-]`) is simply unknown: a 404 with the same envelope as a well-formed unknown id,
decided without touching the database, so no input reaches a query that one backend would refuse
(PostgreSQL and NUL) and no message echoes more than a clipped copy of it.
"""

from __future__ import annotations

from service.domain.errors import NotFound, clip
from service.domain.model import MAX_CUSTOM_ID_LEN
from service.intake.validation import is_object_id, is_text


def batch_id(value: str, param: str = "id") -> str:
    if not is_object_id(value):
        raise NotFound(f"No batch found with id {clip(value)}.", param=param, code="batch_not_found")
    return value


def file_id(value: str, param: str = "id") -> str:
    if not is_object_id(value):
        raise NotFound(f"No such File object: {clip(value)}", param=param, code="file_not_found")
    return value


def cursor(value: str, what: str) -> str:
    """An `after` cursor naming an object id (`what`: batch, file): unknown shapes are 404s on `after`."""
    if value and not is_object_id(value):
        raise NotFound(f"No {what} found with id {clip(value)} to list after.", param="after",
                       code="cursor_not_found")
    return value


def custom_id(value: str, batch: str, param: str = "custom_id", code: str = "result_not_found") -> str:
    if not value or len(value) > MAX_CUSTOM_ID_LEN or not is_text(value):
        raise NotFound(f"No request with custom_id {clip(value)} in batch {clip(batch)}.", param=param, code=code)
    return value

"""FileService (OpenAI's /v1/files).

Uploads arrive as a client stream of `google.api.HttpBody` pieces (≤1 MiB each, Envoy splits
them) holding a raw multipart/form-data body. The file part is parsed, checked line by line and
stored chunk by chunk as it streams; nothing holds the whole file. A file is published only once
the whole form was read and found valid; a rejected or interrupted upload leaves nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from google.api import httpbody_pb2

from service.domain.errors import Internal, InvalidRequest, NotFound, PayloadTooLarge, clip
from service.domain.model import DEFAULT_LIMITS, FileStatus, Limits, now
from service.edge import lookups
from service.edge.auth import Authenticator
from service.edge.grpc_errors import translate_errors
from service.edge.multipart import MultipartError, Part, parse_multipart
from service.intake.jsonl import NumberedProblem, check_upload, numbered_lines
from service.intake.line_index import LineIndexWriter
from service.intake.validation import LineValidator, check_expires_after, is_text
from service.storage.blobs import BlobWriter, BlobWriterClosed
from service.storage.repository import Store, UploadGone, new_id
from service.storage.tables import FileRow
from sluice.v1 import file_pb2, file_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs

BATCH_FILE_TTL = 30 * 24 * 3600  # OpenAI: batch files expire after 30 days by default
ACCEPTED_PURPOSES = ("batch",)
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 10_000, 10_000
CONTENT_TYPE = "application/jsonl"
log = logging.getLogger(__name__)
TOUCH_SECONDS = 0.25  # an upload marks itself alive at most this often (the sweeper's stale bound is ≥ 1 s)


def file_message(row: FileRow) -> file_pb2.File:
    msg = file_pb2.File(id=row.id, object="file", bytes=min(row.bytes, 2**32 - 1), created_at=row.created_at,
                        filename=row.filename, purpose=row.purpose, status=row.status)
    if row.expires_at is not None:
        msg.expires_at = row.expires_at
    return msg


async def _bodies(first: file_pb2.UploadFileRequest,
                  rest: AsyncIterator[file_pb2.UploadFileRequest]) -> AsyncIterator[bytes]:
    yield first.body.data
    async for message in rest:
        yield message.body.data


def _filename(raw: str | None) -> str:
    """The stored name: text without control characters, at most 512 characters (the column)."""
    name = "".join(ch for ch in (raw or "") if ch >= " " and ch != "\x7f")
    name = name.encode("utf-8", "replace").decode("utf-8")
    return name[:512] or "upload.jsonl"


async def _text_field(part: Part, limit: int) -> str:
    try:
        raw = await part.read(limit=limit)
    except MultipartError:
        raise InvalidRequest(f"The form field {clip(part.name)} is longer than {limit} bytes.", param=part.name[:64],
                             code="field_too_long") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidRequest(f"The form field {clip(part.name)} is not valid UTF-8 text.", param=part.name,
                             code="invalid_encoding") from None
    if not is_text(text):
        raise InvalidRequest(f"The form field {clip(part.name)} contains a NUL character.", param=part.name,
                             code="invalid_encoding")
    return text


def _upload_expired() -> InvalidRequest:
    return InvalidRequest("The upload stalled for too long and was discarded; send the file again.",
                          param="file", code="upload_expired")


def _storage_failed(exc: BlobWriterClosed) -> Internal:
    log.error("upload: the blob store failed: %r", exc.__cause__)
    return Internal("The file could not be stored; try again.", param="file", code="storage_error")


class _Upload:
    """One upload in progress: streams the file part to the blob store (row `uploading`) while
    counting bytes and checking lines. Nothing is visible until `finish_upload`, after the whole
    form was read and the blob store has all of the content."""

    def __init__(self, store: Store, row: FileRow, max_bytes: int) -> None:
        self.store = store
        self.row = row
        self.max_bytes = max_bytes
        self.size = 0
        self.touched = 0.0
        self.writer = BlobWriter(store.blobs, row.id)

    async def chunks(self, part: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Store each chunk as it passes through to the line checker."""
        async for chunk in part:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"File is larger than the {self.max_bytes // 2**20} MB limit.",
                                      param="file", code="file_too_large")
            if time.monotonic() - self.touched >= TOUCH_SECONDS:  # alive: not an orphan for the sweeper
                try:
                    await self.store.touch_upload(self.row.id, self.size)
                except UploadGone:
                    raise _upload_expired() from None
                self.touched = time.monotonic()
            try:
                await self.writer.write(chunk)
            except BlobWriterClosed as exc:
                raise _storage_failed(exc) from exc
            yield chunk

    async def finish(self) -> int:
        """Wait until the blob store has all of it (S3: the multipart upload completes)."""
        try:
            return await self.writer.close()
        except BlobWriterClosed as exc:
            raise _storage_failed(exc) from exc

    async def abort(self) -> None:
        await self.writer.abort()


@dataclass
class _Form:
    """What the form said so far; fields may come in any order (OpenAI accepts either)."""

    purpose: str = ""
    purpose_seen: bool = False
    expires_anchor: str | None = None
    expires_seconds: str | None = None
    row: FileRow | None = None
    upload: _Upload | None = None
    count: int = 0
    problems: list[NumberedProblem] = field(default_factory=list)


@translate_errors
class FileServicer(file_pb2_grpc.FileServiceServicer):
    def __init__(self, store: Store, auth: Authenticator, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.auth = auth
        self.limits = limits

    async def UploadFile(self, request_iterator: AsyncIterator[file_pb2.UploadFileRequest],
                         context: Context) -> file_pb2.File:
        """Parse the whole form, storing the file part as it streams (as `uploading`, invisible),
        then decide: a file is published only when every part, the closing boundary included,
        was read and valid. Anything else (bad form, bad lines, a client gone, a shutdown)
        removes what was stored; the sweeper removes what a crash left behind."""
        project = await self.auth.project(context.invocation_metadata())
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidRequest("The upload is empty.", param="file", code="missing_file")
        form = _Form(purpose=first.purpose)
        published = False
        try:
            try:
                async for part in parse_multipart(_bodies(first, request_iterator), first.body.content_type):
                    await self._part(project, form, part)
            except MultipartError as exc:
                raise InvalidRequest(f"The upload is not valid multipart/form-data: {exc}.", param="file",
                                     code="invalid_multipart") from None
            if form.row is None or form.upload is None:
                raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                     code="missing_required_parameter")
            self._check_purpose(form.purpose)
            expires_at = self._expires_at(form, form.row.created_at)
            if form.count == 0:
                raise InvalidRequest("The file has no request lines.", param="file", code="empty_file")
            if form.problems:
                shown = "; ".join(str(p) for p in form.problems[:5])
                more = len(form.problems) - 5
                raise InvalidRequest(
                    f"The file has invalid lines: {shown}{f'; and {more} more' if more > 0 else ''}.",
                    param="file", code=form.problems[0].problem.code)
            try:
                size = await form.upload.finish()
                stored = await self.store.finish_upload(form.row.id, size=size, line_count=form.count,
                                                        purpose=form.purpose, expires_at=expires_at)
            except UploadGone:
                raise _upload_expired() from None
            published = True
            return file_message(stored)
        finally:
            if form.row is not None and not published:
                # Shielded: a cancelled upload (client gone, shutdown) still removes its content.
                await asyncio.shield(self._discard(form))

    async def _discard(self, form: _Form) -> None:
        if form.upload is not None:
            await form.upload.abort()
        if form.row is not None:
            await self.store.discard_file(form.row.id)

    async def _part(self, project: str, form: _Form, part: Part) -> None:
        if part.name == "purpose":
            if form.purpose_seen:
                raise InvalidRequest("The form has more than one 'purpose' field.", param="purpose",
                                     code="duplicate_parameter")
            form.purpose_seen = True
            form.purpose = await _text_field(part, 64)
            if form.row is None:
                self._check_purpose(form.purpose)  # refuse before any file byte is stored
        elif part.name == "file":
            if form.row is not None:
                raise InvalidRequest("The form has more than one 'file' part; upload one file at a time.",
                                     param="file", code="multiple_files")
            if form.purpose or form.purpose_seen:
                self._check_purpose(form.purpose)
            t = now()
            # Known before it is stored: a cancel landing while `begin_file` commits still discards it.
            form.row = FileRow(id=new_id("file-"), project=project, filename=_filename(part.filename),
                               purpose=form.purpose, bytes=0, line_count=0, status=FileStatus.UPLOADING, created_at=t,
                               expires_at=t + BATCH_FILE_TTL, updated_at=t)
            await self.store.begin_file(form.row)
            form.upload = _Upload(self.store, form.row, self.limits.max_file_bytes)
            form.count, form.problems = await check_upload(numbered_lines(form.upload.chunks(aiter(part))),
                                                           LineValidator(endpoint=None), self.limits.max_requests,
                                                           LineIndexWriter(self.store, form.row.id))
        elif part.name == "expires_after[anchor]":
            form.expires_anchor = await _text_field(part, 32)
        elif part.name == "expires_after[seconds]":
            form.expires_seconds = await _text_field(part, 32)
        else:
            raise InvalidRequest(f"Unknown parameter: {clip(part.name)}. The form takes 'file', 'purpose' and "
                                 "'expires_after'.", param=part.name[:64], code="unknown_parameter")

    @staticmethod
    def _expires_at(form: _Form, created_at: int) -> int:
        if form.expires_anchor is None and form.expires_seconds is None:
            return created_at + BATCH_FILE_TTL
        return created_at + check_expires_after(form.expires_anchor, form.expires_seconds, "expires_after")

    @staticmethod
    def _check_purpose(purpose: str) -> None:
        if not purpose:
            raise InvalidRequest("Missing required parameter: 'purpose'.",
                                 param="purpose", code="missing_required_parameter")
        if purpose not in ACCEPTED_PURPOSES:
            raise InvalidRequest(f"Sluice stores files for batches only: purpose must be 'batch', got {clip(purpose)}.",
                                 param="purpose", code="invalid_purpose")

    async def ListFiles(self, request: file_pb2.ListFilesRequest, context: Context) -> file_pb2.ListFilesResponse:
        project = await self.auth.project(context.invocation_metadata())
        limit = request.limit if request.HasField("limit") else DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}.", param="limit",
                                 code="invalid_limit")
        if request.order not in ("", "asc", "desc"):
            raise InvalidRequest(f"order must be 'asc' or 'desc', got {clip(request.order)}.", param="order",
                                 code="invalid_order")
        if len(request.purpose) > 64 or not is_text(request.purpose):
            raise InvalidRequest(f"Unknown purpose {clip(request.purpose)}.", param="purpose", code="invalid_purpose")
        after = lookups.cursor(request.after, "file")
        try:
            rows, has_more = await self.store.list_files(project, request.purpose, limit, after,
                                                         ascending=request.order == "asc")
        except NotFound:
            raise NotFound(f"No file found with id {clip(after)} to list after.", param="after",
                           code="cursor_not_found") from None
        return file_pb2.ListFilesResponse(object="list", data=[file_message(r) for r in rows], has_more=has_more,
                                          first_id=rows[0].id if rows else "", last_id=rows[-1].id if rows else "")

    async def GetFile(self, request: file_pb2.GetFileRequest, context: Context) -> file_pb2.File:
        project = await self.auth.project(context.invocation_metadata())
        return file_message(await self.store.get_file(project, lookups.file_id(request.id)))

    async def DeleteFile(self, request: file_pb2.DeleteFileRequest,
                         context: Context) -> file_pb2.DeleteFileResponse:
        project = await self.auth.project(context.invocation_metadata())
        await self.store.mark_file_deleted(project, lookups.file_id(request.id))
        return file_pb2.DeleteFileResponse(id=request.id, object="file", deleted=True)

    async def GetFileContent(self, request: file_pb2.GetFileContentRequest,
                             context: Context) -> AsyncIterator[httpbody_pb2.HttpBody]:
        """Stream the content a chunk at a time. A file deleted meanwhile keeps its content for a
        grace period (`mark_file_deleted`), so a download in flight completes; if its content is
        gone anyway (swept), the stream ends with an error instead of looking complete."""
        project = await self.auth.project(context.invocation_metadata())
        row = await self.store.get_file(project, lookups.file_id(request.id))  # 404 before the first message
        first, sent = True, 0
        async for chunk in self.store.blobs.get(row.id):
            yield httpbody_pb2.HttpBody(content_type=CONTENT_TYPE if first else "", data=chunk)
            first, sent = False, sent + len(chunk)
        if first:  # an empty file still answers with its content type
            yield httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=b"")
        if sent != row.bytes:
            raise Internal(f"The content of file {row.id} is no longer available (it was deleted); "
                           "the download is incomplete.", param="id", code="file_content_lost")

"""FileService (OpenAI's /v1/files).

Uploads arrive as a client stream of `google.api.HttpBody` pieces (≤1 MiB each, Envoy splits
them) holding a raw multipart/form-data body. The file part is parsed, checked line by line and
stored chunk by chunk as it streams; nothing holds the whole file. A rejected upload is
discarded, so nothing half-written stays visible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from google.api import httpbody_pb2

from service.domain.errors import InvalidRequest, PayloadTooLarge
from service.domain.model import DEFAULT_LIMITS, FileStatus, Limits, now
from service.edge.auth import Authenticator
from service.edge.grpc_errors import translate_errors
from service.edge.multipart import MultipartError, parse_multipart
from service.intake.jsonl import check_lines, split_lines
from service.intake.validation import LineValidator
from service.storage.repository import Store, new_id
from service.storage.tables import FileRow
from sluice.v1 import file_pb2, file_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs

BATCH_FILE_TTL = 30 * 24 * 3600  # OpenAI: batch files expire after 30 days by default
ACCEPTED_PURPOSES = ("batch",)
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 10_000, 10_000
CONTENT_TYPE = "application/jsonl"


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


class _Upload:
    """One upload in progress: stores the file part while counting bytes and checking lines."""

    def __init__(self, store: Store, row: FileRow, max_bytes: int) -> None:
        self.store = store
        self.row = row
        self.max_bytes = max_bytes
        self.size = 0
        self.seq = 0

    async def chunks(self, part: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Store each chunk as it passes through to the line checker."""
        async for chunk in part:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"File is larger than the {self.max_bytes // 2**20} MB limit.",
                                      param="file", code="file_too_large")
            await self.store.add_file_chunk(self.row.id, self.seq, chunk)
            self.seq += 1
            yield chunk


@translate_errors
class FileServicer(file_pb2_grpc.FileServiceServicer):
    def __init__(self, store: Store, auth: Authenticator, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.auth = auth
        self.limits = limits

    async def UploadFile(self, request_iterator: AsyncIterator[file_pb2.UploadFileRequest],
                         context: Context) -> file_pb2.File:
        project = await self.auth.project(context.invocation_metadata())
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidRequest("The upload is empty.", param="file", code="missing_file")
        purpose = first.purpose
        row: FileRow | None = None
        try:
            parts = parse_multipart(_bodies(first, request_iterator), first.body.content_type)
            async for part in parts:
                if part.name == "purpose":
                    purpose = (await part.read(limit=64)).decode(errors="replace").strip()
                elif part.name == "file" and row is None:
                    self._check_purpose(purpose)
                    row = await self.store.begin_file(FileRow(
                        id=new_id("file-"), project=project, filename=(part.filename or "upload.jsonl")[:512],
                        purpose=purpose, bytes=0, line_count=0, status=FileStatus.UPLOADING, created_at=now(),
                        expires_at=now() + BATCH_FILE_TTL))
                    upload = _Upload(self.store, row, self.limits.max_file_bytes)
                    count, problems = await check_lines(split_lines(upload.chunks(aiter(part))),
                                                        LineValidator(endpoint=None), self.limits.max_requests)
                    if count == 0:
                        raise InvalidRequest("The file has no request lines.", param="file", code="empty_file")
                    if problems:
                        listed = "; ".join(str(p) for p in problems)
                        raise InvalidRequest(f"The file has invalid lines: {listed}.", param="file",
                                             code=problems[0].problem.code)
                    stored = await self.store.finish_file(row.id, upload.size, count)
            if row is None:
                raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                     code="missing_required_parameter")
            return file_message(stored)
        except MultipartError as exc:
            raise InvalidRequest(f"The upload is not valid multipart/form-data: {exc}.", param="file",
                                 code="invalid_multipart") from None
        except BaseException:
            if row is not None:
                await self.store.discard_file(row.id)
            raise

    @staticmethod
    def _check_purpose(purpose: str) -> None:
        if not purpose:
            raise InvalidRequest("Missing required parameter: 'purpose' (send it before 'file').",
                                 param="purpose", code="missing_required_parameter")
        if purpose not in ACCEPTED_PURPOSES:
            raise InvalidRequest(f"Sluice stores files for batches only: purpose must be 'batch', got {purpose!r}.",
                                 param="purpose", code="invalid_purpose")

    async def ListFiles(self, request: file_pb2.ListFilesRequest, context: Context) -> file_pb2.ListFilesResponse:
        project = await self.auth.project(context.invocation_metadata())
        limit = request.limit if request.HasField("limit") else DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}.", param="limit",
                                 code="invalid_limit")
        if request.order not in ("", "asc", "desc"):
            raise InvalidRequest(f"order must be 'asc' or 'desc', got {request.order!r}.", param="order",
                                 code="invalid_order")
        rows, has_more = await self.store.list_files(project, request.purpose, limit, request.after,
                                                     ascending=request.order == "asc")
        return file_pb2.ListFilesResponse(object="list", data=[file_message(r) for r in rows], has_more=has_more,
                                          first_id=rows[0].id if rows else "", last_id=rows[-1].id if rows else "")

    async def GetFile(self, request: file_pb2.GetFileRequest, context: Context) -> file_pb2.File:
        project = await self.auth.project(context.invocation_metadata())
        return file_message(await self.store.get_file(project, request.id))

    async def DeleteFile(self, request: file_pb2.DeleteFileRequest,
                         context: Context) -> file_pb2.DeleteFileResponse:
        project = await self.auth.project(context.invocation_metadata())
        await self.store.delete_file(project, request.id)
        return file_pb2.DeleteFileResponse(id=request.id, object="file", deleted=True)

    async def GetFileContent(self, request: file_pb2.GetFileContentRequest,
                             context: Context) -> AsyncIterator[httpbody_pb2.HttpBody]:
        project = await self.auth.project(context.invocation_metadata())
        await self.store.get_file(project, request.id)  # 404 before the first message
        first = True
        async for chunk in self.store.iter_file_chunks(request.id):
            yield httpbody_pb2.HttpBody(content_type=CONTENT_TYPE if first else "", data=chunk)
            first = False
        if first:  # an empty file still answers with its content type
            yield httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=b"")

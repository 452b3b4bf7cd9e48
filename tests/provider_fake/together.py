"""Together batches: `/together/v1/files` (upload only as the spec documents it: multipart
`POST /files/upload`, purpose batch-api) + `/together/v1/batches` (wrapped, UPPERCASE)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from .base import Provider
from .core import (
    JSON,
    Batch,
    FileRec,
    HttpError,
    Item,
    Lifecycle,
    Request,
    Response,
    Route,
    Target,
    advance,
    json_response,
    now,
    parse_form,
    parse_jsonl,
    raw_response,
    request_cancel,
    rfc3339,
    route,
    short_hash,
    to_jsonl,
)
from .openai_like import endpoint_kind, make_item, openai_error_body, result_lines, without_nulls

LIFE = Lifecycle(["VALIDATING", "IN_PROGRESS", "COMPLETED"], None, "CANCELLED", "EXPIRED", "FAILED",
                 started_index=1)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/audio/transcriptions", "/v1/audio/translations")
V = "/together/v1"


def _uuid(*parts: str) -> str:
    return str(uuid.UUID(hex=short_hash(*parts, n=32)))


class Together(Provider):
    name = "together"

    def build_routes(self) -> list[Route]:
        return [
            route("POST", V + "/files/upload", self.upload),
            route("GET", V + "/files", self.list_files),
            route("GET", V + r"/files/([^/]+)", self.get_file),
            route("DELETE", V + r"/files/([^/]+)", self.delete_file),
            route("GET", V + r"/files/([^/]+)/content", self.file_content),
            route("POST", V + "/batches", self.create),
            route("GET", V + "/batches", self.list_batches),
            route("GET", V + r"/batches/([^/]+)", self.get_batch),
            route("POST", V + r"/batches/([^/]+)/cancel", self.cancel),
        ]

    def target(self, req: Request) -> Target:
        return self.files_and_batches_target(req, V)

    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        """The spec's `ErrorData` (files): `{"error": {message, type, param, code}}`."""
        return json_response(status, openai_error_body(message, kind or "invalid_request_error", extra.get("code")))

    def error_for(self, req: Request, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        if req.path.startswith(V + "/batches"):  # the spec's `BatchErrorResponse`: {"error": "<message>"}
            return json_response(status, {"error": message})
        return self.error(status, message, kind, **extra)

    def check_auth(self, req: Request) -> Response | None:
        if req.bearer() != self.key:
            return self.error_for(req, 401, "Invalid API key provided.", "invalid_request_error",
                                  code="invalid_api_key")
        return None

    # --- files
    def file_obj(self, f: FileRec) -> JSON:
        """The spec's `FileResponse` (note the capitalised `FileType` and `Processed`)."""
        return {"id": f.id, "object": "file", "created_at": f.created_at, "type": "jsonl", "purpose": f.purpose,
                "filename": f.filename, "bytes": len(f.data), "line_count": len(parse_jsonl(f.data)),
                "Processed": True, "FileType": f.extra.get("file_type", "jsonl")}

    def _file(self, file_id: str) -> FileRec:
        f = self.store.get_file(self.name, file_id)
        if f is None:
            raise HttpError(404, f"File {file_id} not found", code="file_not_found")
        return f

    def upload(self, req: Request, m: re.Match[str]) -> Response:
        """`POST /files/upload`, the only upload the spec documents: multipart `purpose`, `file_name`,
        `file` (and optional `file_type`)."""
        form = parse_form(req)
        for key in ("purpose", "file_name", "file"):
            if key not in form:
                raise HttpError(400, f"{key} is required")
        purpose = form["purpose"][1].decode()
        if purpose not in ("batch-api", "fine-tune", "eval"):
            raise HttpError(400, f"Invalid purpose {purpose!r}; batch input files use 'batch-api'")
        data = form["file"][1]
        self.check_lines(req, purpose, data)
        file_type = form.get("file_type", (None, b"jsonl"))[1].decode()
        rec = FileRec("file-" + _uuid("file", str(self.store.next_seq())), form["file_name"][1].decode(), purpose,
                      data, now(), {"file_type": file_type})
        self.store.add_file(self.name, rec)
        return json_response(200, self.file_obj(rec))

    def list_files(self, req: Request, m: re.Match[str]) -> Response:
        return json_response(200, {"object": "list",
                                   "data": [self.file_obj(f) for f in self.store.files[self.name].values()]})

    def get_file(self, req: Request, m: re.Match[str]) -> Response:
        return json_response(200, self.file_obj(self._file(m.group(1))))

    def delete_file(self, req: Request, m: re.Match[str]) -> Response:
        f = self._file(m.group(1))
        del self.store.files[self.name][f.id]
        return json_response(200, {"id": f.id, "object": "file", "deleted": True})

    def file_content(self, req: Request, m: re.Match[str]) -> Response:
        return raw_response(200, self._file(m.group(1)).data, "text/plain")

    # --- batches
    def create(self, req: Request, m: re.Match[str]) -> Response:
        body = req.json()
        if not isinstance(body, dict) or not body.get("input_file_id"):
            raise HttpError(400, "input_file_id is required")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise HttpError(400, f"Invalid endpoint {endpoint!r}; supported: {list(ENDPOINTS)}")
        f = self.store.get_file(self.name, body["input_file_id"])
        if f is None:
            raise HttpError(404, f"File {body['input_file_id']} not found", code="file_not_found")
        if f.purpose != "batch-api":
            raise HttpError(400, f"File {f.id} has purpose {f.purpose!r}; batches need 'batch-api'")
        items: list[Item] = []
        errors: list[JSON] = []
        for n, obj, _ in parse_jsonl(f.data):
            cid = obj.get("custom_id") if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
                errors.append({"message": f"line {n}: invalid request object"})
            elif not isinstance(cid, str) or not 1 <= len(cid) <= 64:
                errors.append({"message": f"line {n}: custom_id must be a string of 1-64 characters"})
            else:
                items.append(make_item(cid, obj["body"], endpoint_kind(endpoint)))
        if not items and not errors:
            errors.append({"message": "input file is empty"})
        b = Batch(self.name, _uuid("batch", str(self.store.next_seq())), items, LIFE, self.store.default_polls,
                  validation_errors=errors,
                  data={"endpoint": endpoint, "input_file_id": f.id, "size": len(f.data),
                        "model_id": body.get("model_id")})
        self.store.add_batch(b)
        return json_response(201, {"job": self.job_obj(b)})  # `warning` only when there is one

    def _batch(self, batch_id: str) -> Batch:
        b = self.store.get_batch(self.name, batch_id)
        if b is None:
            raise HttpError(404, f"Batch {batch_id} not found", code="not_found")
        return b

    def get_batch(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        advance(b)
        return json_response(200, self.job_obj(b))

    def list_batches(self, req: Request, m: re.Match[str]) -> Response:
        jobs = reversed(list(self.store.batches[self.name].values()))
        return json_response(200, [self.job_obj(b) for b in jobs])  # bare array, no pagination

    def cancel(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        request_cancel(b)
        return json_response(200, self.job_obj(b))

    # --- rendering
    def finalize(self, b: Batch) -> None:
        if b.kind == "failed":
            return
        out, err = result_lines(b, self.name, lambda it: it.body.get("model", ""), detailed=False)
        for key, rows, suffix in (("output_file_id", out, "output"), ("error_file_id", err, "error")):
            if rows:
                rec = FileRec("file-" + _uuid(b.id, suffix), f"{b.id}_{suffix}.jsonl", "batch-generated",
                              to_jsonl(rows), now())
                self.store.add_file(self.name, rec, upload=False)
                b.data[key] = rec.id

    def job_obj(self, b: Batch) -> JSON:
        self.ensure_final(b)
        progress = 100.0 if b.kind == "completed" else (50.0 if b.started and not b.terminal else 0.0)
        error = None
        if b.kind == "failed":
            error = "; ".join(e["message"] for e in b.validation_errors) or b.fail_reason or "batch failed"
        obj = {
            "id": b.id, "user_id": "fake-user", "input_file_id": b.data["input_file_id"],
            "file_size_bytes": b.data["size"], "status": b.state,
            "job_deadline": rfc3339(b.created_at + 86400), "created_at": rfc3339(b.created_at),
            "completed_at": rfc3339(max(b.times.values())) if b.terminal else None,
            "endpoint": b.data["endpoint"], "progress": progress, "model_id": b.data["model_id"],
            "output_file_id": b.data.get("output_file_id"), "error_file_id": b.data.get("error_file_id"),
            "error": error,
        }
        # The spec types these fields without null: absent until they have a value.
        return self.store.overridden(b, without_nulls(obj), "status", None)

"""Mistral batch jobs: `/mistral/v1/files` + `/mistral/v1/batch/jobs` (files or inline requests)."""

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
    route,
    short_hash,
    to_jsonl,
)
from .openai_like import endpoint_kind, make_item, result_lines

LIFE = Lifecycle(["QUEUED", "RUNNING", "SUCCESS"], "CANCELLATION_REQUESTED", "CANCELLED", "TIMEOUT_EXCEEDED",
                 "FAILED", started_index=1)
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/fim/completions", "/v1/moderations",
             "/v1/chat/moderations", "/v1/ocr", "/v1/classifications", "/v1/chat/classifications",
             "/v1/conversations", "/v1/audio/transcriptions")
V = "/mistral/v1"


def _uuid(*parts: str) -> str:
    return str(uuid.UUID(hex=short_hash(*parts, n=32)))


class Mistral(Provider):
    name = "mistral"

    def build_routes(self) -> list[Route]:
        return [
            route("POST", V + "/files", self.upload),
            route("GET", V + "/files", self.list_files),
            route("GET", V + r"/files/([^/]+)", self.get_file),
            route("DELETE", V + r"/files/([^/]+)", self.delete_file),
            route("GET", V + r"/files/([^/]+)/content", self.file_content),
            route("POST", V + "/batch/jobs", self.create),
            route("GET", V + "/batch/jobs", self.list_jobs),
            route("GET", V + r"/batch/jobs/([^/]+)", self.get_job),
            route("DELETE", V + r"/batch/jobs/([^/]+)", self.delete_job),
            route("POST", V + r"/batch/jobs/([^/]+)/cancel", self.cancel),
        ]

    def target(self, req: Request) -> Target:
        return self.files_and_batches_target(req, V, "/batch/jobs", ("output_file", "error_file"))

    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        if status == 422:
            return json_response(422, {"detail": [{"loc": extra.get("loc", ["body"]), "msg": message,
                                                   "type": kind or "value_error"}]})
        return json_response(status, {"object": "error", "message": message, "type": kind or "invalid_request_error",
                                      "param": None, "code": extra.get("code")})

    def check_auth(self, req: Request) -> Response | None:
        if req.bearer() != self.key:
            return self.error(401, "Unauthorized", "unauthorized")
        return None

    # --- files
    def file_obj(self, f: FileRec, deleted: bool | None = None) -> JSON:
        obj = {"id": f.id, "object": "file", "bytes": len(f.data), "created_at": f.created_at,
               "filename": f.filename, "purpose": f.purpose,
               "sample_type": f.extra.get("sample_type", "batch_request"),
               "num_lines": len(parse_jsonl(f.data)), "source": f.extra.get("source", "upload"),
               "mimetype": "application/jsonl", "signature": None}
        if deleted is not None:  # GetFileResponse requires it
            obj["deleted"] = deleted
        return obj

    def _file(self, file_id: str) -> FileRec:
        f = self.store.get_file(self.name, file_id)
        if f is None:
            raise HttpError(404, f"File {file_id} not found", "not_found")
        return f

    def upload(self, req: Request, m: re.Match[str]) -> Response:
        form = parse_form(req)
        if "file" not in form:
            raise HttpError(422, "Field required", "missing", loc=["body", "file"])
        purpose = form.get("purpose", (None, b"fine-tune"))[1].decode()
        if purpose not in ("fine-tune", "batch", "ocr"):
            raise HttpError(422, "Input should be 'fine-tune', 'batch' or 'ocr'", "enum", loc=["body", "purpose"])
        filename, data = form["file"]
        self.check_lines(req, purpose, data)
        rec = FileRec(_uuid("file", str(self.store.next_seq())), filename or "upload.jsonl", purpose, data, now())
        self.store.add_file(self.name, rec)
        return json_response(200, self.file_obj(rec))

    def list_files(self, req: Request, m: re.Match[str]) -> Response:
        data = [self.file_obj(f) for f in self.store.files[self.name].values()]
        return json_response(200, {"data": data, "object": "list", "total": len(data)})

    def get_file(self, req: Request, m: re.Match[str]) -> Response:
        return json_response(200, self.file_obj(self._file(m.group(1)), deleted=False))

    def delete_file(self, req: Request, m: re.Match[str]) -> Response:
        f = self._file(m.group(1))
        del self.store.files[self.name][f.id]
        return json_response(200, {"id": f.id, "object": "file", "deleted": True})

    def file_content(self, req: Request, m: re.Match[str]) -> Response:
        return raw_response(200, self._file(m.group(1)).data)

    # --- jobs
    def create(self, req: Request, m: re.Match[str]) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HttpError(422, "Input should be a valid dictionary", "dict_type", loc=["body"])
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise HttpError(422, f"Input should be one of {list(ENDPOINTS)}", "enum", loc=["body", "endpoint"])
        if not body.get("model") and not body.get("agent_id"):
            raise HttpError(422, "model or agent_id is required", "missing", loc=["body", "model"])
        files, inline = body.get("input_files"), body.get("requests")
        if bool(files) == bool(inline):
            raise HttpError(422, "exactly one of input_files or requests must be given", "value_error",
                            loc=["body", "input_files"])
        if not isinstance(files or inline, list):
            raise HttpError(422, "Input should be a valid list", "list_type",
                            loc=["body", "input_files" if files else "requests"])
        rows: list[tuple[int, Any]] = []
        if files:
            for fid in files:
                f = self.store.get_file(self.name, fid)
                if f is None:
                    raise HttpError(404, f"File {fid} not found", "not_found")
                if f.purpose != "batch":
                    raise HttpError(422, f"File {fid} must have purpose 'batch'", "value_error",
                                    loc=["body", "input_files"])
                rows += [(n, obj) for n, obj, _ in parse_jsonl(f.data)]
        else:
            rows = list(enumerate(inline or [], start=1))
        items: list[Item] = []
        errors: list[JSON] = []
        for n, obj in rows:
            if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
                errors.append({"message": f"line {n}: expected an object with a 'body'", "count": 1})
                continue
            items.append(make_item(obj.get("custom_id"), obj["body"], endpoint_kind(endpoint)))
        if not rows:
            errors.append({"message": "no requests in input", "count": 1})
        b = Batch(self.name, _uuid("job", str(self.store.next_seq())), items, LIFE, self.store.default_polls,
                  validation_errors=errors,
                  data={"endpoint": endpoint, "model": body.get("model"), "agent_id": body.get("agent_id"),
                        "input_files": list(files or []), "metadata": body.get("metadata") or {},
                        "inline": bool(inline), "timeout_hours": body.get("timeout_hours", 24)})
        self.store.add_batch(b)
        return json_response(200, self.job_obj(b, False))

    def _job(self, job_id: str) -> Batch:
        b = self.store.get_batch(self.name, job_id)
        if b is None:
            raise HttpError(404, f"Batch job {job_id} not found", "not_found")
        return b

    def get_job(self, req: Request, m: re.Match[str]) -> Response:
        b = self._job(m.group(1))
        advance(b)
        return json_response(200, self.job_obj(b, req.arg("inline") == "true"))

    def list_jobs(self, req: Request, m: re.Match[str]) -> Response:
        jobs = list(reversed(list(self.store.batches[self.name].values())))
        statuses = req.query.get("status")
        if statuses:
            jobs = [j for j in jobs if j.state in statuses]
        page, size = int(req.arg("page") or 0), int(req.arg("page_size") or 100)
        data = [self.job_obj(j, False) for j in jobs[page * size:(page + 1) * size]]
        return json_response(200, {"data": data, "object": "list", "total": len(jobs)})

    def cancel(self, req: Request, m: re.Match[str]) -> Response:
        b = self._job(m.group(1))
        request_cancel(b)
        return json_response(200, self.job_obj(b, False))

    def delete_job(self, req: Request, m: re.Match[str]) -> Response:
        b = self._job(m.group(1))
        del self.store.batches[self.name][b.id]
        return json_response(200, {"id": b.id, "object": "batch", "deleted": True})

    # --- rendering
    def finalize(self, b: Batch) -> None:
        if b.kind == "failed":
            return
        model = b.data["model"] or "agent"
        out, err = result_lines(b, self.name, lambda it: it.body.get("model") or model, detailed=False,
                                request_id=False)
        b.data["outputs"] = out + err
        for key, rows in (("output_file", out), ("error_file", err)):
            if rows:
                rec = FileRec(_uuid(b.id, key), f"{b.id}_{key}.jsonl", "batch", to_jsonl(rows), now(),
                              {"source": "mistral", "sample_type": "batch_result" if key == "output_file"
                               else "batch_error"})
                self.store.add_file(self.name, rec, upload=False)
                b.data[key] = rec.id

    def job_obj(self, b: Batch, inline: bool) -> JSON:
        self.ensure_final(b)
        c = b.counts()
        errors = b.validation_errors if b.kind == "failed" else []
        if b.kind == "failed" and not errors:
            errors = [{"message": b.fail_reason or "batch failed", "count": len(b.items)}]
        obj: JSON = {
            "id": b.id, "object": "batch", "input_files": b.data["input_files"], "metadata": b.data["metadata"],
            "endpoint": b.data["endpoint"], "model": b.data["model"], "agent_id": b.data["agent_id"],
            "output_file": b.data.get("output_file"), "error_file": b.data.get("error_file"),
            "errors": errors, "status": b.state, "created_at": b.created_at,
            "total_requests": len(b.items), "completed_requests": c["succeeded"] + c["errored"],
            "succeeded_requests": c["succeeded"], "failed_requests": c["errored"],
            "started_at": b.times.get("RUNNING"), "completed_at": max(b.times.values()) if b.terminal else None,
        }
        if (inline or b.data["inline"]) and "outputs" in b.data:
            obj["outputs"] = b.data["outputs"]
        return self.store.overridden(b, obj, "status", None)

"""Gemini Developer API batch mode: `:batchGenerateContent`, Operations, resumable upload, file download."""

from __future__ import annotations

import hashlib
import json
import re
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
    fail_message,
    json_response,
    now,
    parse_jsonl,
    prompt_of_gemini,
    raw_response,
    reply_text,
    request_cancel,
    rfc3339,
    route,
    short_hash,
    to_jsonl,
    usage_for,
)

LIFE = Lifecycle(["BATCH_STATE_PENDING", "BATCH_STATE_RUNNING", "BATCH_STATE_SUCCEEDED"], None,
                 "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED", "BATCH_STATE_FAILED", started_index=1)
TYPE_BATCH = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
TYPE_OUTPUT = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
                 499: "CANCELLED", 500: "INTERNAL", 501: "NOT_IMPLEMENTED", 503: "UNAVAILABLE",
                 504: "DEADLINE_EXCEEDED"}
RPC_INVALID_ARGUMENT = 3
V = "/gemini/v1beta"


def _g(d: JSON, snake: str, camel: str) -> Any:
    """REST accepts snake_case and camelCase field names."""
    return d.get(snake, d.get(camel))


class Gemini(Provider):
    name = "gemini"

    def build_routes(self) -> list[Route]:
        return [
            route("POST", "/gemini/upload/v1beta/files", self.upload),
            route("POST", V + r"/models/([^/:]+):batchGenerateContent", self.create),
            route("GET", V + "/batches", self.list_batches),
            route("GET", V + r"/batches/([^/:]+)", self.get_batch),
            route("DELETE", V + r"/batches/([^/:]+)", self.delete_batch),
            route("POST", V + r"/batches/([^/:]+):cancel", self.cancel),
            route("GET", V + r"/files/([^/:]+)", self.file_meta),
            route("GET", r"/gemini/download/v1beta/files/([^/:]+):download", self.download),
            route("GET", V + r"/files/([^/:]+):download", self.download),
        ]

    def target(self, req: Request) -> Target:
        if req.method == "POST" and req.path.endswith(":batchGenerateContent"):
            return Target(None, "create")
        m = re.match("^" + re.escape(V) + r"/batches/([^/:]+)(:cancel)?$", req.path)
        if m:
            return Target(m.group(1), "cancel" if m.group(2) else "status")
        m = re.match(r"^/gemini(?:/download)?/v1beta/files/batch-([^/:]+):download$", req.path)
        if m:
            return Target(m.group(1), "results")
        return Target()

    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        st = kind if kind in GOOGLE_STATUS.values() else GOOGLE_STATUS.get(status, "UNKNOWN")
        err: JSON = {"code": status, "message": message, "status": st}
        if extra.get("details"):
            err["details"] = extra["details"]
        return json_response(status, {"error": err})

    def check_auth(self, req: Request) -> Response | None:
        if req.path == "/gemini/upload/v1beta/files" and req.arg("upload_id") in self.store.uploads:
            return None  # the session URL itself authorises the upload step
        key = req.header("x-goog-api-key") or req.arg("key")
        if key is None:
            return self.error(403, "Method doesn't allow unregistered callers (callers without established "
                                   "identity). Please use API Key or other form of API consumer identity.")
        if key != self.key:
            return self.error(400, "API key not valid. Please pass a valid API key.", details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com"}])
        return None

    # --- files
    def file_obj(self, f: FileRec, req: Request) -> JSON:
        ts = rfc3339(f.created_at)
        return {"name": f.id, "displayName": f.filename, "mimeType": f.extra.get("mime", "jsonl"),
                "sizeBytes": str(len(f.data)), "createTime": ts, "updateTime": ts,
                "expirationTime": rfc3339(f.created_at + 48 * 3600),
                "sha256Hash": hashlib.sha256(f.data).hexdigest(), "uri": f"{req.base_url}{V}/{f.id}",
                "state": "ACTIVE", "source": f.purpose}

    def upload(self, req: Request, m: re.Match[str]) -> Response:
        upload_id = req.arg("upload_id")
        command = (req.header("x-goog-upload-command") or "").replace(" ", "").lower()
        if upload_id is None:
            if req.header("x-goog-upload-protocol") != "resumable" or command != "start":
                raise HttpError(400, "expected X-Goog-Upload-Protocol: resumable and X-Goog-Upload-Command: start")
            meta = (req.json() or {}).get("file") or {}
            upload_id = "up-" + short_hash("upload", str(self.store.next_seq()))
            self.store.uploads[upload_id] = {
                "display_name": _g(meta, "display_name", "displayName") or "upload.jsonl",
                "length": req.header("x-goog-upload-header-content-length"),
                "mime": req.header("x-goog-upload-header-content-type") or "jsonl"}
            url = f"{req.base_url}/gemini/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
            return Response(200, b"", {"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
                                       "X-Goog-Upload-Chunk-Granularity": "8388608"})
        if command != "upload,finalize":
            raise HttpError(400, "expected X-Goog-Upload-Command: upload, finalize")
        if (req.header("x-goog-upload-offset") or "0") != "0":
            raise HttpError(400, "the fake only supports single-chunk uploads at offset 0")
        sess = self.store.uploads.pop(upload_id)
        self.check_lines(req, "UPLOADED", req.body)
        if sess["length"] is not None and int(sess["length"]) != len(req.body):
            raise HttpError(400, f"declared length {sess['length']} != received {len(req.body)} bytes")
        rec = FileRec("files/" + short_hash("file", upload_id, n=12), sess["display_name"], "UPLOADED",
                      req.body, now(), {"mime": sess["mime"]})
        self.store.add_file(self.name, rec)
        return json_response(200, {"file": self.file_obj(rec, req)}, {"X-Goog-Upload-Status": "final"})

    def file_meta(self, req: Request, m: re.Match[str]) -> Response:
        f = self.store.get_file(self.name, "files/" + m.group(1))
        if f is None:
            raise HttpError(404, f"File files/{m.group(1)} not found.")
        return json_response(200, self.file_obj(f, req))

    def download(self, req: Request, m: re.Match[str]) -> Response:
        f = self.store.get_file(self.name, "files/" + m.group(1))
        if f is None:
            raise HttpError(404, f"File files/{m.group(1)} not found.")
        if req.arg("alt") != "media":
            raise HttpError(400, "download requires ?alt=media")
        if f.purpose != "GENERATED":
            raise HttpError(400, "Only generated files can be downloaded; uploaded files cannot.")
        return raw_response(200, f.data, "application/octet-stream")

    # --- batches
    def create(self, req: Request, m: re.Match[str]) -> Response:
        model = "models/" + m.group(1)
        body = req.json()
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, dict):
            raise HttpError(400, "Invalid JSON payload: field 'batch' is required.")
        cfg = _g(batch, "input_config", "inputConfig")
        if not isinstance(cfg, dict):
            raise HttpError(400, "batch.input_config is required.")
        file_name = _g(cfg, "file_name", "fileName")
        items: list[Item] = []
        if file_name:
            f = self.store.get_file(self.name, file_name)
            if f is None:
                raise HttpError(404, f"File {file_name} not found.")
            for n, obj, _ in parse_jsonl(f.data):
                if not isinstance(obj, dict) or not isinstance(obj.get("request"), dict):
                    it = Item(None, {}, prompt_of_gemini({}), "unsupported", {"line": n})
                    it.extra["key"] = obj.get("key") if isinstance(obj, dict) else None
                else:
                    it = Item(obj.get("key"), obj["request"], prompt_of_gemini(obj["request"]), "gemini",
                              {"key": obj.get("key")})
                items.append(it)
            mode = "file"
        else:
            wrapper = cfg.get("requests")
            reqs = wrapper.get("requests") if isinstance(wrapper, dict) else None
            if not isinstance(reqs, list) or not reqs:
                raise HttpError(400, "batch.input_config must set file_name or requests.requests[].")
            for i, r in enumerate(reqs):
                if not isinstance(r, dict) or not isinstance(r.get("request"), dict):
                    raise HttpError(400, f"batch.input_config.requests.requests[{i}].request is required.")
                meta = r.get("metadata")
                items.append(Item(None, r["request"], prompt_of_gemini(r["request"]), "gemini",
                                  {"metadata": meta}))
            mode = "inline"
        if not items:
            raise HttpError(400, "The batch has no requests.")
        b = Batch(self.name, self.store.new_id("", self.name)[:16], items, LIFE, self.store.default_polls,
                  data={"model": model, "mode": mode, "file_name": file_name,
                        "display_name": _g(batch, "display_name", "displayName") or ""})
        self.store.add_batch(b)
        return json_response(200, self.operation(b))

    def _batch(self, batch_id: str) -> Batch:
        b = self.store.get_batch(self.name, batch_id.removeprefix("batches/"))
        if b is None:
            raise HttpError(404, f"Batch batches/{batch_id} not found.")
        return b

    def get_batch(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        advance(b)
        return json_response(200, self.operation(b))

    def list_batches(self, req: Request, m: re.Match[str]) -> Response:
        batches = list(reversed(list(self.store.batches[self.name].values())))
        size = max(1, min(1000, int(req.arg("pageSize") or 50)))
        token = req.arg("pageToken") or ""
        start = 0
        if token:
            if not token.startswith("tok-"):
                raise HttpError(400, f"Invalid page token {token!r}.")
            start = int(token[4:])
        page = batches[start:start + size]
        out: JSON = {"operations": [self.operation(b) for b in page]}
        if start + size < len(batches):
            out["nextPageToken"] = f"tok-{start + size}"
        return json_response(200, out)

    def cancel(self, req: Request, m: re.Match[str]) -> Response:
        request_cancel(self._batch(m.group(1)))
        return json_response(200, {})

    def delete_batch(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        del self.store.batches[self.name][b.id]
        return json_response(200, {})

    # --- rendering
    def gen_response(self, b: Batch, item: Item) -> JSON:
        u = usage_for(item.prompt)
        usage: JSON = {"promptTokenCount": u.prompt, "candidatesTokenCount": u.output,
                       "totalTokenCount": u.total}
        if u.reasoning:
            usage["thoughtsTokenCount"] = u.reasoning
        if u.cached:
            usage["cachedContentTokenCount"] = u.cached
        return {"candidates": [{"content": {"parts": [{"text": reply_text(item.prompt)}], "role": "model"},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": usage, "modelVersion": b.data["model"].removeprefix("models/"),
                "responseId": short_hash(b.id, json.dumps(item.body, sort_keys=True), n=20)}

    def item_result(self, b: Batch, item: Item) -> JSON:
        if b.outcome(item) == "succeeded":
            return {"response": self.gen_response(b, item)}
        msg = fail_message(self.name) if item.kind != "unsupported" else "line has no 'request' object"
        return {"error": {"code": RPC_INVALID_ARGUMENT, "message": msg}}

    def finalize(self, b: Batch) -> None:
        if b.kind != "completed":
            return  # FAILED, CANCELLED and EXPIRED jobs have no results
        if b.data["mode"] == "inline":
            rows = []
            for item in b.items:  # inline: input order, metadata echoed
                r = self.item_result(b, item)
                if item.extra.get("metadata") is not None:
                    r["metadata"] = item.extra["metadata"]
                rows.append(r)
            b.data["output"] = {"inlinedResponses": {"inlinedResponses": rows}}
        else:
            lines = [{"key": it.extra.get("key"), **self.item_result(b, it)} for it in reversed(b.items)]
            rec = FileRec(f"files/batch-{b.id}", f"batch-{b.id}-responses", "GENERATED", to_jsonl(lines), now())
            self.store.add_file(self.name, rec, upload=False)
            b.data["output"] = {"responsesFile": rec.id}

    def operation(self, b: Batch) -> JSON:
        self.ensure_final(b)
        c = b.counts()
        done = c["succeeded"] + c["errored"] if b.started else 0
        stats = {"requestCount": str(len(b.items)), "successfulRequestCount": str(c["succeeded"]),
                 "failedRequestCount": str(c["errored"]),
                 "pendingRequestCount": str(0 if b.terminal else len(b.items) - done)}
        stats = {k: v for k, v in stats.items() if v != "0"}  # proto3 JSON omits zero int64 fields
        meta: JSON = {"@type": TYPE_BATCH, "model": b.data["model"], "displayName": b.data["display_name"],
                      "state": b.state, "createTime": rfc3339(b.created_at),
                      "updateTime": rfc3339(max(b.times.values())), "batchStats": stats,
                      "name": f"batches/{b.id}"}
        if b.data["file_name"]:
            meta["inputConfig"] = {"fileName": b.data["file_name"]}
        op: JSON = {"name": f"batches/{b.id}", "metadata": meta}
        if b.terminal:
            meta["endTime"] = rfc3339(max(b.times.values()))
            op["done"] = True
            if "output" in b.data:
                meta["output"] = b.data["output"]
                op["response"] = {"@type": TYPE_OUTPUT, **b.data["output"]}
            if b.kind == "failed":
                op["error"] = {"code": RPC_INVALID_ARGUMENT, "message": b.fail_reason or "batch failed"}
        self.store.overridden(b, meta, "state", meta["batchStats"])
        return op

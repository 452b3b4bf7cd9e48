"""OpenAI, Azure OpenAI and Groq: `/files` + `/batches` with OpenAI-shaped objects and result lines."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    fake_embedding,
    json_response,
    now,
    parse_form,
    parse_jsonl,
    prompt_of_embeddings,
    prompt_of_messages,
    prompt_of_responses,
    raw_response,
    reply_text,
    request_cancel,
    route,
    short_hash,
    to_jsonl,
    usage_for,
)

OPENAI_LIFE = Lifecycle(["validating", "in_progress", "finalizing", "completed"], "cancelling", "cancelled",
                        "expired", "failed", started_index=1, finishing="finalizing")

OPENAI_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos")


# --------------------------------------------------------------------------- bodies (shared with others)


def endpoint_kind(url: str) -> str:
    tail = url[3:] if url.startswith("/v1/") else url
    return {"/chat/completions": "chat", "/embeddings": "embeddings", "/responses": "responses"}.get(
        tail, "unsupported")


def make_item(custom_id: str | None, body: JSON, kind: str) -> Item:
    if kind == "embeddings":
        prompt = prompt_of_embeddings(body)
    elif kind == "responses":
        prompt = prompt_of_responses(body)
    else:
        prompt = prompt_of_messages(body)
    return Item(custom_id, body, prompt, kind)


def chat_completion(item: Item, model: str, seed: str, detailed: bool = True) -> JSON:
    u = usage_for(item.prompt)
    usage: JSON = {"prompt_tokens": u.prompt, "completion_tokens": u.output + u.reasoning,
                   "total_tokens": u.total}
    if detailed:
        usage["prompt_tokens_details"] = {"cached_tokens": u.cached, "audio_tokens": 0}
        usage["completion_tokens_details"] = {"reasoning_tokens": u.reasoning, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}
    return {
        "id": "chatcmpl-" + short_hash(seed, "chat"),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply_text(item.prompt),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
        "system_fingerprint": "fp_fake",
    }


def embeddings_body(item: Item, model: str) -> JSON:
    inputs = item.prompt.user_text
    n = max(1, sum(len(t.split()) for t in inputs))
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": fake_embedding(t)}
                     for i, t in enumerate(inputs)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def responses_body(item: Item, model: str, seed: str) -> JSON:
    u = usage_for(item.prompt)
    return {
        "id": "resp_" + short_hash(seed, "resp"), "object": "response", "created_at": 1_700_000_000,
        "status": "completed", "model": model,
        "output": [{"type": "message", "id": "msg_" + short_hash(seed, "msg"), "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": reply_text(item.prompt), "annotations": []}]}],
        "usage": {"input_tokens": u.prompt, "input_tokens_details": {"cached_tokens": u.cached},
                  "output_tokens": u.output + u.reasoning,
                  "output_tokens_details": {"reasoning_tokens": u.reasoning}, "total_tokens": u.total},
    }


def success_body(item: Item, model: str, seed: str, detailed: bool = True) -> JSON:
    if item.kind == "embeddings":
        return embeddings_body(item, model)
    if item.kind == "responses":
        return responses_body(item, model, seed)
    return chat_completion(item, model, seed, detailed)


def openai_error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
                      param: str | None = None) -> JSON:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def result_lines(b: Batch, provider: str, model_of: Any, detailed: bool = True,
                 request_id: bool = True) -> tuple[list[JSON], list[JSON]]:
    """OpenAI-shaped (output lines, error lines), in REVERSED input order on purpose."""
    out: list[JSON] = []
    err: list[JSON] = []
    for item in reversed(b.items):
        seed = f"{b.id}/{item.custom_id}"
        line: JSON = {"id": "batch_req_" + short_hash(seed, "line"), "custom_id": item.custom_id}
        outcome = b.outcome(item)
        rid = {"request_id": "req_" + short_hash(seed, "req")} if request_id else {}
        if outcome == "succeeded":
            body = success_body(item, model_of(item), seed, detailed)
            line.update(response={"status_code": 200, **rid, "body": body}, error=None)
            out.append(line)
        elif outcome == "errored":
            msg = fail_message(provider) if item.kind != "unsupported" else "endpoint not implemented by fake"
            body = openai_error_body(msg, "invalid_request_error", "fake_fail_marker")
            line.update(response={"status_code": 400, **rid, "body": body}, error=None)
            err.append(line)
        elif outcome in ("canceled", "expired"):
            code = "batch_cancelled" if outcome == "canceled" else "batch_expired"
            line.update(response=None, error={"code": code, "message": f"request not processed: {code}"})
            err.append(line)
    return out, err


# --------------------------------------------------------------------------- provider


@dataclass(frozen=True)
class Flavor:
    name: str
    prefix: str
    endpoints: tuple[str, ...]
    api_version: str | None = None
    auth_header: str = "authorization"  # or "api-key"
    windows: tuple[str, ...] = ("24h",)
    has_more: bool = True
    model_and_usage: bool = True
    empty_error_file: bool = False
    one_model: bool = False
    upload_status: str = "processed"
    max_lines: int = 50_000
    detailed_usage: bool = True


OPENAI = Flavor("openai", "/openai/v1", OPENAI_ENDPOINTS)
AZURE = Flavor("azure", "/azure/openai", ("/chat/completions", "/embeddings", "/responses",
                                          "/v1/chat/completions", "/v1/embeddings", "/v1/responses"),
               api_version="2024-10-21", auth_header="api-key", model_and_usage=False,
               empty_error_file=True, one_model=True, upload_status="pending", max_lines=100_000)
GROQ = Flavor("groq", "/groq/openai/v1", ("/v1/chat/completions",),
              windows=tuple(f"{h}h" for h in range(24, 169)) + tuple(f"{d}d" for d in range(1, 8)),
              has_more=False, model_and_usage=False, detailed_usage=False)

AZURE_401 = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
             "valid key for an active subscription and use a correct regional API endpoint for your resource.")
# Azure's documented ErrorCode enum (spec definitions/ErrorCode), by HTTP status
AZURE_CODES = {400: "invalidPayload", 401: "unauthorized", 403: "forbidden", 404: "notFound", 409: "conflict",
               429: "tooManyRequests", 503: "serviceUnavailable"}


def without_nulls(obj: JSON) -> JSON:
    """The spec (OpenAI 2.3.0, Azure 2024-10-21) types these fields without `null`: absent, not null."""
    return {k: v for k, v in obj.items() if v is not None}


class OpenAILike(Provider):
    def __init__(self, store: Any, flavor: Flavor) -> None:
        self.flavor = flavor
        self.name = flavor.name
        super().__init__(store)

    def target(self, req: Request) -> Target:
        return self.files_and_batches_target(req, self.flavor.prefix)

    def build_routes(self) -> list[Route]:
        p = re.escape(self.flavor.prefix)
        return [
            route("POST", p + "/files", self.upload),
            route("GET", p + "/files", self.list_files),
            route("GET", p + r"/files/([^/]+)", self.get_file),
            route("DELETE", p + r"/files/([^/]+)", self.delete_file),
            route("GET", p + r"/files/([^/]+)/content", self.file_content),
            route("POST", p + "/batches", self.create),
            route("GET", p + "/batches", self.list_batches),
            route("GET", p + r"/batches/([^/]+)", self.get_batch),
            route("POST", p + r"/batches/([^/]+)/cancel", self.cancel),
        ]

    # --- envelopes
    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        if self.name == "azure":  # the spec's ErrorResponse: {error: {code (enum), message}}
            code = AZURE_CODES.get(status, "internalFailure" if status >= 500 else "invalidPayload")
            return json_response(status, {"error": {"code": code, "message": AZURE_401 if status == 401 else message}})
        body = openai_error_body(message, kind or "invalid_request_error", extra.get("code"), extra.get("param"))
        return json_response(status, body)

    def check_auth(self, req: Request) -> Response | None:
        if self.flavor.api_version is not None and req.arg("api-version") != self.flavor.api_version:
            return self.error(400 if req.arg("api-version") is None else 404,
                              f"The api-version query parameter (?api-version={self.flavor.api_version}) "
                              "is required for all requests (the fake only serves this version).")
        if self.flavor.auth_header == "api-key":
            got = req.header("api-key")
        else:
            got = req.bearer()
        if got != self.key:
            return self.error(401, f"Incorrect API key provided: {got!r}.", "invalid_request_error",
                              code="invalid_api_key")
        return None

    # --- files
    def file_obj(self, f: FileRec) -> JSON:
        obj = {"id": f.id, "object": "file", "bytes": len(f.data), "created_at": f.created_at,
               "filename": f.filename, "purpose": f.purpose, "status": f.extra.get("status", "processed"),
               "status_details": f.extra.get("status_details"), "expires_at": f.created_at + 30 * 86400}
        return without_nulls(obj) if self.name != "groq" else obj

    def _file(self, file_id: str) -> FileRec:
        f = self.store.get_file(self.name, file_id)
        if f is None:
            raise HttpError(404, f"No such File object: {file_id}", code="file_not_found")
        return f

    def upload(self, req: Request, m: re.Match[str]) -> Response:
        form = parse_form(req)
        purpose = (form.get("purpose", (None, b""))[1]).decode()
        if "file" not in form:
            raise HttpError(400, "'file' is a required property", param="file")
        allowed = ("batch",) if self.name == "groq" else (
            "assistants", "batch", "fine-tune", "vision", "user_data", "evals")
        if purpose not in allowed:
            raise HttpError(400, f"'{purpose}' is not one of {list(allowed)} - 'purpose'", param="purpose")
        filename, data = form["file"]
        self.check_lines(req, purpose, data)
        rec = FileRec(self.store.new_id("file-", self.name), filename or "upload.jsonl", purpose, data, now(),
                      {"status": self.flavor.upload_status})
        self.store.add_file(self.name, rec)
        return json_response(201 if self.name == "azure" else 200, self.file_obj(rec))

    def list_files(self, req: Request, m: re.Match[str]) -> Response:
        files = sorted(self.store.files[self.name].values(), key=lambda f: f.id)
        purpose = req.arg("purpose")
        data = [self.file_obj(f) for f in files if not purpose or f.purpose == purpose]
        if self.name == "azure":  # FileList: {object, data}
            return json_response(200, {"object": "list", "data": data})
        return json_response(200, {"object": "list", "data": data,  # OpenAI: ids required (strings)
                                   "first_id": data[0]["id"] if data else "",
                                   "last_id": data[-1]["id"] if data else "", "has_more": False})

    def get_file(self, req: Request, m: re.Match[str]) -> Response:
        f = self._file(m.group(1))
        obj = self.file_obj(f)
        f.extra["status"] = "processed"  # Azure: pending on upload, processed from the first GET on
        return json_response(200, obj)

    def delete_file(self, req: Request, m: re.Match[str]) -> Response:
        f = self._file(m.group(1))
        del self.store.files[self.name][f.id]
        return json_response(200, {"id": f.id, "object": "file", "deleted": True})

    def file_content(self, req: Request, m: re.Match[str]) -> Response:
        return raw_response(200, self._file(m.group(1)).data, "application/octet-stream")

    # --- batches
    def create(self, req: Request, m: re.Match[str]) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(key):
                raise HttpError(400, f"Missing required parameter: '{key}'.", param=key,
                                code="missing_required_parameter")
        endpoint = body["endpoint"]
        if endpoint not in self.flavor.endpoints:
            raise HttpError(400, f"Invalid value for 'endpoint': {endpoint!r}; supported: "
                                 f"{list(self.flavor.endpoints)}", param="endpoint", code="invalid_value")
        if body["completion_window"] not in self.flavor.windows:
            raise HttpError(400, f"Invalid value for 'completion_window': {body['completion_window']!r}",
                            param="completion_window", code="invalid_value")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
            raise HttpError(400, "metadata must be an object with at most 16 keys", param="metadata")
        f = self.store.get_file(self.name, body["input_file_id"])
        if f is None:
            raise HttpError(400, f"Invalid 'input_file_id': {body['input_file_id']!r}. File not found.",
                            param="input_file_id", code="invalid_value")
        if f.purpose != "batch":
            raise HttpError(400, "The input file must have purpose 'batch'.", param="input_file_id")
        items, errors, model = self.parse_input(f.data, endpoint)
        b = Batch(self.name, self.store.new_id("batch_", self.name), items, OPENAI_LIFE,
                  self.store.default_polls, validation_errors=errors,
                  data={"endpoint": endpoint, "input_file_id": f.id, "metadata": metadata,
                        "completion_window": body["completion_window"], "model": model})
        self.store.add_batch(b)
        return json_response(200, self.batch_obj(b))

    def parse_input(self, data: bytes, endpoint: str) -> tuple[list[Item], list[JSON], str | None]:
        items: list[Item] = []
        errors: list[JSON] = []
        seen: set[str] = set()
        models: list[str] = []

        def err(code: str, message: str, line: int | None) -> None:
            errors.append({"code": code, "message": message, "param": None, "line": line})

        rows = parse_jsonl(data)
        if not rows:
            err("empty_file", "The input file is empty.", None)
        if len(rows) > self.flavor.max_lines:
            err("too_many_tasks", f"The input file has more than {self.flavor.max_lines} requests.", None)
        for n, obj, _ in rows:
            if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
                err("invalid_json_line", f"Line {n} is not a valid request object.", n)
                continue
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                err("invalid_request", f"Line {n}: 'custom_id' is required.", n)
                continue
            if cid in seen:
                err("duplicate_custom_id", f"The custom_id {cid!r} is duplicated (line {n}).", n)
            seen.add(cid)
            if obj.get("method") != "POST":
                err("invalid_request", f"Line {n}: 'method' must be 'POST'.", n)
            if obj.get("url") != endpoint:
                err("url_mismatch", f"Line {n}: url {obj.get('url')!r} does not match the batch endpoint "
                                    f"{endpoint!r}.", n)
            if obj["body"].get("stream"):
                err("invalid_request", f"Line {n}: streaming is not supported in batches.", n)
            model = obj["body"].get("model")
            if not isinstance(model, str) or not model:
                err("model_not_found", f"Line {n}: 'body.model' is required.", n)
            else:
                models.append(model)
            items.append(make_item(cid, obj["body"], endpoint_kind(endpoint)))
        if self.flavor.one_model and len(set(models)) > 1:
            err("model_mismatch", "All requests in a file must use the same deployment; found "
                                  f"{sorted(set(models))}.", None)
        return items, errors, (models[0] if models else None)

    def _batch(self, batch_id: str) -> Batch:
        b = self.store.get_batch(self.name, batch_id)
        if b is None:
            raise HttpError(404, f"No batch found with id '{batch_id}'.", code="batch_not_found")
        return b

    def get_batch(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        advance(b)
        return json_response(200, self.batch_obj(b))

    def list_batches(self, req: Request, m: re.Match[str]) -> Response:
        batches = list(reversed(list(self.store.batches[self.name].values())))  # newest first
        if not self.flavor.has_more:
            return json_response(200, {"object": "list", "data": [self.batch_obj(b) for b in batches]})
        after = req.arg("after")
        limit = max(1, min(100, int(req.arg("limit") or 20)))
        if after:
            ids = [b.id for b in batches]
            if after not in ids:
                raise HttpError(400, f"Invalid 'after': {after!r}", param="after")
            batches = batches[ids.index(after) + 1:]
        page = batches[:limit]
        data = [self.batch_obj(b) for b in page]
        return json_response(200, without_nulls({"object": "list", "data": data,
                                                 "first_id": data[0]["id"] if data else None,
                                                 "last_id": data[-1]["id"] if data else None,
                                                 "has_more": len(batches) > limit}))

    def cancel(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        request_cancel(b)
        return json_response(200, self.batch_obj(b))

    # --- rendering
    def finalize(self, b: Batch) -> None:
        if b.kind == "failed":
            return
        out, err = result_lines(b, self.name, lambda it: it.body.get("model", ""), self.flavor.detailed_usage)
        if self.spec is not None:
            self.store.violations += self.spec.check_output_lines(b.id, out + err)
        for key, rows, suffix in (("output_file_id", out, "output"), ("error_file_id", err, "error")):
            if rows or self.flavor.empty_error_file:
                rec = FileRec(self.store.new_id("file-", self.name), f"{b.id}_{suffix}.jsonl", "batch_output",
                              to_jsonl(rows), now())
                self.store.add_file(self.name, rec, upload=False)
                b.data[key] = rec.id

    def batch_obj(self, b: Batch) -> JSON:
        self.ensure_final(b)
        t = b.times
        counts = b.counts()
        total = len(b.items) if b.started else 0
        errors: JSON | None = None
        if b.kind == "failed":
            data = b.validation_errors or [{"code": "invalid_request", "message": b.fail_reason or "batch failed",
                                            "param": None, "line": None}]
            errors = {"object": "list", "data": data}
            if self.name == "azure":  # the spec's BatchErrors: `data` is ONE BatchErrorData, `line` a string
                first = without_nulls(data[0])
                if "line" in first:
                    first["line"] = str(first["line"])
                if len(data) > 1:
                    first["message"] = "; ".join(str(e.get("message")) for e in data)
                errors = {"object": "list", "data": first}
        obj: JSON = {
            "id": b.id, "object": "batch", "endpoint": b.data["endpoint"], "errors": errors,
            "input_file_id": b.data["input_file_id"], "completion_window": b.data["completion_window"],
            "status": b.state, "output_file_id": b.data.get("output_file_id"),
            "error_file_id": b.data.get("error_file_id"), "created_at": b.created_at,
            "in_progress_at": t.get("in_progress"), "expires_at": b.created_at + 86400,
            "finalizing_at": t.get("finalizing"), "completed_at": t.get("completed"),
            "failed_at": t.get("failed"), "expired_at": t.get("expired"),
            "cancelling_at": t.get("cancelling"), "cancelled_at": t.get("cancelled"),
            "request_counts": {"total": total, "completed": counts["succeeded"], "failed": counts["errored"]},
            "metadata": b.data.get("metadata"),
        }
        if self.flavor.model_and_usage:
            obj["model"] = b.data.get("model")
            obj["usage"] = self.batch_usage(b)
        if self.name != "groq":  # Groq (no spec) keeps the nulls the live APIs send
            obj = without_nulls(obj)
        return self.store.overridden(b, obj, "status", obj.get("request_counts"))

    def batch_usage(self, b: Batch) -> JSON:
        inp, cached, out, reasoning = b.summed("usage", lambda: self._usage_sums(b))
        return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": inp + out}

    @staticmethod
    def _usage_sums(b: Batch) -> tuple[int, int, int, int]:
        inp = cached = out = reasoning = 0
        for it in b.items:
            if b.outcome(it) == "succeeded" and it.kind in ("chat", "responses"):
                u = usage_for(it.prompt)
                inp, cached, out, reasoning = (inp + u.prompt, cached + u.cached,
                                               out + u.output + u.reasoning, reasoning + u.reasoning)
        return inp, cached, out, reasoning

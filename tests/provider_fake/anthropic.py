"""Anthropic Message Batches: `/anthropic/v1/messages/batches` (inline requests, JSONL results)."""

from __future__ import annotations

import re
from typing import Any

from .base import Provider
from .core import (
    JSON,
    Batch,
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
    prompt_of_messages,
    raw_response,
    reply_text,
    request_cancel,
    rfc3339,
    route,
    short_hash,
    to_jsonl,
    usage_for,
)

LIFE = Lifecycle(["in_progress", "ended"], "canceling", "ended", "ended", "ended", started_index=0)
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# API versions served: the long-standing one and the one the official SDK (anthropic 2.14.0) sends.
VERSIONS = ("2023-06-01", "2026-10-21")
BASE = "/anthropic/v1/messages/batches"


class Anthropic(Provider):
    name = "anthropic"

    def build_routes(self) -> list[Route]:
        return [
            route("POST", BASE, self.create),
            route("GET", BASE, self.list_batches),
            route("GET", BASE + r"/([^/]+)", self.get_batch),
            route("DELETE", BASE + r"/([^/]+)", self.delete_batch),
            route("POST", BASE + r"/([^/]+)/cancel", self.cancel),
            route("GET", BASE + r"/([^/]+)/results", self.results),
        ]

    def target(self, req: Request) -> Target:
        if req.method == "POST" and req.path == BASE:
            return Target(None, "create")
        m = re.match("^" + re.escape(BASE) + r"/([^/]+)(/cancel|/results)?$", req.path)
        if m:
            return Target(m.group(1), {"/cancel": "cancel", "/results": "results"}.get(m.group(2) or "", "status"))
        return Target()

    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        kind = kind or "invalid_request_error"
        return json_response(status, {"type": "error", "error": {"type": kind, "message": message},
                                      "request_id": "req_" + short_hash(message, str(status))})

    def check_auth(self, req: Request) -> Response | None:
        key = req.header("x-api-key") or req.bearer()
        if key != self.key:
            return self.error(401, "invalid x-api-key", "authentication_error")
        if req.header("anthropic-version") is None:
            return self.error(400, "anthropic-version: header is required", "invalid_request_error")
        if req.header("anthropic-version") not in VERSIONS:
            return self.error(400, f"anthropic-version: unsupported version (fake serves {', '.join(VERSIONS)})",
                              "invalid_request_error")
        return None

    # --- handlers
    def create(self, req: Request, m: re.Match[str]) -> Response:
        body = req.json()
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise HttpError(400, "requests: Field required (1 to 100000 items)")
        if len(reqs) > 100_000:
            raise HttpError(400, "requests: at most 100000 requests per batch")
        items: list[Item] = []
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            where = f"requests.{i}"
            if not isinstance(r, dict):
                raise HttpError(400, f"{where}: Input should be an object")
            cid = r.get("custom_id")
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
                raise HttpError(400, f"{where}.custom_id: String should match pattern "
                                     f"'^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                raise HttpError(400, f"{where}.custom_id: duplicate custom_id {cid!r}; custom_id must be "
                                     "unique within a batch")
            seen.add(cid)
            params = r.get("params")
            if not isinstance(params, dict):
                raise HttpError(400, f"{where}.params: Field required")
            for key in ("model", "messages", "max_tokens"):
                if key not in params:
                    raise HttpError(400, f"{where}.params.{key}: Field required")
            if not isinstance(params["max_tokens"], int) or params["max_tokens"] < 1:
                raise HttpError(400, f"{where}.params.max_tokens: Input should be greater than or equal to 1")
            if params.get("stream"):
                raise HttpError(400, f"{where}.params.stream: streaming is not supported in batches")
            items.append(Item(cid, params, prompt_of_messages(params, "system"), "anthropic"))
        b = Batch(self.name, self.store.new_id("msgbatch_", self.name), items, LIFE, self.store.default_polls)
        self.store.add_batch(b)
        return json_response(200, self.batch_obj(b, req))

    def _batch(self, batch_id: str) -> Batch:
        b = self.store.get_batch(self.name, batch_id)
        if b is None:
            raise HttpError(404, f"Message batch {batch_id} not found", "not_found_error")
        return b

    def get_batch(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        b.gets += 1
        if b.eventual_404 and b.gets == 1:
            raise HttpError(404, f"Message batch {b.id} not found", "not_found_error")
        advance(b)
        return json_response(200, self.batch_obj(b, req))

    def list_batches(self, req: Request, m: re.Match[str]) -> Response:
        batches = list(reversed(list(self.store.batches[self.name].values())))  # newest first
        limit = max(1, min(1000, int(req.arg("limit") or 20)))
        ids = [b.id for b in batches]
        after, before = req.arg("after_id"), req.arg("before_id")
        if after:
            if after not in ids:
                raise HttpError(400, f"after_id: unknown batch {after}")
            batches = batches[ids.index(after) + 1:]
            page = batches[:limit]
            has_more = len(batches) > limit
        elif before:
            if before not in ids:
                raise HttpError(400, f"before_id: unknown batch {before}")
            batches = batches[:ids.index(before)]
            page = batches[-limit:]
            has_more = len(batches) > limit
        else:
            page, has_more = batches[:limit], len(batches) > limit
        data = [self.batch_obj(b, req) for b in page]
        return json_response(200, {"data": data, "has_more": has_more,
                                   "first_id": data[0]["id"] if data else None,
                                   "last_id": data[-1]["id"] if data else None})

    def cancel(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        request_cancel(b)
        return json_response(200, self.batch_obj(b, req))

    def delete_batch(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        if not b.terminal:
            raise HttpError(400, f"Batch {b.id} cannot be deleted while it is processing; cancel it first")
        del self.store.batches[self.name][b.id]
        return json_response(200, {"id": b.id, "type": "message_batch_deleted"})

    def results(self, req: Request, m: re.Match[str]) -> Response:
        b = self._batch(m.group(1))
        self.ensure_final(b)
        if not b.terminal:
            raise HttpError(400, f"Batch {b.id} is still processing; results are available once it has "
                                 "ended (see results_url)")
        return raw_response(200, to_jsonl(self.result_rows(b)), "application/binary")

    # --- rendering
    def message(self, b: Batch, item: Item) -> JSON:
        u = usage_for(item.prompt)
        return {
            "id": "msg_" + short_hash(b.id, str(item.custom_id)), "type": "message", "role": "assistant",
            "model": item.body.get("model"),
            "content": [{"type": "text", "text": reply_text(item.prompt)}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": u.prompt - u.cached, "output_tokens": u.output + u.reasoning,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached,
                      "service_tier": "batch"},
        }

    def result_rows(self, b: Batch) -> list[JSON]:
        rows: list[JSON] = []
        for item in reversed(b.items):  # not input order, on purpose
            outcome = b.outcome(item)
            result: JSON
            if outcome == "succeeded":
                result = {"type": "succeeded", "message": self.message(b, item)}
            elif outcome == "errored" or (outcome == "none" and b.kind == "failed"):
                msg = fail_message(self.name) if outcome == "errored" else (b.fail_reason or "batch failed")
                kind = "invalid_request_error" if outcome == "errored" else "api_error"
                result = {"type": "errored", "error": {
                    "type": "error", "error": {"type": kind, "message": msg},
                    "request_id": "req_" + short_hash(b.id, str(item.custom_id), "err")}}
            else:
                result = {"type": outcome}
            rows.append({"custom_id": item.custom_id, "result": result})
        return rows

    def batch_obj(self, b: Batch, req: Request) -> JSON:
        self.ensure_final(b)
        ended = b.terminal
        counts = {"processing": 0 if ended else len(b.items), "succeeded": 0, "errored": 0,
                  "canceled": 0, "expired": 0}
        if ended:
            c = b.counts()
            counts.update(succeeded=c["succeeded"], errored=c["errored"] + (c["none"] if b.kind == "failed" else 0),
                          canceled=c["canceled"], expired=c["expired"])
        end_time = None
        if ended:
            end_time = max(v for k, v in b.times.items())
        obj: JSON = {
            "id": b.id, "type": "message_batch", "processing_status": b.state,
            "request_counts": counts,
            "created_at": rfc3339(b.created_at), "expires_at": rfc3339(b.created_at + 86400),
            "ended_at": rfc3339(end_time), "cancel_initiated_at": rfc3339(b.times.get("cancel_requested")),
            "archived_at": None,
            "results_url": f"{req.base_url}{BASE}/{b.id}/results" if ended else None,
        }
        return self.store.overridden(b, obj, "processing_status", obj["request_counts"])

"""Base class of a provider family: routing, auth hook, error envelope hook, finalisation hook."""

from __future__ import annotations

import re
from typing import Any

from .conformance import Conformance, checker
from .core import Batch, HttpError, Request, Response, Route, Store, Target
from .sdk_conformance import SdkConformance, sdk_checker

STATUS_KINDS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 409: "conflict", 413: "request_too_large",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


class Provider:
    name: str = ""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.routes: list[Route] = self.build_routes()
        self.spec: Conformance | SdkConformance | None = checker(self.name) or sdk_checker(self.name)

    # --- to override
    def build_routes(self) -> list[Route]:
        raise NotImplementedError

    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        raise NotImplementedError

    def check_auth(self, req: Request) -> Response | None:
        raise NotImplementedError

    def finalize(self, b: Batch) -> None:
        """Called once when a batch becomes terminal (write result files, etc.)."""

    def target(self, req: Request) -> Target:
        """Which batch a request is about and what kind of call it is (for faults and cancel counts)."""
        return Target()

    def error_for(self, req: Request, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        """`error`, for providers whose envelope depends on the resource (Together)."""
        return self.error(status, message, kind, **extra)

    # --- shared
    @property
    def key(self) -> str:
        return self.store.keys[self.name]

    def ensure_final(self, b: Batch) -> None:
        if b.terminal and not b.finalized:
            b.finalized = True
            self.finalize(b)

    def fault_response(self, req: Request, status: int, message: str) -> Response:
        return self.error_for(req, status, message, STATUS_KINDS.get(status, "api_error"))

    def check_lines(self, req: Request, purpose: str, data: bytes) -> None:
        """Record spec violations of an uploaded batch input file's lines (where the spec has a line schema)."""
        if self.spec is not None:
            self.store.violations += self.spec.check_lines(req.method, req.path, purpose, data)

    def files_and_batches_target(self, req: Request, prefix: str, batches: str = "/batches",
                                 file_keys: tuple[str, ...] = ("output_file_id", "error_file_id")) -> Target:
        """`target` of the OpenAI-shaped APIs: `POST {batches}`, `{batches}/{id}[/cancel]` and the
        content of a batch's output/error file (`file_keys` name them on the batch's data)."""
        tail = req.path[len(prefix):]
        if req.method == "POST" and tail == batches:
            return Target(None, "create")
        m = re.match("^" + re.escape(batches) + r"/([^/]+)(/cancel)?$", tail)
        if m:
            return Target(m.group(1), "cancel" if m.group(2) else "status")
        m = re.match(r"^/files/([^/]+)/content$", tail)
        if m and (owner := self.result_file_owner(m.group(1), file_keys)):
            return Target(owner, "results")
        return Target()

    def result_file_owner(self, file_id: str,
                          keys: tuple[str, ...] = ("output_file_id", "error_file_id")) -> str | None:
        """The batch whose output or error file `file_id` is."""
        for b in self.store.batches[self.name].values():
            if file_id in (b.data.get(k) for k in keys):
                return b.id
        return None

    def dispatch(self, req: Request) -> Response:
        denied = self.check_auth(req)
        if denied is not None:
            return denied
        path_matched = False
        for r in self.routes:
            m = r.pattern.match(req.path)
            if not m:
                continue
            path_matched = True
            if r.method != req.method:
                continue
            try:
                return r.handler(req, m)
            except HttpError as e:
                return self.error_for(req, e.status, e.message, e.kind, **e.extra)
            except (ValueError, KeyError, TypeError) as e:
                return self.error_for(req, 400, f"malformed request: {e}", "invalid_request_error")
        if path_matched:
            return self.error_for(req, 405, f"method {req.method} not allowed on {req.path}", "invalid_request_error")
        return self.error_for(req, 404, f"unknown {self.name} path {req.path}", "not_found_error")

    def control_batch(self, batch_id: str) -> Batch | None:
        return self.store.get_batch(self.name, batch_id)

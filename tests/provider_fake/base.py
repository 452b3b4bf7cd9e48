"""Base class of a provider family: routing, auth hook, error envelope hook, finalisation hook."""

from __future__ import annotations

from typing import Any

from .core import Batch, HttpError, Request, Response, Route, Store

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

    # --- to override
    def build_routes(self) -> list[Route]:
        raise NotImplementedError

    def error(self, status: int, message: str, kind: str | None = None, **extra: Any) -> Response:
        raise NotImplementedError

    def check_auth(self, req: Request) -> Response | None:
        raise NotImplementedError

    def finalize(self, b: Batch) -> None:
        """Called once when a batch becomes terminal (write result files, etc.)."""

    # --- shared
    @property
    def key(self) -> str:
        return self.store.keys[self.name]

    def ensure_final(self, b: Batch) -> None:
        if b.terminal and not b.finalized:
            b.finalized = True
            self.finalize(b)

    def fault_response(self, status: int, message: str) -> Response:
        return self.error(status, message, STATUS_KINDS.get(status, "api_error"))

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
                return self.error(e.status, e.message, e.kind, **e.extra)
            except (ValueError, KeyError, TypeError) as e:
                return self.error(400, f"malformed request: {e}", "invalid_request_error")
        if path_matched:
            return self.error(405, f"method {req.method} not allowed on {req.path}", "invalid_request_error")
        return self.error(404, f"unknown {self.name} path {req.path}", "not_found_error")

    def control_batch(self, batch_id: str) -> Batch | None:
        return self.store.get_batch(self.name, batch_id)

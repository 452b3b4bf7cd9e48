"""A minimal OpenAI Files + Batches stand-in for bench.py: LiteLLM's upstream, on loopback.

    python bench/standin.py --port 0 --dir var/bench/standin     # prints `PORT <n>` once listening

Why not tests/provider_fake (bench.py --standin provider-fake): the fake is a conformance tool;
it parses a whole multipart upload in memory with the email package and checks every line, so on a
100 MB file it spends many seconds, and LiteLLM, which waits for its upstream, would be charged for
them. This one writes the uploaded body to disk as it arrives and answers with OpenAI-shaped
objects, so LiteLLM's figure is LiteLLM's own cost plus little more. It serves:
POST /v1/files (multipart body stored as received), GET /v1/files/{id}, GET /v1/files/{id}/content
(the stored body), POST /v1/batches, GET /v1/batches/{id}, GET /v1/models; anything else is a 404 in OpenAI's
envelope, and every path it refused is printed to stderr, so a LiteLLM that needs more shows it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
_ids = itertools.count(1)
_lock = threading.Lock()
FILES: dict[str, dict[str, Any]] = {}
BATCHES: dict[str, dict[str, Any]] = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Path

    def log_message(self, format: str, *args: Any) -> None:  # no access log
        pass

    def body_chunks(self) -> Any:
        """The request body, a chunk at a time (Content-Length or chunked transfer encoding)."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                while size:
                    piece = self.rfile.read(min(size, CHUNK))
                    if not piece:
                        return
                    size -= len(piece)
                    yield piece
                self.rfile.readline()
        left = int(self.headers.get("content-length") or 0)
        while left:
            piece = self.rfile.read(min(left, CHUNK))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def missing(self) -> None:
        for _ in self.body_chunks():
            pass
        print(f"standin: no route for {self.command} {self.path}", file=sys.stderr, flush=True)
        self.reply(404, {"error": {"message": f"no route {self.command} {self.path}", "type": "invalid_request_error",
                                   "param": None, "code": None}})

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/files"):
            with _lock:
                file_id = f"file-standin{next(_ids)}"
            size = 0
            with open(self.store / file_id, "wb") as out:
                for piece in self.body_chunks():
                    out.write(piece)
                    size += len(piece)
            obj = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                   "filename": "input.jsonl", "purpose": "batch", "status": "processed", "status_details": None}
            FILES[file_id] = obj
            self.reply(200, obj)
        elif path.endswith("/batches"):
            request = json.loads(b"".join(self.body_chunks()) or b"{}")
            with _lock:
                batch_id = f"batch_standin{next(_ids)}"
            now = int(time.time())
            obj = {"id": batch_id, "object": "batch", "endpoint": request.get("endpoint", "/v1/chat/completions"),
                   "errors": None, "input_file_id": request.get("input_file_id", ""),
                   "completion_window": request.get("completion_window", "24h"), "status": "validating",
                   "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                   "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                   "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                   "request_counts": {"total": 0, "completed": 0, "failed": 0},
                   "metadata": request.get("metadata")}
            BATCHES[batch_id] = obj
            self.reply(200, obj)
        else:
            self.missing()

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) >= 3 and parts[-3] == "files" and parts[-1] == "content" and parts[-2] in FILES:
            path = self.store / parts[-2]
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(path.stat().st_size))
            self.end_headers()
            with open(path, "rb") as src:
                while piece := src.read(CHUNK):
                    self.wfile.write(piece)
        elif len(parts) >= 2 and parts[-2] == "files" and parts[-1] in FILES:
            self.reply(200, FILES[parts[-1]])
        elif len(parts) >= 2 and parts[-2] == "batches" and parts[-1] in BATCHES:
            self.reply(200, BATCHES[parts[-1]])
        elif parts[-1] == "models":  # LiteLLM asks once, at start
            self.reply(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0,
                                                         "owned_by": "standin"}]})
        else:
            self.missing()

    def do_DELETE(self) -> None:
        self.missing()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", type=Path, required=True, help="where uploaded bodies are written")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    Handler.store = args.dir
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

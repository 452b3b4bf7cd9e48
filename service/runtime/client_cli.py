"""`sluice batches ...` and `sluice files ...`: the command line for people, a gRPC client.

It talks to the server at `SLUICE_ADDRESS` (host:port, or https://host[:port] for TLS) with
`SLUICE_API_KEY`, prints tables (rich) for people and, with `--json`, the API's JSON for scripts.
A failed call exits 1 with the error's message on stderr; a usage error exits 2. Progress bars go
to stderr, so stdout carries only the answer (tables, JSON, or JSONL results).

Nothing here runs in the server; it only speaks the public contract (proto/sluice/v1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from service.domain.json_values import plain_json
from service.domain.model import RETRYABLE_OUTCOMES, SUPPORTED_ENDPOINTS, TERMINAL
from service.runtime.config import ClientSettings
from sluice.v1 import batch_pb2, batch_pb2_grpc, file_pb2, file_pb2_grpc

UPLOAD_CHUNK = 1024 * 1024  # Envoy's and the server's piece size
RESULTS_PAGE = 1000
RPC_TIMEOUT = 120.0
RECONNECTS = 30
RETRYABLE = sorted(o.value for o in RETRYABLE_OUTCOMES)

CLIENT_HELP = """environment:
  SLUICE_ADDRESS   the server's gRPC address: host:port (127.0.0.1:50051) or https://host[:port]
  SLUICE_API_KEY   your API key (sent as `authorization: Bearer ...`)
exit status: 0 on success; 1 when a call fails (its message goes to stderr) or when a watched
batch ends other than `completed`; 2 on a usage error."""


class CliError(Exception):
    """A failure to report in one line and exit 1."""


# --------------------------------------------------------------------------- the client


class Api:
    """The RPCs the commands use, with the key attached and errors turned into CliError."""

    def __init__(self, settings: ClientSettings) -> None:
        if not settings.api_key:
            raise CliError("no API key: set SLUICE_API_KEY")
        self.address = settings.address
        if settings.address.startswith("https://"):
            target = settings.address.removeprefix("https://").rstrip("/")
            self.channel = grpc.secure_channel(target if ":" in target else f"{target}:443",
                                               grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.insecure_channel(settings.address.removeprefix("http://").rstrip("/"))
        self.metadata = (("authorization", f"Bearer {settings.api_key}"),)
        self.batches = batch_pb2_grpc.BatchServiceStub(self.channel)
        self.files = file_pb2_grpc.FileServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            raise CliError(self.describe(exc)) from None

    def describe(self, exc: grpc.RpcError) -> str:
        """The error's message: the OpenAI envelope's, else gRPC's details."""
        code = exc.code() if hasattr(exc, "code") else None
        trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == "x-openai-error":
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    return str(json.loads(value)["error"]["message"])
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"cannot reach Sluice at {self.address} ({details}); is SLUICE_ADDRESS right?"
        return str(details or code)

    def upload(self, path: Path, advance: Callable[[int], None]) -> Any:
        """Stream the file as the multipart/form-data body UploadFile expects, ≤1 MiB a message."""
        try:
            return self.files.UploadFile(upload_messages(path, advance), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise CliError(self.describe(exc)) from None

    def watch(self, batch_id: str) -> Iterator[Any]:
        """WatchBatch's events until the batch ends; reopens the stream if it ends early (a
        server restart): the first event of a new stream is the current state."""
        failures = 0
        while True:
            try:
                for event in self.batches.WatchBatch(batch_pb2.WatchBatchRequest(id=batch_id),
                                                     metadata=self.metadata):
                    failures = 0
                    yield event
                    if event.batch.status in TERMINAL:
                        return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) \
                        or failures >= RECONNECTS:
                    raise CliError(self.describe(exc)) from None
            failures += 1
            if failures > RECONNECTS:
                raise CliError(f"the watch stream of {batch_id} keeps ending early; giving up")
            time.sleep(min(0.5 * failures, 5.0))


def upload_messages(path: Path, advance: Callable[[int], None] = lambda _: None,
                    boundary: str | None = None) -> Iterator[file_pb2.UploadFileRequest]:
    boundary = boundary or f"sluice-{uuid.uuid4().hex}"
    name = path.name.replace('"', "%22").replace("\r", "").replace("\n", "")
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode()
    yield file_pb2.UploadFileRequest(purpose="batch", body=httpbody_pb2.HttpBody(
        content_type=f"multipart/form-data; boundary={boundary}", data=head))
    with path.open("rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            yield file_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(data=chunk))
            advance(len(chunk))
    yield file_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(data=f"\r\n--{boundary}--\r\n".encode()))


# --------------------------------------------------------------------------- output


def as_json(message: Message) -> Any:
    return plain_json(json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True))


def _when(seconds: int, short: bool = False) -> str:
    """Local time; `short` (listings): to the minute."""
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S") \
        if seconds else ""


def _cost(value: float) -> str:
    return f"${value:.6f}".rstrip("0").rstrip(".") if value else "$0"


def _table(*headers: str) -> Table:
    return Table(*(Column(h, no_wrap=True) for h in headers), box=box.SIMPLE_HEAD, pad_edge=False,
                 collapse_padding=True)


class Out:
    """stdout for answers, stderr for progress and errors; `json` switches tables off."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self.stdout = Console(soft_wrap=True)
        if not self.stdout.is_terminal:  # a file or a pipe: no 80-column wrapping of tables
            self.stdout = Console(soft_wrap=True, width=200)
        self.stderr = Console(stderr=True)

    def table(self, table: Table) -> None:
        """At its natural width, even wider than the terminal (which then wraps the lines, as
        kubectl's do): ids are for copying, never cut or folded."""
        natural = Measurement.get(self.stdout, self.stdout.options.update_width(10_000), table).maximum
        console = self.stdout if natural <= self.stdout.width else Console(soft_wrap=True, width=natural)
        console.print(table)

    def say(self, text: str) -> None:
        """A plain line on stderr (never wrapped or styled: scripts and tests read it)."""
        print(text, file=sys.stderr, flush=True)

    def emit(self, data: Any) -> None:
        print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)

    def progress(self, *columns: Any) -> Progress:
        return Progress(*columns, console=self.stderr, disable=self.json)

    def batch(self, batch: Any) -> None:
        if self.json:
            self.emit(as_json(batch))
            return
        counts, usage = batch.request_counts, batch.usage
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        rows = [
            ("id", batch.id), ("status", batch.status), ("endpoint", batch.endpoint),
            ("model", batch.model if batch.HasField("model") else ""), ("provider", batch.provider),
            ("requests", f"{counts.completed} completed, {counts.failed} failed, {counts.total} total"),
            ("tokens", f"{usage.input_tokens} in, {usage.output_tokens} out, {usage.total_tokens} total"),
            ("cost", _cost(usage.total_cost)), ("input file", batch.input_file_id),
            ("output file", batch.output_file_id if batch.HasField("output_file_id") else ""),
            ("error file", batch.error_file_id if batch.HasField("error_file_id") else ""),
            ("created", _when(batch.created_at)),
        ]
        if batch.HasField("retry_of"):
            rows.append(("retry of", batch.retry_of))
        if batch.retries:
            rows.append(("retried by", ", ".join(batch.retries)))
        if len(batch.parts) > 1:
            for part in batch.parts:
                pc = part.request_counts
                where = f" as {part.provider_batch_id}" if part.HasField("provider_batch_id") else ""
                rows.append((f"part {part.part}", f"{part.provider}{where}: {part.status}, "
                             f"{pc.completed + pc.failed}/{pc.total} done, {pc.failed} failed"))
        for stamp in ("in_progress_at", "completed_at", "failed_at", "expired_at", "cancelled_at"):
            if batch.HasField(stamp):
                rows.append((stamp.removesuffix("_at").replace("_", " "), _when(getattr(batch, stamp))))
        for error in batch.errors.data if batch.HasField("errors") else ():
            where = f"line {error.line}: " if error.HasField("line") else ""
            rows.append(("error", f"{where}{error.message} ({error.code})"))
        for key, value in rows:
            if value:
                table.add_row(key, str(value))
        self.stdout.print(table)

    def batches(self, page: Any) -> None:
        if self.json:
            self.emit(as_json(page))
            return
        table = _table("ID", "STATUS", "MODEL", "DONE", "FAILED", "TOKENS", "COST", "CREATED")
        for b in page.data:
            counts = b.request_counts
            table.add_row(b.id, b.status, b.model if b.HasField("model") else "",
                          f"{counts.completed + counts.failed}/{counts.total}", str(counts.failed),
                          str(b.usage.total_tokens), _cost(b.usage.total_cost), _when(b.created_at, short=True))
        self.table(table)
        if page.has_more:
            self.say(f"more: --after {page.last_id}")

    def files(self, files: list[Any], has_more: bool = False) -> None:
        table = _table("ID", "FILENAME", "PURPOSE", "BYTES", "STATUS", "CREATED")
        for f in files:
            table.add_row(f.id, f.filename, f.purpose, str(f.bytes), f.status, _when(f.created_at, short=True))
        self.table(table)
        if has_more and files:
            self.say(f"more: --after {files[-1].id}")


# --------------------------------------------------------------------------- commands


def _endpoint_of(path: Path) -> str:
    """The `url` of the file's first request line: what `--endpoint` defaults to."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                if isinstance(url, str) and url in SUPPORTED_ENDPOINTS:
                    return url
                break
    raise CliError(f"cannot tell the endpoint from the first line of {path}; pass --endpoint "
                   f"({', '.join(SUPPORTED_ENDPOINTS)})")


def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata takes key=value, got {pair!r}")
        out[key] = value
    return out


def cmd_batches_create(api: Api, out: Out, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such file: {path}")  # before reading its first line
    endpoint = args.endpoint or _endpoint_of(path)
    uploaded = _upload(api, out, path)
    request = batch_pb2.CreateBatchRequest(input_file_id=uploaded.id, endpoint=endpoint,
                                           completion_window=args.completion_window)
    return _create(api, out, api.batches.CreateBatch, request, args,
                   lambda batch: f"uploaded {path.name} as {uploaded.id}\ncreated batch {batch.id}")


def cmd_batches_retry(api: Api, out: Out, args: argparse.Namespace) -> int:
    """RetryBatch: a new batch of the lines of an ended batch that did not succeed."""
    request = batch_pb2.RetryBatchRequest(id=args.id, outcomes=args.outcome, custom_ids=args.custom_id,
                                          model=args.model or "")
    return _create(api, out, api.batches.RetryBatch, request, args,
                   lambda batch: f"created batch {batch.id} retrying {args.id} ({batch.request_counts.total} lines)")


def _create(api: Api, out: Out, rpc: Callable[..., Any], request: Any, args: argparse.Namespace,
            announce: Callable[[Any], str]) -> int:
    """Make a batch (with the `--metadata` given), say so on stderr, then follow it to its end
    (`--watch`) or show it as it is."""
    if args.metadata:
        request.metadata.update(_metadata(args.metadata))
    batch = api.call(rpc, request)
    if not out.json:
        out.say(announce(batch))
    if args.watch:
        return _watch(api, out, batch.id)
    out.batch(batch)
    return 0


def _watch(api: Api, out: Out, batch_id: str) -> int:
    """A live progress bar from WatchBatch until the batch ends, then the batch."""
    last = None
    with out.progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn()) as progress:
        task = progress.add_task(batch_id, total=None, detail="")
        for event in api.watch(batch_id):
            last = b = event.batch
            counts, usage = b.request_counts, b.usage
            progress.update(task, description=b.status, total=counts.total or None,
                            completed=counts.completed + counts.failed,
                            detail=f"{counts.failed} failed · {usage.total_tokens} tokens · {_cost(usage.total_cost)}")
    assert last is not None
    out.batch(last)
    if last.status != "completed":
        out.say(f"sluice: batch {last.id} ended {last.status}")
        return 1
    return 0


def cmd_batches_watch(api: Api, out: Out, args: argparse.Namespace) -> int:
    return _watch(api, out, args.id)


def cmd_batches_list(api: Api, out: Out, args: argparse.Namespace) -> int:
    request = batch_pb2.ListBatchesRequest(after=args.after or "")
    if args.limit is not None:
        request.limit = args.limit
    out.batches(api.call(api.batches.ListBatches, request))
    return 0


def cmd_batches_get(api: Api, out: Out, args: argparse.Namespace) -> int:
    out.batch(api.call(api.batches.GetBatch, batch_pb2.GetBatchRequest(id=args.id)))
    return 0


def cmd_batches_cancel(api: Api, out: Out, args: argparse.Namespace) -> int:
    out.batch(api.call(api.batches.CancelBatch, batch_pb2.CancelBatchRequest(id=args.id)))
    return 0


def cmd_batches_results(api: Api, out: Out, args: argparse.Namespace) -> int:
    """Every stored result as one JSON line each, in request order, a page at a time."""
    batch = api.call(api.batches.GetBatch, batch_pb2.GetBatchRequest(id=args.id))
    target: IO[str]
    with contextlib.ExitStack() as stack:
        if args.output:
            target = stack.enter_context(open(args.output, "w", encoding="utf-8"))
        else:
            target = sys.stdout
        progress = stack.enter_context(out.progress(
            TextColumn("results of {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()))
        progress.disable = progress.disable or not args.output
        task = progress.add_task(batch.id, total=batch.request_counts.total or None)
        after, written = "", 0
        while True:
            page = api.call(api.batches.ListBatchResults,
                            batch_pb2.ListBatchResultsRequest(id=batch.id, limit=RESULTS_PAGE, after=after))
            for result in page.data:
                target.write(json.dumps(as_json(result), ensure_ascii=False, separators=(",", ":")) + "\n")
            written += len(page.data)
            progress.advance(task, len(page.data))
            if not page.has_more:
                break
            after = page.next_cursor
    if args.output and not out.json:
        out.say(f"wrote {written} results of {batch.id} ({batch.status}) to {args.output}")
    return 0


def _upload(api: Api, out: Out, path: Path) -> Any:
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    with out.progress(TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn()) as progress:
        task = progress.add_task(path.name, total=path.stat().st_size)
        return api.upload(path, lambda n: progress.advance(task, n))


def cmd_files_upload(api: Api, out: Out, args: argparse.Namespace) -> int:
    uploaded = _upload(api, out, Path(args.file))
    if out.json:
        out.emit(as_json(uploaded))
    else:
        out.files([uploaded])
    return 0


def cmd_files_list(api: Api, out: Out, args: argparse.Namespace) -> int:
    request = file_pb2.ListFilesRequest(purpose=args.purpose or "", after=args.after or "")
    if args.limit is not None:
        request.limit = args.limit
    page = api.call(api.files.ListFiles, request)
    if out.json:
        out.emit(as_json(page))
    else:
        out.files(list(page.data), page.has_more)
    return 0


def cmd_files_get(api: Api, out: Out, args: argparse.Namespace) -> int:
    file = api.call(api.files.GetFile, file_pb2.GetFileRequest(id=args.id))
    if out.json:
        out.emit(as_json(file))
    else:
        out.files([file])
    return 0


def cmd_files_delete(api: Api, out: Out, args: argparse.Namespace) -> int:
    deleted = api.call(api.files.DeleteFile, file_pb2.DeleteFileRequest(id=args.id))
    if out.json:
        out.emit(as_json(deleted))
    else:
        out.stdout.print(f"deleted {deleted.id}")
    return 0


def cmd_files_content(api: Api, out: Out, args: argparse.Namespace) -> int:
    """The file's bytes, streamed to `-o` (with progress) or stdout."""
    file = api.call(api.files.GetFile, file_pb2.GetFileRequest(id=args.id))
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
        progress = stack.enter_context(out.progress(TextColumn("downloading {task.description}"), BarColumn(),
                                                    DownloadColumn(), TransferSpeedColumn()))
        progress.disable = progress.disable or not args.output
        task = progress.add_task(file.id, total=file.bytes)
        try:
            for piece in api.files.GetFileContent(file_pb2.GetFileContentRequest(id=args.id), metadata=api.metadata):
                target.write(piece.data)
                progress.advance(task, len(piece.data))
        except grpc.RpcError as exc:
            raise CliError(api.describe(exc)) from None
    return 0


# --------------------------------------------------------------------------- argparse


def add_commands(sub: Any) -> None:
    """Add `batches` and `files` to the `sluice` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")

    batches = sub.add_parser("batches", help="create, watch, list, cancel batches and fetch their results",
                             epilog=CLIENT_HELP, formatter_class=fmt)
    bsub = batches.add_subparsers(dest="action", required=True)
    making = argparse.ArgumentParser(add_help=False)  # the commands that make a batch
    making.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="metadata of the new batch (repeatable)")
    making.add_argument("--watch", action="store_true",
                        help="show live progress until the new batch ends; exit 1 unless it completed")
    create = bsub.add_parser("create", parents=[common, making], epilog=CLIENT_HELP, formatter_class=fmt,
                             help="upload a JSONL file of requests and create a batch from it")
    create.add_argument("file", metavar="FILE.jsonl", help="OpenAI batch input lines")
    create.add_argument("--endpoint", choices=SUPPORTED_ENDPOINTS,
                        help="the endpoint of every line (default: the first line's url)")
    create.add_argument("--completion-window", default="24h", help="24h (the only window)")
    create.set_defaults(handler=cmd_batches_create)
    retry = bsub.add_parser("retry", parents=[common, making], epilog=CLIENT_HELP, formatter_class=fmt,
                            help="create a batch of an ended batch's lines that did not succeed (default: "
                            "the failed and expired ones; --metadata default: the retried batch's)")
    retry.add_argument("id", metavar="BATCH_ID", help="the ended batch")
    retry.add_argument("--outcome", action="append", default=[], choices=RETRYABLE,
                       help="retry the lines that ended so (repeatable; default: failed and expired)")
    retry.add_argument("--custom-id", action="append", default=[], metavar="CUSTOM_ID",
                       help="retry exactly this line, whatever its outcome (repeatable; not with --outcome)")
    retry.add_argument("--model", help="run the retried lines on this model instead of their own")
    retry.set_defaults(handler=cmd_batches_retry)
    for name, handler, text in (("get", cmd_batches_get, "show one batch"),
                                ("cancel", cmd_batches_cancel, "cancel a batch (finished results are kept)"),
                                ("watch", cmd_batches_watch,
                                 "live progress until the batch ends; exit 1 unless it completed")):
        p = bsub.add_parser(name, parents=[common], help=text, epilog=CLIENT_HELP, formatter_class=fmt)
        p.add_argument("id", metavar="BATCH_ID")
        p.set_defaults(handler=handler)
    listing = bsub.add_parser("list", parents=[common], help="list batches, newest first", epilog=CLIENT_HELP,
                              formatter_class=fmt)
    listing.add_argument("--limit", type=int, help="1-100 (20)")
    listing.add_argument("--after", metavar="BATCH_ID", help="the last id of the previous page")
    listing.set_defaults(handler=cmd_batches_list)
    results = bsub.add_parser("results", parents=[common], epilog=CLIENT_HELP, formatter_class=fmt,
                              help="every stored result as JSON lines, in request order")
    results.add_argument("id", metavar="BATCH_ID")
    results.add_argument("-o", "--output", metavar="FILE", help="write to FILE (with progress) instead of stdout")
    results.set_defaults(handler=cmd_batches_results)

    files = sub.add_parser("files", help="upload, list, show, download and delete files", epilog=CLIENT_HELP,
                           formatter_class=fmt)
    fsub = files.add_subparsers(dest="action", required=True)
    upload = fsub.add_parser("upload", parents=[common], help="upload a JSONL batch input file",
                             epilog=CLIENT_HELP, formatter_class=fmt)
    upload.add_argument("file", metavar="FILE.jsonl")
    upload.set_defaults(handler=cmd_files_upload)
    flist = fsub.add_parser("list", parents=[common], help="list files, newest first", epilog=CLIENT_HELP,
                            formatter_class=fmt)
    flist.add_argument("--purpose", help="only files with this purpose (batch, batch_output)")
    flist.add_argument("--limit", type=int)
    flist.add_argument("--after", metavar="FILE_ID")
    flist.set_defaults(handler=cmd_files_list)
    for name, handler, text in (("get", cmd_files_get, "show one file"),
                                ("delete", cmd_files_delete, "delete a file")):
        p = fsub.add_parser(name, parents=[common], help=text, epilog=CLIENT_HELP, formatter_class=fmt)
        p.add_argument("id", metavar="FILE_ID")
        p.set_defaults(handler=handler)
    content = fsub.add_parser("content", parents=[common], help="download a file's bytes", epilog=CLIENT_HELP,
                              formatter_class=fmt)
    content.add_argument("id", metavar="FILE_ID")
    content.add_argument("-o", "--output", metavar="FILE", help="write to FILE (with progress) instead of stdout")
    content.set_defaults(handler=cmd_files_content)


def run(args: argparse.Namespace, settings: ClientSettings | None = None,
        wrap: Callable[[Api], Any] = lambda api: api) -> int:
    """Run the parsed command's handler with `wrap(Api)` (`sluice admin` wraps it in its own)."""
    out = Out(getattr(args, "json", False))
    try:
        api = Api(settings or ClientSettings.from_env())
    except CliError as exc:
        out.say(f"sluice: {exc}")
        return 2
    try:
        code: int = args.handler(wrap(api), out, args)
        return code
    except CliError as exc:
        out.say(f"sluice: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        api.close()

"""Upload benchmark: a big JSONL batch file through Envoy into Sluice with the openai SDK.

    .venv/bin/python bench/upload.py                      # 50,000 lines of ~2,000 bytes (~100 MB)
    .venv/bin/python bench/upload.py --lines 1000 --line-bytes 500 --keep

Generates the file on disk line by line (never in memory), starts the real stack (`sluice run`
as a child process: grpc.aio server + engine + Envoy, on a temporary SQLite database, the sim
provider answering at once), then times each phase: upload (files.create with an open file, so
the SDK streams it), create (batches.create), run to completion (polling batches.retrieve),
download of the uploaded file and of the output file (streamed). Last it prints the peak RSS
(VmHWM) of the server process and of the Envoy process. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from tests.e2e import KEY_A, start_stack, vm_bytes  # noqa: E402

MB = 1_000_000


def generate(path: Path, lines: int, line_bytes: int) -> int:
    """Write `lines` chat requests of about `line_bytes` bytes each; return the file size."""
    skeleton = {"custom_id": "", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 16,
                         "messages": [{"role": "user", "content": ""}]}}
    base = len(json.dumps(skeleton)) + 1 + len("r0000000")
    pad = "lorem ipsum " * (max(line_bytes - base, 0) // 12 + 1)
    size = 0
    with open(path, "w") as out:
        for i in range(lines):
            skeleton["custom_id"] = f"r{i:07d}"
            skeleton["body"]["messages"][0]["content"] = pad[: max(line_bytes - base, 1)]  # type: ignore[index]
            text = json.dumps(skeleton) + "\n"
            out.write(text)
            size += len(text)
    return size


def download(client: openai.OpenAI, file_id: str) -> int:
    """Stream a file's content, counting bytes; nothing is kept."""
    size = 0
    with client.files.with_streaming_response.content(file_id) as response:
        for chunk in response.iter_bytes(1 << 16):
            size += len(chunk)
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000, help="request lines in the file (50000)")
    parser.add_argument("--line-bytes", type=int, default=2_000, help="bytes of each line, about (2000)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file, database and logs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    try:
        path = work / "input.jsonl"
        t = time.monotonic()
        size = generate(path, args.lines, args.line_bytes)
        print(f"file      {path}: {args.lines} lines, {size / MB:.1f} MB (generated in {time.monotonic() - t:.1f}s)")
        with start_stack(work / "stack", f"sqlite+aiosqlite:///{work}/stack/sluice.db", timeout=60) as stack:
            server_pid, envoy_pid = stack.proc.pid, stack.envoy_pid
            print(f"stack     REST {stack.base_url}, server pid {server_pid}, envoy pid {envoy_pid}; "
                  f"RSS at start: server {vm_bytes(server_pid, 'VmRSS') / MB:.0f} MB, "
                  f"envoy {vm_bytes(envoy_pid, 'VmRSS') / MB:.0f} MB")
            client = openai.OpenAI(base_url=stack.base_url, api_key=KEY_A, max_retries=0, timeout=600)

            t = time.monotonic()
            with open(path, "rb") as fh:  # an open file streams; a Path would be read whole by the SDK
                uploaded = client.files.create(file=fh, purpose="batch")
            upload_s = time.monotonic() - t
            assert uploaded.bytes == size, (uploaded.bytes, size)
            upload_hwm = vm_bytes(server_pid, "VmHWM"), vm_bytes(envoy_pid, "VmHWM")

            t = time.monotonic()
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            create_s = time.monotonic() - t

            t = time.monotonic()
            deadline = t + 1800
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"batch {batch.id} still {batch.status} after 30 min")
                time.sleep(0.2)
                batch = client.batches.retrieve(batch.id)
            run_s = time.monotonic() - t
            if batch.status != "completed" or batch.output_file_id is None:
                raise SystemExit(f"batch ended {batch.status}: {batch.errors}")

            t = time.monotonic()
            got = download(client, uploaded.id)
            down_in_s = time.monotonic() - t
            assert got == size, (got, size)
            t = time.monotonic()
            out_size = download(client, batch.output_file_id)
            down_out_s = time.monotonic() - t
            hwm_server, hwm_envoy = vm_bytes(server_pid, "VmHWM"), vm_bytes(envoy_pid, "VmHWM")

        counts = batch.request_counts
        print(f"upload    {upload_s:7.2f}s  {size / MB / upload_s:6.1f} MB/s  ({uploaded.id})")
        print(f"create    {create_s:7.2f}s  ({batch.id}, {args.lines / create_s:,.0f} lines/s checked and queued)")
        print(f"run       {run_s:7.2f}s  to completed ({counts.completed if counts else '?'} completed, "
              f"{counts.failed if counts else '?'} failed)")
        print(f"download  {down_in_s:7.2f}s  {size / MB / down_in_s:6.1f} MB/s  (the uploaded file)")
        print(f"download  {down_out_s:7.2f}s  {out_size / MB / down_out_s:6.1f} MB/s  "
              f"(the output file, {out_size / MB:.1f} MB)")
        print(f"peak RSS  after the upload: server {upload_hwm[0] / MB:.0f} MB, envoy {upload_hwm[1] / MB:.0f} MB; "
              f"at the end: server {hwm_server / MB:.0f} MB, envoy {hwm_envoy / MB:.0f} MB "
              f"(VmHWM; the file is {size / MB:.0f} MB)")
    finally:
        if args.keep:
            print(f"kept      {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: Sluice and LiteLLM's proxy side by side, on loopback, in one run.

    .venv/bin/python bench/bench.py                      # every measurement, 3 rounds, SQLite
    .venv/bin/python bench/bench.py --postgres           # the same on a throwaway PostgreSQL
    .venv/bin/python bench/bench.py --rounds 1 --only ingest,paging --profile   # py-spy on the server
    .venv/bin/python bench/bench.py --rounds 1 --no-peer --only ingest,executor,download   # Sluice alone

Each round starts a fresh `sluice run` (grpc.aio server + engine + Envoy, the `sim` provider answering
at once) and a fresh LiteLLM proxy (`litellm[proxy]`, pinned, in its own virtualenv under
var/bench/, which this script creates; never a project dependency) pointed at a loopback OpenAI
Files + Batches stand-in (bench/standin.py, in its own process). Where both apply the two are
measured alternately, the same client (the official openai SDK) against each. Then it prints one
table: median, min and max over the rounds, the peak RSS (VmHWM, reset before each measurement
through /proc/<pid>/clear_refs) of each server process, the CPU time the Sluice server spent, Sluice /
LiteLLM, and the target of issue #13. The scale curve (10k, 50k, 200k lines) runs on a server of its
own with the line limit raised by configuration (SLUICE_MAX_BATCH_REQUESTS).

Every request goes to 127.0.0.1; every loop is bounded in count and time. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402

from sluice.v1 import batch_pb2, batch_pb2_grpc  # noqa: E402
from tests.e2e import KEY_A, Stack, child_pids, free_port, start_stack, vm_bytes  # noqa: E402

VAR = ROOT / "var" / "bench"
LITELLM_VERSION = "1.106.2"  # the version the peer set-up was verified with (shared reference notes)
PYSPY_VERSION = "0.4.3"
MB = 1_000_000
TERMINAL = ("completed", "failed", "expired", "cancelled")
MASTER_KEY = "sk-master-bench"
MEASUREMENTS = ("start", "ingest", "ingest200", "executor", "download", "paging", "getbatch", "scale")
WRK_HINT = "install Debian's wrk with `sudo apt-get install -y wrk` (or skip it: --only without getbatch)"


# --------------------------------------------------------------------------- tools


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def venv_tool(name: str, spec: str, binary: str) -> Path:
    """A virtualenv of its own under var/bench/ holding `spec` (created once, reused)."""
    venv = VAR / name
    exe = venv / "bin" / binary
    stamp = venv / f".installed-{spec.replace('/', '_')}"
    if not stamp.exists():
        print(f"installing {spec} into {venv} (once)...", flush=True)
        if not (venv / "bin" / "python").exists():
            run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", spec])
        stamp.touch()
    return exe


def ensure_wrk() -> str:
    """Debian's wrk; when missing, an attempt with apt-get (as root, or through sudo without a
    password), and otherwise a stop that says how to install it."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise SystemExit(f"wrk is not installed: {WRK_HINT}")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print("wrk is not installed: trying `apt-get install -y wrk`...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with contextlib.suppress(OSError):
        if subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "wrk"], env=env, capture_output=True).returncode:
            subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "wrk"], env=env, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit(f"wrk is not installed and apt-get could not install it: {WRK_HINT}")
    return found


# --------------------------------------------------------------------------- data


def generate(lines: int, line_bytes: int) -> Path:
    """A JSONL batch file of `lines` chat requests of about `line_bytes` bytes, written line by line
    once and reused (var/bench/data/)."""
    path = VAR / "data" / f"chat-{lines}x{line_bytes}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    skeleton: dict[str, Any] = {"custom_id": "", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-4o-mini", "max_tokens": 16,
                                         "messages": [{"role": "user", "content": ""}]}}
    base = len(json.dumps(skeleton)) + 1 + len("r0000000")
    pad = "lorem ipsum " * (max(line_bytes - base, 0) // 12 + 1)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        for i in range(lines):
            skeleton["custom_id"] = f"r{i:07d}"
            skeleton["body"]["messages"][0]["content"] = pad[: max(line_bytes - base, 1)]
            out.write(json.dumps(skeleton) + "\n")
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------- processes


def tree(pid: int) -> list[int]:
    pids = [pid]
    for child in child_pids(pid):
        pids.extend(tree(child))
    return pids


def reset_peak(pids: list[int]) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `5` in clear_refs)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_mb(pids: list[int], field: str = "VmHWM") -> float:
    """Peak (or with field="VmRSS" current) resident memory of the processes, summed, in MB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, KeyError):
            total += vm_bytes(pid, field)
    return total / MB


def cpu_s(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far: less sensitive to a busy machine
    than wall time, so it shows whether a change made the server cheaper."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    return peak_mb(pids, "VmRSS")


class Fake:
    """The OpenAI Files + Batches stand-in behind LiteLLM, in its own process: bench/standin.py
    (stores the upload as it arrives, checks nothing), or with kind="provider-fake" tests/provider_fake
    (checks every line, and is much slower on a 100 MB file: see standin.py)."""

    def __init__(self, kind: str, work: Path) -> None:
        command = (["-m", "tests.provider_fake", "--port", "0"] if kind == "provider-fake"
                   else [str(ROOT / "bench" / "standin.py"), "--port", "0", "--dir", str(work)])
        self.proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"provider fake did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/openai/v1"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@dataclass
class LiteLLM:
    proc: subprocess.Popen[bytes]
    port: int
    started_s: float
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_litellm(exe: Path, fake: Fake, work: Path, timeout: float = 180) -> LiteLLM:
    """LiteLLM's proxy as in the shared reference notes (files_settings + a model on the stand-in)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    upstream = {"api_base": fake.base_url, "api_key": "fake-openai-key"}
    config = {"model_list": [{"model_name": "gpt-4o-mini",
                              "litellm_params": {"model": "openai/gpt-4o-mini", **upstream}}],
              "general_settings": {"master_key": MASTER_KEY},
              "files_settings": [{"custom_llm_provider": "openai", **upstream}]}
    (work / "litellm.yaml").write_text(json.dumps(config))  # JSON is YAML
    log = work / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR"}
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
                                 "--port", str(port), "--num_workers", "1"], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = t0 + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"litellm not ready within {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    return LiteLLM(proc, port, time.monotonic() - t0, log)


@contextlib.contextmanager
def sluice(work: Path, database_url: str, **env: str) -> Iterator[tuple[Stack, float]]:
    """A fresh `sluice run` (tests/e2e.py's launcher); yields it and its cold start to REST ready."""
    t0 = time.monotonic()
    # The engine at its default pace (tests/e2e.py makes it tick every 50 ms), the sim answering at once.
    env = {"SLUICE_ENGINE_TICK_SECONDS": "0.5", "SLUICE_POLL_SECONDS": "5", **env}
    with start_stack(work, database_url, timeout=120, **env) as stack:
        yield stack, time.monotonic() - t0


class Profiler:
    """py-spy (in var/bench/pyspy) recording one server process during one measurement."""

    def __init__(self, enabled: bool, out_dir: Path) -> None:
        self.exe = venv_tool("pyspy", f"py-spy=={PYSPY_VERSION}", "py-spy") if enabled else None
        self.out_dir = out_dir

    @contextlib.contextmanager
    def record(self, name: str, pid: int) -> Iterator[None]:
        if self.exe is None:
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.txt"
        proc = subprocess.Popen([str(self.exe), "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                 "--threads", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if out.exists():
                print(summarize_profile(out, name), flush=True)


def summarize_profile(path: Path, name: str, top: int = 18) -> str:
    """Where the samples went: inclusive share per function (and file), and per thread."""
    inclusive: dict[str, int] = defaultdict(int)
    own: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        threads[frames[0]] += count
        names = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]
        for frame in set(names):
            inclusive[frame] += count
        if names:
            own[names[-1]] += count
    lines = [f"--- profile {name}: {total} samples ({path})"]
    for label, table in (("threads", threads), ("inclusive", inclusive), ("self", own)):
        lines.append(f"  {label}:")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * count / max(total, 1):5.1f}%  {frame[:150]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurements


@dataclass
class Row:
    label: str
    unit: str
    target: str = ""
    higher_is_better: bool = False
    sluice: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    sluice_rss: list[float] = field(default_factory=list)
    peer_rss: list[float] = field(default_factory=list)
    envoy_rss: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # the server's CPU for it: s, or us per item
    cpu_unit: str = ""


# key -> (label, unit, target, higher is better); the table's rows, in this order.
ROWS: dict[str, tuple[str, str, str, bool]] = {
    "ingest": ("upload + create, 50,000 lines, 100 MB", "s", "≤ 1.0 and ≤ 0.5 x LiteLLM", False),
    "ingest.upload": ("  of which upload (files.create)", "s", "", False),
    "ingest.create": ("  of which create (batches.create)", "s", "", False),
    "standin": ("  the stand-in alone (no gateway)", "s", "", False),
    "ingest200": ("upload + create, 50,000 lines, 200 MB", "s", "peak ≤ 150 MB, flat", False),
    "ingest200.upload": ("  of which upload (files.create)", "s", "", False),
    "ingest200.create": ("  of which create (batches.create)", "s", "", False),
    "rest": ("page all 50,000 results, REST (Envoy, httpx)", "results/s", "≥ 20,000", True),
    "grpc": ("page all 50,000 results, gRPC", "results/s", "≥ 50,000", True),
    "wrk": ("GET /v1/batches/{id} through Envoy, wrk 8 connections", "req/s", "≥ 2,000", True),
    "wrk.p50": ("  p50 latency", "ms", "≤ 2", False),
    "executor": ("sim batch to completed, 50,000 lines, output file included", "lines/s", "≥ 15,000", True),
    "download.input": ("download the uploaded 100 MB file (streamed)", "MB/s", "", True),
    "download.output": ("download that batch's output file (streamed)", "MB/s", "", True),
    "idle": ("idle RSS (server; LiteLLM)", "MB", "≤ 80", False),
    "idle.envoy": ("  Envoy idle RSS", "MB", "", False),
    "cold": ("cold start to REST ready", "s", "≤ 1.0", False),
}


class Results:
    """Every figure of the run, by row key (ROWS, then one row per line count of the scale curve)."""

    def __init__(self, scale: list[int]) -> None:
        rows = dict(ROWS)
        for n in scale:
            rows[f"scale{n}"] = (f"scale: upload + create, {n:,} lines of 1 kB", "s", "linear", False)
        self.rows = {key: Row(label, unit, target, better) for key, (label, unit, target, better) in rows.items()}
        for key, row in self.rows.items():
            row.cpu_unit = {"rest": "us/result", "grpc": "us/result", "wrk": "us/request",
                            "executor": "us/line"}.get(key, "s")

    def __getitem__(self, key: str) -> Row:
        return self.rows[key]


def sdk(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 900, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {batch_id} still {batch.status} after {timeout}s")
        time.sleep(every)


def download(client: openai.OpenAI, file_id: str) -> int:
    """Stream a file's content through Envoy, counting bytes; nothing is kept."""
    size = 0
    with client.files.with_streaming_response.content(file_id) as response:
        for chunk in response.iter_bytes(1 << 16):
            size += len(chunk)
    return size


def sluice_ingest(stack: Stack, path: Path, lines: int, profile: Any = None,
                  cancel: bool = True) -> tuple[float, float, float, float, float]:
    """files.create + batches.create through Envoy: (upload s, create s, server and Envoy peak MB,
    server CPU s)."""
    client = sdk(stack.base_url, KEY_A)
    server, envoy = tree(stack.proc.pid), [stack.envoy_pid]
    server = [p for p in server if p != stack.envoy_pid]
    reset_peak(server + envoy)
    cpu0 = cpu_s(server)
    with profile or contextlib.nullcontext():
        t0 = time.monotonic()
        with open(path, "rb") as fh:
            uploaded = client.files.create(file=fh, purpose="batch")
        t1 = time.monotonic()
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        t2 = time.monotonic()
    cpu = cpu_s(server) - cpu0
    peak, envoy_peak = peak_mb(server), peak_mb(envoy)
    if batch.status == "failed" or batch.request_counts is None or batch.request_counts.total != lines:
        raise RuntimeError(f"ingest went wrong: {batch}")
    if cancel:  # the engine would run it meanwhile: stop it before the next measurement
        with contextlib.suppress(openai.APIStatusError):
            client.batches.cancel(batch.id)
        batch = wait_terminal(client, batch.id)
    client.close()
    return t1 - t0, t2 - t1, peak, envoy_peak, cpu


def peer_ingest(base_url: str, key: str, path: Path, pids: list[int], routed: bool) -> tuple[float, float]:
    """The same two SDK calls against LiteLLM (with its routing hint) or the stand-in itself."""
    client = sdk(base_url, key)
    extra = {"extra_body": {"custom_llm_provider": "openai"}} if routed else {}
    reset_peak(pids)
    t0 = time.monotonic()
    with open(path, "rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch", **extra)
    client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                          **extra)
    elapsed = time.monotonic() - t0
    client.close()
    return elapsed, peak_mb(pids)


def page_rest(stack: Stack, batch_id: str, expected: int) -> float:
    """Every result over REST through Envoy, 1,000 a page (httpx, JSON parsed): results/s."""
    seen, after = 0, ""
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=120) as client:
        t0 = time.monotonic()
        for _ in range(expected // 1000 + 2):
            params = {"limit": 1000, **({"after": after} if after else {})}
            page = client.get(f"/v1/batches/{batch_id}/results", params=params).raise_for_status().json()
            seen += len(page["data"])
            if not page["has_more"]:
                break
            after = page["next_cursor"]
        elapsed = time.monotonic() - t0
    if seen != expected:
        raise RuntimeError(f"REST paging saw {seen} results, expected {expected}")
    return expected / elapsed


def page_grpc(stack: Stack, batch_id: str, expected: int) -> float:
    """Every result over gRPC straight to the server, 1,000 a page: results/s."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    seen, after = 0, ""
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}", options=options) as channel:
        stub = batch_pb2_grpc.BatchServiceStub(channel)
        md = (("authorization", f"Bearer {KEY_A}"),)
        t0 = time.monotonic()
        for _ in range(expected // 1000 + 2):
            page = stub.ListBatchResults(batch_pb2.ListBatchResultsRequest(id=batch_id, limit=1000, after=after),
                                         metadata=md, timeout=120)
            seen += len(page.data)
            if not page.has_more:
                break
            after = page.next_cursor
        elapsed = time.monotonic() - t0
    if seen != expected:
        raise RuntimeError(f"gRPC paging saw {seen} results, expected {expected}")
    return expected / elapsed


def wrk_get_batch(wrk: str, stack: Stack, batch_id: str, seconds: int) -> tuple[float, float]:
    """`wrk -c8` on GET /v1/batches/{id} through Envoy: (requests/s, p50 ms)."""
    out = run([wrk, "-t2", "-c8", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {KEY_A}",
               f"{stack.url}/v1/batches/{batch_id}"], capture_output=True, timeout=seconds + 60).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p50 = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    return rps, p50


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="run Sluice on a throwaway PostgreSQL")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"subset of {','.join(MEASUREMENTS)}")
    parser.add_argument("--no-peer", action="store_true", help="skip LiteLLM (and its install)")
    parser.add_argument("--scale", default="10000,50000,200000", help="line counts of the scale curve")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="record the server with py-spy (var/bench/profiles)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--standin", choices=("fast", "provider-fake"), default="fast",
                        help="LiteLLM's upstream: bench/standin.py (default) or tests/provider_fake")
    parser.add_argument("--keep", action="store_true", help="keep each round's databases and logs (var/bench/run-*)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    unknown = only - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurements: {', '.join(sorted(unknown))}")
    scale = [int(n) for n in args.scale.split(",") if n]

    VAR.mkdir(parents=True, exist_ok=True)
    litellm_exe = None if args.no_peer else venv_tool("litellm-venv", f"litellm[proxy]=={LITELLM_VERSION}",
                                                      "litellm")
    wrk = ensure_wrk() if "getbatch" in only else ""
    profiler = Profiler(args.profile, VAR / "profiles")
    file100 = generate(50_000, 2_000)
    file200 = generate(50_000, 4_000) if "ingest200" in only else None
    scale_files = {n: generate(n, 1_000) for n in scale} if "scale" in only else {}
    res = Results(scale if "scale" in only else [])
    work_root = Path(tempfile.mkdtemp(prefix="run-", dir=VAR))
    # The scale curve's server only: past OpenAI's 50,000 lines, raised by configuration.
    scale_env = {"SLUICE_MAX_BATCH_REQUESTS": str(max(scale))} if scale and max(scale) > 50_000 else {}
    started = datetime.datetime.now(datetime.UTC)
    t_start, load_start = time.monotonic(), os.getloadavg()
    pg_ctx: Any = contextlib.nullcontext()
    if args.postgres:
        from tests.pg_server import PostgresServer
        pg_ctx = PostgresServer(database="bench")
    fake = None if args.no_peer else Fake(args.standin, work_root / "standin")
    try:
        with pg_ctx as pg:
            for rnd in range(1, args.rounds + 1):
                print(f"=== round {rnd}/{args.rounds}", flush=True)
                work = work_root / f"r{rnd}"
                if pg is not None:
                    url = pg.create_database(f"bench_r{rnd}")
                else:
                    url = f"sqlite+aiosqlite:///{work}/sluice.db"
                peer = None
                if litellm_exe is not None and fake is not None and only & {"start", "ingest", "ingest200"}:
                    peer = start_litellm(litellm_exe, fake, work / "litellm")
                try:
                    if only - {"scale"}:
                        with sluice(work / "stack", url) as (stack, cold):
                            one_round(args, only, res, stack, cold, peer, fake, profiler, wrk, file100, file200)
                finally:
                    if peer is not None:
                        peer.stop()
                if scale_files:  # on a server of its own, so no earlier measurement's memory counts
                    url = (pg.create_database(f"bench_s{rnd}") if pg is not None
                           else f"sqlite+aiosqlite:///{work}/scale.db")
                    with sluice(work / "scale", url, **scale_env) as (stack, _):
                        scale_curve(res, stack, profiler, scale_files)
    finally:
        if fake is not None:
            fake.stop()
    table = render(res, args, started, load_start)
    print(table)
    print(f"\n{time.monotonic() - t_start:.0f} s in all (data generation and installs included)")
    if args.json:
        args.json.write_text(json.dumps({k: vars(v) for k, v in res.rows.items()}, indent=1))
    if args.keep:
        print(f"kept {work_root}")
    else:
        shutil.rmtree(work_root, ignore_errors=True)
    return 0


def one_round(args: Any, only: set[str], res: Results, stack: Stack, cold: float, peer: LiteLLM | None,
              fake: Fake | None, profiler: Profiler, wrk: str, file100: Path, file200: Path | None) -> None:
    server = stack.proc.pid

    if "start" in only:
        time.sleep(2)  # settled
        res["cold"].sluice.append(cold)
        res["idle"].sluice.append(rss_mb([server]))
        res["idle.envoy"].sluice.append(rss_mb([stack.envoy_pid]))
        if peer is not None:
            res["cold"].peer.append(peer.started_s)
            res["idle"].peer.append(rss_mb(peer.pids))
        print(f"start     sluice {cold:.2f}s {rss_mb([server]):.0f} MB (envoy {rss_mb([stack.envoy_pid]):.0f} MB)"
              + (f"; litellm {peer.started_s:.1f}s {rss_mb(peer.pids):.0f} MB" if peer else ""), flush=True)

    def ingest(key: str, path: Path, lines: int) -> None:
        row = res[key]

        def ours() -> None:
            upload_s, create_s, peak, envoy_peak, cpu = sluice_ingest(
                stack, path, lines, profiler.record(f"{key}-{len(row.sluice) + 1}", server))
            row.sluice.append(upload_s + create_s)
            row.cpu.append(cpu)
            row.sluice_rss.append(peak)
            row.envoy_rss.append(envoy_peak)
            res[key + ".upload"].sluice.append(upload_s)
            res[key + ".create"].sluice.append(create_s)
            print(f"{key:9} sluice {upload_s + create_s:.2f}s (upload {upload_s:.2f}, create {create_s:.2f}) "
                  f"peak {peak:.0f} MB, envoy {envoy_peak:.0f} MB, server CPU {cpu:.2f} s", flush=True)

        def theirs() -> None:
            assert peer is not None
            elapsed, peak = peer_ingest(peer.base_url, MASTER_KEY, path, peer.pids, routed=True)
            row.peer.append(elapsed)
            row.peer_rss.append(peak)
            print(f"{key:9} litellm {elapsed:.2f}s peak {peak:.0f} MB", flush=True)

        turns = [ours, theirs] if peer is not None else [ours]
        if len(row.sluice) % 2:  # alternate who goes first
            turns.reverse()
        for turn in turns:
            turn()
        if fake is not None and key == "ingest":
            alone, _ = peer_ingest(fake.base_url, "fake-openai-key", path, [fake.proc.pid], routed=False)
            res["standin"].peer.append(alone)

    if "ingest" in only:
        ingest("ingest", file100, 50_000)
    if "ingest200" in only and file200 is not None:
        ingest("ingest200", file200, 50_000)

    batch = None
    if only & {"executor", "download", "paging", "getbatch"}:
        client = sdk(stack.base_url, KEY_A)
        with open(file100, "rb") as fh:
            uploaded = client.files.create(file=fh, purpose="batch")
        cpu0 = cpu_s([server])
        with profiler.record(f"executor-{len(res['executor'].sluice) + 1}", server):
            t0 = time.monotonic()
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            batch = wait_terminal(client, batch.id, every=0.02)
            elapsed = time.monotonic() - t0
        counts = batch.request_counts
        if batch.status != "completed" or counts is None or counts.completed != 50_000 or not batch.output_file_id:
            raise RuntimeError(f"executor batch ended {batch.status}: {batch}")
        cpu = cpu_s([server]) - cpu0
        res["executor"].sluice.append(50_000 / elapsed)
        res["executor"].cpu.append(cpu / 50_000 * 1e6)
        print(f"executor  {elapsed:.2f}s  {50_000 / elapsed:,.0f} lines/s, server CPU {cpu:.2f} s", flush=True)

        if "download" in only:  # the streamed downloads bench/upload.py timed; peak RSS shows they stream
            pids = [server, stack.envoy_pid]
            for key, file_id in (("download.input", uploaded.id), ("download.output", batch.output_file_id)):
                reset_peak(pids)
                cpu0 = cpu_s([server])
                t0 = time.monotonic()
                size = download(client, file_id)
                elapsed = time.monotonic() - t0
                row = res[key]
                row.sluice.append(size / MB / elapsed)
                row.cpu.append(cpu_s([server]) - cpu0)
                row.sluice_rss.append(peak_mb([server]))
                row.envoy_rss.append(peak_mb([stack.envoy_pid]))
                print(f"{key:15} {size / MB:.0f} MB in {elapsed:.2f}s, peak {row.sluice_rss[-1]:.0f} MB, "
                      f"envoy {row.envoy_rss[-1]:.0f} MB", flush=True)
        client.close()

    if "paging" in only and batch is not None:
        cpu0 = cpu_s([server])
        with profiler.record(f"paging-rest-{len(res['rest'].sluice) + 1}", server):
            rest = page_rest(stack, batch.id, 50_000)
        cpu1 = cpu_s([server])
        with profiler.record(f"paging-grpc-{len(res['grpc'].sluice) + 1}", server):
            grpc_rate = page_grpc(stack, batch.id, 50_000)
        res["rest"].cpu.append((cpu1 - cpu0) / 50_000 * 1e6)
        res["grpc"].cpu.append((cpu_s([server]) - cpu1) / 50_000 * 1e6)
        res["rest"].sluice.append(rest)
        res["grpc"].sluice.append(grpc_rate)
        print(f"paging    REST {rest:,.0f}/s  gRPC {grpc_rate:,.0f}/s", flush=True)

    if "getbatch" in only and batch is not None:
        cpu0 = cpu_s([server])
        with profiler.record(f"getbatch-{len(res['wrk'].sluice) + 1}", server):
            rps, p50 = wrk_get_batch(wrk, stack, batch.id, args.wrk_seconds)
        res["wrk"].cpu.append((cpu_s([server]) - cpu0) / (rps * args.wrk_seconds) * 1e6)
        res["wrk"].sluice.append(rps)
        res["wrk.p50"].sluice.append(p50)
        print(f"getbatch  {rps:,.0f} req/s  p50 {p50:.2f} ms", flush=True)



def scale_curve(res: Results, stack: Stack, profiler: Profiler, scale_files: dict[int, Path]) -> None:
    server = stack.proc.pid
    for lines, path in scale_files.items():
        key = f"scale{lines}"
        upload_s, create_s, peak, _, cpu = sluice_ingest(
            stack, path, lines, profiler.record(f"{key}-{len(res[key].sluice) + 1}", server))
        res[key].sluice.append(upload_s + create_s)
        res[key].cpu.append(cpu)
        res[key].sluice_rss.append(peak)
        print(f"{key:9} {upload_s + create_s:.2f}s (upload {upload_s:.2f}, create {create_s:.2f}) "
              f"{lines / (upload_s + create_s):,.0f} lines/s, peak {peak:.0f} MB", flush=True)



def _stats(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    fmt = f"{{:,.{digits}f}}"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def render(res: Results, args: Any, started: datetime.datetime, load_start: tuple[float, float, float]) -> str:
    backend = "PostgreSQL" if args.postgres else "SQLite"
    load_end = os.getloadavg()
    head = (f"Sluice vs LiteLLM {LITELLM_VERSION} proxy, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
            f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end "
            f"(15 min: {load_end[2]:.1f}), {backend}, {args.rounds} round{'s' if args.rounds != 1 else ''}: "
            "median (min-max)\n\n")
    lines = ["| measurement | unit | Sluice | Sluice peak RSS MB | Sluice server CPU | LiteLLM | LiteLLM peak RSS MB "
             "| Sluice/LiteLLM | target |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in res.rows.values():
        if not row.sluice and not row.peer:
            continue
        digits = 2 if row.unit in ("s", "ms") else 0
        ratio = ""
        if row.sluice and row.peer:
            ratio = f"{statistics.median(row.sluice) / statistics.median(row.peer):.2f}"
        rss = _stats(row.sluice_rss, 0)
        if row.envoy_rss:
            rss += f" (Envoy {_stats(row.envoy_rss, 0)})"
        cpu = f"{_stats(row.cpu, 2 if row.cpu_unit == 's' else 0)} {row.cpu_unit}" if row.cpu else "-"
        lines.append(f"| {row.label} | {row.unit} | {_stats(row.sluice, digits)} | {rss if row.sluice_rss else '-'} "
                     f"| {cpu} | {_stats(row.peer, digits)} | {_stats(row.peer_rss, 0)} | {ratio} | {row.target} |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The REAL stack as processes, for end-to-end tests: `sluice run` (grpc.aio server + engine +
Envoy's REST edge) in a child process, on ports chosen at run time.

    from tests.e2e import sqlite_stack_fixture, start_stack   # the fixture is `sqlite_stack`
    with start_stack(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/db.sqlite") as stack:
        client = stack.sdk()                            # openai.OpenAI through Envoy
        ...
    # leaving the block sends SIGINT (Ctrl-C) and asserts the server AND Envoy are gone

Also the schema checks every e2e body goes through: `check(schema, body)` validates against
OpenAI's OpenAPI spec (tests/openapi_schemas.py) and then again with `integer` meaning a JSON
integer only (jsonschema's `integer` accepts 1.0; a transcoder printing int64 as "1" or 1.0
must fail).
"""

from __future__ import annotations

import functools
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jsonschema
import openai
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.harness import KEY_A, KEY_B, ROOT, log_problems
from tests.openapi_schemas import spec, validate
from tests.test_envoy_edge import _assert_rest_headers as assert_rest_headers
from tests.test_envoy_edge import _free_port as free_port

__all__ = ["KEY_A", "KEY_B", "KEY_LIST", "GeneratedFile", "Stack", "assert_rest_headers", "check", "child_pids",
           "free_port", "pid_alive", "raw_json", "slow_stack_fixture", "sqlite_stack_fixture", "stack_logs_checked",
           "start_stack", "vm_bytes"]

KEY_LIST = "sk-test-gamma-list-000000"  # a project of its own, for exact listing checks
API_KEYS = f"alpha={KEY_A},beta={KEY_B},gamma={KEY_LIST}"
BANNER_REST = "REST, OpenAI-compatible:"


# --------------------------------------------------------------------------- processes


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc, so children started by any thread count)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def vm_bytes(pid: int, field: str = "VmHWM") -> int:
    """A memory figure of /proc/<pid>/status in bytes: VmHWM (peak RSS), VmRSS (now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _sdk_http_client() -> httpx2.Client:
    return httpx2.Client(timeout=120, event_hooks={"response": [lambda r: assert_rest_headers(r.headers)]})


@dataclass
class Stack:
    """One `sluice run` process and the Envoy it started."""

    proc: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    work_dir: Path
    database_url: str
    envoy_pid: int = 0
    banner: str = ""
    _clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def envoy_config(self) -> Path:
        return self.work_dir / "envoy" / "envoy.yaml"

    def log_tail(self, chars: int = 4000) -> str:
        text = ""
        for name in ("sluice.stdout", "sluice.stderr", "envoy/envoy.log"):
            with suppress(OSError):
                text += f"--- {name}\n" + (self.work_dir / name).read_text(errors="replace")[-chars:]
        return text

    @property
    def server_log(self) -> Path:
        return self.work_dir / "sluice.stderr"

    def log_size(self) -> int:
        return self.server_log.stat().st_size if self.server_log.exists() else 0

    def check_log(self, since: int = 0, allowed: tuple[str, ...] = ()) -> None:
        """Fail on a traceback or an ERROR line the server wrote after byte `since` that matches
        none of `allowed`, and when an `allowed` pattern matched no such line (it was declared
        because the test causes it)."""
        with open(self.server_log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        problems = log_problems(text, allowed)
        assert not problems, "sluice run logged failures:\n" + "\n".join(problems) + "\n" + text[-3000:]
        reported = log_problems(text)
        missing = [p for p in allowed if not any(re.search(p, line) for line in reported)]
        assert not missing, f"declared error logs never came: {missing}\n{text[-3000:]}"

    def sdk(self, key: str = KEY_A) -> openai.OpenAI:
        """The official SDK through Envoy, no retries; every response is checked for gRPC headers."""
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, http_client=_sdk_http_client())
        self._clients.append(client)
        return client

    def http(self, key: str | None = KEY_A) -> httpx.Client:
        """Plain httpx through Envoy (for raw bodies and requests the SDK cannot make)."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=120,
                              event_hooks={"response": [lambda r: assert_rest_headers(r.headers)]})
        self._clients.append(client)
        return client

    def stop(self, timeout: float = 30.0) -> None:
        """Ctrl-C: SIGINT to `sluice run`; both it and its Envoy must exit, Envoy not orphaned."""
        for client in self._clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if self.envoy_pid and pid_alive(self.envoy_pid):
                    os.kill(self.envoy_pid, signal.SIGKILL)
                raise AssertionError(f"sluice run ignored SIGINT for {timeout}s\n{self.log_tail()}") from None
            assert code == 0, f"sluice run exited with {code}\n{self.log_tail()}"
        if self.envoy_pid and pid_alive(self.envoy_pid) and str(self.envoy_config) in cmdline(self.envoy_pid):
            os.kill(self.envoy_pid, signal.SIGKILL)
            raise AssertionError(f"Envoy (pid {self.envoy_pid}) outlived `sluice run`: orphaned")


def _wait_started(stack: Stack, timeout: float) -> None:
    """Bounded polling until the banner is printed, Envoy is our child and REST answers."""
    deadline = time.monotonic() + timeout
    stdout = stack.work_dir / "sluice.stdout"
    while True:
        if stack.proc.poll() is not None:
            raise RuntimeError(f"sluice run exited with {stack.proc.returncode}\n{stack.log_tail()}")
        text = stdout.read_text(errors="replace") if stdout.exists() else ""
        if BANNER_REST in text and "API key:" in text:
            stack.banner = text
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no banner from sluice run within {timeout}s\n{stack.log_tail()}")
        time.sleep(0.05)
    envoys = [p for p in child_pids(stack.proc.pid) if str(stack.envoy_config) in cmdline(p)]
    assert len(envoys) == 1, f"expected one Envoy child of sluice run, found {envoys}"
    stack.envoy_pid = envoys[0]
    while True:  # the banner comes after Envoy listens; still, prove REST answers
        try:
            r = httpx.get(f"{stack.base_url}/batches", timeout=5)
            if r.status_code == 401:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"REST did not answer within {timeout}s\n{stack.log_tail()}")
        time.sleep(0.05)


@contextmanager
def start_stack(work_dir: Path, database_url: str, timeout: float = 60.0, retries_left: int = 2,
                **env: str) -> Iterator[Stack]:
    """`sluice run` on free ports with keys alpha/beta/gamma; SIGINT and checks on the way out."""
    work_dir.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port = free_port(), free_port()
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SLUICE_HTTP_PORT": str(http_port),
        "SLUICE_GRPC_PORT": str(grpc_port),
        "SLUICE_API_KEYS": API_KEYS,
        "SLUICE_DATABASE_URL": database_url,
        "SLUICE_ENGINE_TICK_SECONDS": "0.05",
        "SLUICE_POLL_SECONDS": "0.05",
        "SLUICE_SIM_LATENCY_MS": "0",
        **env,
    }
    full_env.pop("SLUICE_API_KEY", None)
    with open(work_dir / "sluice.stdout", "wb") as out, open(work_dir / "sluice.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "service.runtime.cli", "run", "--work-dir", str(work_dir)],
                                cwd=ROOT, env=full_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    stack = Stack(proc, http_port, grpc_port, work_dir, database_url)
    try:
        try:
            _wait_started(stack, timeout)
        except RuntimeError:
            if retries_left > 0 and "Address already in use" in stack.log_tail():
                # A port picked free was taken before the server bound it (another test process,
                # e.g. a parallel pytest worker, picked it too): start again on other ports.
                with start_stack(work_dir, database_url, timeout, retries_left - 1, **env) as again:
                    yield again
                return
            raise
        yield stack
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def stack_logs_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used a stack fails when the server logged a traceback or an ERROR line while
    it ran, unless it declared it with `@pytest.mark.logs_errors(regex, ...)`."""
    stacks: list[Stack] = [request.getfixturevalue(name) for name in ("sqlite_stack", "slow_stack", "stack")
                           if name in request.fixturenames]
    marks = [s.log_size() for s in stacks]
    yield
    marker = request.node.get_closest_marker("logs_errors")
    allowed = tuple(marker.args) if marker else ()
    for s, since in zip(stacks, marks, strict=True):
        if s.proc.poll() is None or s.server_log.exists():
            s.check_log(since, allowed)


@pytest.fixture(scope="module", name="sqlite_stack")
def sqlite_stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real stack on SQLite, the sim answering at once; shared by a test module."""
    work = tmp_path_factory.mktemp("stack")
    with start_stack(work, f"sqlite+aiosqlite:///{work}/sluice.db") as stack:
        yield stack


@pytest.fixture(scope="module", name="slow_stack")
def slow_stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real stack with a slow sim (50 ms a request, 4 at a time): batches can be cancelled."""
    work = tmp_path_factory.mktemp("slow-stack")
    with start_stack(work, f"sqlite+aiosqlite:///{work}/sluice.db", SLUICE_SIM_LATENCY_MS="50",
                     SLUICE_EXECUTOR_CONCURRENCY="4") as stack:
        yield stack


# --------------------------------------------------------------------------- bodies


def _strict_int(checker: Any, instance: Any) -> bool:
    return type(instance) is int


@functools.cache
def _strict_validator(schema_name: str) -> jsonschema.Draft202012Validator:
    uri = "urn:openai-openapi-strict"
    registry: Registry = Registry().with_resource(uri, Resource.from_contents(spec(), DRAFT202012))
    cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_int))
    return cls({"$ref": f"{uri}#/components/schemas/{schema_name}"}, registry=registry)


def check(schema_name: str, body: Any) -> Any:
    """Validate `body` against OpenAI's schema, with integers required to be JSON integers."""
    validate(schema_name, body)
    _strict_validator(schema_name).validate(body)
    return body


def raw_json(call: Callable[..., Any], *args: Any, schema: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Call an SDK `with_raw_response` method: (parsed SDK object, checked raw JSON)."""
    response = call(*args, **kwargs)
    assert response.headers["content-type"].startswith("application/json")
    body = check(schema, response.http_response.json())
    return response.parse(), body


class GeneratedFile(io.RawIOBase):
    """A read-only file whose bytes come from a generator: big uploads never sit in memory."""

    def __init__(self, name: str, chunks: Iterator[bytes]) -> None:
        self.name = name
        self._chunks = chunks
        self._pending = memoryview(b"")
        self.sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]  # a memoryview: no copy
        self.sent += n
        return n

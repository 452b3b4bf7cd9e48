"""Shared fixtures: databases (SQLite and a real PostgreSQL), an in-process gateway, and the
guards every test runs under:

- a test fails when Sluice's own code (`service.*`, `adapters.*` loggers) logs an ERROR or any
  record with a traceback while it runs, unless the test declares it with
  `@pytest.mark.logs_errors("regex", ...)` (each declared pattern must then match at least one
  such record, and every such record must match a pattern);
- `ResourceWarning` is an error (pyproject's `filterwarnings`), so an unclosed socket or file
  fails the test that leaked it;
- every test has a timeout (`pytest-timeout`) and the order is random (`pytest-randomly`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service.runtime.server import App
from service.storage.db import create_engine
from service.storage.repository import Store
from tests.databases import database_url, sqlite_template  # noqa: F401
from tests.harness import Client, gateway, make_settings
from tests.pg_fixtures import migrated_postgres_url, postgres_server, postgres_template, postgres_url  # noqa: F401
from tests.provider_fake.server import live_fakes
from tests.s3_server import s3_env, s3_server  # noqa: F401

WATCHED_LOGGERS = ("service", "adapters")
# Fixtures that run Sluice in a child process (tests/e2e.py, test_restart.py): their logs are checked there.
SUBPROCESS_FIXTURES = {"sqlite_stack", "slow_stack", "stack", "processes"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "logs_errors(*patterns): the test expects Sluice to log ERROR records "
                                       "(or tracebacks) whose message matches these regexes")
    config.addinivalue_line("markers", "empty_database: `db_url` is a database nothing has migrated yet "
                                       "(for tests of the migrations themselves)")


class _ProblemRecords(logging.Handler):
    """Collects the records of Sluice's loggers that report a failure."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in WATCHED_LOGGERS and (record.levelno >= logging.ERROR or record.exc_info):
            self.records.append(record)


def describe(record: logging.LogRecord) -> str:
    text = f"{record.levelname} {record.name}: {record.getMessage()}"
    if record.exc_info and record.exc_info[1] is not None:
        text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
    return text


@pytest.fixture(autouse=True)
def no_unexpected_error_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when the server or engine logged an unexpected exception or ERROR."""
    handler = _ProblemRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    marker = request.node.get_closest_marker("logs_errors")
    patterns = [re.compile(p) for p in (marker.args if marker else ())]
    texts = [describe(r) for r in handler.records]
    if marker is None:
        assert not texts, "Sluice logged unexpected errors:\n" + "\n".join(texts)
        return
    unexpected = [t for t in texts if patterns and not any(p.search(t) for p in patterns)]
    assert not unexpected, "Sluice logged errors the test did not declare:\n" + "\n".join(unexpected)
    if SUBPROCESS_FIXTURES & set(request.fixturenames):
        return  # the declared errors are the server process's: its own log is checked for them
    missing = [p.pattern for p in patterns if not any(p.search(t) for t in texts)]
    assert not missing, f"declared error logs never came: {missing}; logged: {texts}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every storage-touching test runs on both backends, so no SQLite-only habit creeps in.
    The database is already migrated (`database_url`)."""
    return database_url(request, tmp_path, postgres=request.param == "postgres")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For the few tests that are about SQLite itself or a subprocess's local file."""
    return f"sqlite+aiosqlite:///{tmp_path}/sluice.db"


@pytest.fixture
async def sluice(db_url: str) -> AsyncIterator[Client]:
    """A gateway on either backend with the sim provider answering at once."""
    async with gateway(make_settings(db_url)) as (_, c):
        yield c


@pytest.fixture
async def gw(db_url: str) -> AsyncIterator[tuple[App, Client]]:
    """An in-process gateway (server and engine) on each backend, with the sim provider."""
    async with gateway(make_settings(db_url)) as pair:
        yield pair


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated (tests/databases.py), empty store on each backend."""
    s = Store(create_engine(db_url))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(autouse=True)
def provider_fake_conformance() -> Iterator[None]:
    """Fail any test during which a provider fake saw a request, or sent an answer, that breaks the
    provider's official spec (tests/provider_fake/conformance.py). A test that breaks one on purpose
    takes its violations with `fake.take_violations()` and asserts on them."""
    yield
    found: dict[str, int] = {}
    for fake in live_fakes():
        for v in fake.take_violations():
            found[str(v)] = found.get(str(v), 0) + 1
    if found:
        lines = [f"  - {text}" + (f" (x{n})" if n > 1 else "") for text, n in found.items()]
        pytest.fail("the provider fake saw spec violations:\n" + "\n".join(lines), pytrace=False)

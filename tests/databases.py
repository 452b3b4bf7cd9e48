"""Databases for tests: SQLite files and PostgreSQL databases already migrated to head.

Each test gets a copy of a template migrated once per worker, so the gateway's own `migrate`
finds nothing to do: migrating anew for each of the ~600 tests on a database cost about two
minutes of CPU in `make test`. The fixtures are registered by `tests/conftest.py`.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from service.storage.db import migrate


def database_url(request: pytest.FixtureRequest, tmp_path: Path, *, postgres: bool) -> str:
    """A database for one test, already migrated. A test of the migrations themselves asks for a
    database nothing has touched with `@pytest.mark.empty_database`."""
    empty = request.node.get_closest_marker("empty_database") is not None
    if postgres:
        return str(request.getfixturevalue("postgres_url" if empty else "migrated_postgres_url"))
    path = tmp_path / "sluice.db"
    if not empty:
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head, once per worker; `database_url` hands each test a copy (its
    connections are all closed, so the file holds everything: no WAL beside it)."""
    path = tmp_path_factory.mktemp("template") / "sluice.db"
    asyncio.run(migrate(f"sqlite+aiosqlite:///{path}"))
    return path

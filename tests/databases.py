"""Databases for tests: SQLite files and PostgreSQL databases already migrated to head.

Each test gets a copy of a template migrated once (per set of migrations on SQLite, per worker
on PostgreSQL), so the gateway's own `migrate` finds nothing to do: migrating anew for each of
the ~600 tests on a database cost about two minutes of CPU in `make test`. The fixtures are
registered by `tests/conftest.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sqlite3
import tempfile
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


MIGRATIONS = Path(__file__).resolve().parent.parent / "service" / "storage" / "migrations"


@pytest.fixture(scope="session")
def sqlite_template() -> Path:
    """A SQLite file migrated to head, kept in the temp directory under a hash of the migrations
    (a new migration makes a new one), so that a run, a worker, or one of mutmut's many short
    sessions builds it at most once; `database_url` hands each test a copy."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(MIGRATIONS.rglob("*.py")))).hexdigest()[:16]
    template = Path(tempfile.gettempdir()) / f"sluice-schema-{digest}.db"
    if not template.exists():
        building = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        asyncio.run(migrate(f"sqlite+aiosqlite:///{building}"))
        with contextlib.closing(sqlite3.connect(building)) as conn:  # one self-contained file
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode=DELETE")
        os.replace(building, template)  # atomic: concurrent workers may each build one, one file wins
    return template

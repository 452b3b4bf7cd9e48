"""Pytest fixtures backed by a real PostgreSQL server (see :mod:`tests.pg_server`).

Import them into a conftest or test module::

    from tests.pg_fixtures import postgres_server, postgres_url  # noqa: F401

* ``postgres_server`` (session scope): one :class:`~tests.pg_server.PostgresServer`
  per test session (per xdist worker), stopped and deleted at session end.
* ``postgres_url`` (function scope): SQLAlchemy URL
  (``postgresql+asyncpg://...``) of a fresh, empty database with a unique name,
  dropped (``WITH (FORCE)``) after the test.
* ``migrated_postgres_url`` (function scope): the same, but a copy of ``postgres_template``
  (``CREATE DATABASE ... TEMPLATE``): migrated to head without running the migrations again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from tests.pg_server import PostgresServer, PostgresServerError, require_postgres_bin_dir

__all__ = ["migrated_postgres_url", "postgres_server", "postgres_template", "postgres_url"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start one throwaway PostgreSQL server for the whole test session.

    Without PostgreSQL every test that needs it fails with the way to install it (never skips).
    """
    try:
        bin_dir = require_postgres_bin_dir()
    except PostgresServerError as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        pytest.fail(missing, pytrace=False)
    with PostgresServer(bin_dir=bin_dir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """Return the URL of a fresh, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """The name of a database migrated to head once per session, only ever copied (a template
    must have no connection open while it is copied: the migration's engine is disposed)."""
    from service.storage.db import migrate

    name = "sluice_template"
    asyncio.run(migrate(postgres_server.create_database(name)))
    return name


@pytest.fixture
def migrated_postgres_url(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    """A fresh database already at the newest schema, dropped after the test."""
    name = f"test_{uuid.uuid4().hex}"
    url = postgres_server.create_database(name, template=postgres_template)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)

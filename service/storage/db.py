"""Database engine and migrations.

SQLite (aiosqlite) is the embedded default; PostgreSQL (asyncpg) is the production backend.
Migrations (Alembic, service/storage/migrations/) run at start-up, before the server takes traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def migrate(url: str) -> None:
    """Bring the schema to the newest revision. Alembic's env runs its own event loop, so it
    gets a thread of its own."""
    _ensure_sqlite_dir(url)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")


def _ensure_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def create_engine(url: str) -> AsyncEngine:
    _ensure_sqlite_dir(url)
    if make_url(url).get_backend_name() != "sqlite":
        return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    # Writers are serialised in-process (`Sessions`), so connections are mostly readers: WAL lets
    # them run beside the one writer. A generous pool: a burst of 100 creates must queue, not fail.
    engine = create_async_engine(url, connect_args={"timeout": 30}, pool_size=10, max_overflow=30,
                                 pool_timeout=120)

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets readers run beside the engine's writes; foreign keys are off by default.
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


class Sessions:
    """`async_sessionmaker` with one difference on SQLite: write transactions (`begin()`) take
    an in-process FIFO lock first.

    SQLite allows one writer at a time. Left to itself, every concurrent writer holds a pooled
    connection while it retries against SQLite's lock (busy_timeout), so a burst of 20 creates
    exhausted the pool and answered `database is locked` after 30 s. Queued on an asyncio lock
    instead, writers wait their turn without a connection and in arrival order, and readers (WAL)
    are never blocked. PostgreSQL has row locks and no such limit: no lock there.

        async with sessions() as s: ...          # a read (no lock)
        async with sessions.begin() as s: ...    # a write transaction (serialised on SQLite)
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._maker = async_sessionmaker(engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    def __call__(self) -> AsyncSession:
        return self._maker()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:
        if self._write_lock is None:
            async with self._maker.begin() as session:
                yield session
            return
        async with self._write_lock, self._maker.begin() as session:
            yield session


def insert_for(dialect: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with the dialect's ON CONFLICT clauses (both backends spell them the same way)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)

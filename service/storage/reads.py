"""Hot reads (a batch by id, a page of results) without ORM sessions, transactions or thread hand-offs.

An ORM session around one SELECT costs a BEGIN and a ROLLBACK, and on SQLite every statement goes
through aiosqlite's worker thread: a cursor, the execute, the fetch, the close and the pool's
rollback each hand off to that thread and back, which under load costs far more than SQLite's
microseconds for a lookup by primary key. `Reads` runs such a statement

- on SQLite (a database file), on the calling event loop's thread, through a plain `sqlite3`
  connection that is read-only and holds no transaction: in WAL mode a reader never waits for a
  writer and sees the latest committed state. Should SQLite still answer "busy" (it does not wait:
  timeout 0), the statement is left to the asynchronous path, which may wait;
- elsewhere (PostgreSQL; SQLite in memory), in one round trip on an AUTOCOMMIT connection: no
  BEGIN or ROLLBACK around it.

The most frequent statement of all (a batch by id: every GetBatch, every engine step) is
`prepare`d: compiled once, then run on SQLite straight through the `sqlite3` module, its values
typed by SQLAlchemy's own result processors, without SQLAlchemy's per-execution machinery (ten
times the query's own cost for a lookup by primary key).

Only statements that read are run here; every write stays a transaction of the Store's.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, Row, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import SingletonThreadPool


class Prepared:
    """A SELECT compiled once for the local SQLite path: its SQL, its parameters in order (with
    the values compiled into it, such as an OFFSET), and one result processor per column (None:
    the value as sqlite3 gives it). Rows come as `row_type` (a named tuple of the column names)."""

    def __init__(self, statement: Any, local: Engine | None) -> None:
        self.statement = statement
        self.sql, self.names, self.processors = "", [], []
        self.defaults: dict[str, Any] = {}
        self.row_type: Any = namedtuple("Row", [str(c.key) for c in statement.selected_columns], rename=True)  # type: ignore[misc]
        if local is not None:
            dialect = local.dialect
            compiled = statement.compile(dialect=dialect)
            self.sql, self.names = str(compiled), list(compiled.positiontup or [])
            self.defaults = dict(compiled.params)
            self.processors = [c.type.dialect_impl(dialect).result_processor(dialect, None)
                               for c in statement.selected_columns]


class Reads:
    def __init__(self, engine: AsyncEngine) -> None:
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._local: Engine | None = None
        self._engine: Engine | None = None
        self._path = ""
        self._raw = threading.local()  # the prepared path's sqlite3 connection, one per thread
        url = engine.url
        database = url.database or ""
        if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
            # One connection per thread (in practice: the event loop's), opened on first use, in
            # sqlite3's autocommit mode (isolation_level None: no transaction is ever begun).
            local = sqlalchemy.create_engine(url.set(drivername="sqlite"), poolclass=SingletonThreadPool,
                                             connect_args={"timeout": 0, "check_same_thread": False,
                                                           "isolation_level": None})

            @event.listens_for(local, "connect")
            def _read_only(dbapi_conn: Any, _record: Any) -> None:
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA query_only=1")
                cursor.close()

            self._engine = self._local = local
            self._path = database

    async def all(self, statement: Any, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]:
        """Every row of a SELECT, typed as SQLAlchemy types it."""
        if self._local is not None:
            try:
                with self._local.connect() as conn:
                    return conn.execute(statement, params).all()
            except OperationalError:  # busy, or no schema yet: the asynchronous path, which waits
                pass
        async with self._autocommit.connect() as conn:
            return (await conn.execute(statement, params)).all()

    def prepare(self, statement: Any) -> Prepared:
        """Compile a constant SELECT (its parameters: `bindparam`s given plain values) once."""
        return Prepared(statement, self._local)

    async def prepared(self, prepared: Prepared, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        """Every row of a prepared SELECT, typed as SQLAlchemy types them, by position and by name."""
        if self._local is not None:
            try:
                values = [params[n] if n in params else prepared.defaults[n] for n in prepared.names]
                rows = self._sqlite3().execute(prepared.sql, values).fetchall()
            except sqlite3.OperationalError:  # busy, or no schema yet: the asynchronous path, which waits
                pass
            else:
                processors, make = prepared.processors, prepared.row_type._make
                return [make(p(v) if p is not None else v for p, v in zip(processors, row, strict=True))
                        for row in rows]
        return await self.all(prepared.statement, params)

    def _sqlite3(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._raw, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            self._raw.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._raw, "conn", None)
        if conn is not None:
            conn.close()
            self._raw.conn = None
        if self._engine is not None:
            self._engine.dispose()

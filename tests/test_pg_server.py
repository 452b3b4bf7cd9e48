"""Proves the real-PostgreSQL test harness (:mod:`tests.pg_server`, :mod:`tests.pg_fixtures`) works."""

# Fixtures are imported explicitly below so this module runs standalone; pytest injects them as
# same-named parameters, which pyflakes reports as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.pg_fixtures import postgres_server, postgres_url  # noqa: F401
from tests.pg_server import PostgresServer, PostgresServerError, find_postgres_bin_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


async def test_sqlalchemy_roundtrip(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+asyncpg://sluice:sluice@127.0.0.1:")
    engine = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            assert (await conn.execute(text("select 1"))).scalar_one() == 1
            await conn.execute(text("create table items (id serial primary key, name text not null)"))
            await conn.execute(text("insert into items (name) values (:n)"), [{"n": "a"}, {"n": "b"}])
        async with engine.connect() as conn:
            rows = (await conn.execute(text("select id, name from items order by id"))).all()
        assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]
    finally:
        await engine.dispose()


async def test_default_database_url(postgres_server: PostgresServer) -> None:
    assert postgres_server.url.endswith(f"127.0.0.1:{postgres_server.port}/sluice_test")
    engine = create_async_engine(postgres_server.url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("select current_database()"))).scalar_one() == "sluice_test"
            assert (await conn.execute(text("select current_user"))).scalar_one() == "sluice"
    finally:
        await engine.dispose()


async def test_server_is_real_and_tuned(postgres_server: PostgresServer, postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        version = await conn.fetchval("SHOW server_version")
        assert re.match(r"^\d+(\.\d+)*", version)
        assert postgres_server.bin_dir is not None
        if re.fullmatch(r"\d+", postgres_server.bin_dir.parent.name):  # Debian layout: .../<major>/bin
            assert version.split(".")[0] == postgres_server.bin_dir.parent.name
        assert "PostgreSQL" in await conn.fetchval("select version()")
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            assert await conn.fetchval(f"SHOW {setting}") == "off"
        assert await conn.fetchval("select inet_server_port()") == postgres_server.port
    finally:
        await conn.close()


async def test_password_is_enforced(postgres_server: PostgresServer) -> None:
    bad = postgres_server.dsn.replace(":sluice@", ":wrong@")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(bad)


async def test_two_databases_are_isolated(postgres_server: PostgresServer, postgres_url: str) -> None:
    other_name = "isolation_other"
    other_url = postgres_server.create_database(other_name)
    try:
        assert other_url != postgres_url
        first = create_async_engine(postgres_url, poolclass=NullPool)
        second = create_async_engine(other_url, poolclass=NullPool)
        try:
            async with first.begin() as conn:
                await conn.execute(text("create table only_here (x int)"))
            async with second.connect() as conn:
                exists = await conn.execute(text("select to_regclass('public.only_here')"))
                assert exists.scalar_one() is None
        finally:
            await first.dispose()
            await second.dispose()
    finally:
        postgres_server.drop_database(other_name)


_seen_urls: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_fresh_empty_database(postgres_url: str, run: int) -> None:
    assert postgres_url not in _seen_urls
    _seen_urls.append(postgres_url)
    engine = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            count = await conn.execute(
                text("select count(*) from information_schema.tables where table_schema = 'public'")
            )
            assert count.scalar_one() == 0
            # would fail on the second run if the database were shared between tests
            await conn.execute(text("create table probe (run int)"))
            await conn.execute(text("insert into probe values (:run)"), {"run": run})
    finally:
        await engine.dispose()


def test_stop_removes_everything() -> None:
    server = PostgresServer().start()
    base, pid = server.base_dir, server.process.pid if server.process else None
    assert base is not None and base.is_dir() and pid is not None
    assert server.startup_seconds is not None and server.startup_seconds < 30
    server.stop()
    assert not base.exists()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # idempotent


def test_invalid_database_name_rejected(postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError):
        postgres_server.create_database('x"; drop database sluice_test; --')


def test_start_failure_reports_log_tail() -> None:
    server = PostgresServer(extra_settings={"shared_buffers": "not-a-size"}, startup_timeout=20)
    with pytest.raises(PostgresServerError, match="shared_buffers"):
        server.start()
    assert server.base_dir is None


def test_missing_server_fails_naming_the_installer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLUICE_PG_BIN_DIR", str(tmp_path))
    with pytest.raises(PostgresServerError, match=r"`make test`.*scripts/install_postgres\.sh"):
        PostgresServer().start()


def test_install_script_changes_nothing_when_installed(tmp_path: Path) -> None:
    """`make test` runs the script every time: with PostgreSQL present it must not call apt-get or
    sudo, and it must find the same binaries as the harness."""
    calls = tmp_path / "calls"
    for name in ("apt-get", "sudo"):
        stub = tmp_path / name
        stub.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nexit 1\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run([str(REPO_ROOT / "scripts" / "install_postgres.sh")], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"PostgreSQL server binaries: {find_postgres_bin_dir()}"
    assert not calls.exists()


async def _select_one(url: str) -> int:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text("select 1"))).scalar_one())
    finally:
        await engine.dispose()


def test_cli_prints_url_and_stops_on_sigterm() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.pg_server"], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        _check_cli(proc)


def _check_cli(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        lines: dict[str, str] = {}
        while len(lines) < 3:
            line = proc.stdout.readline()
            assert line, f"CLI exited early: {proc.wait(10)} {proc.stderr.read() if proc.stderr else ''}"
            key, _, value = line.strip().partition(" ")
            lines[key] = value
        assert lines["URL"].startswith("postgresql+asyncpg://sluice:sluice@127.0.0.1:")
        assert asyncio.run(_select_one(lines["URL"])) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not Path(lines["DIR"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

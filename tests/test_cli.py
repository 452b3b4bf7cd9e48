"""The `sluice` command: help that documents the environment, and clear start-up failures."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

SLUICE = Path(sys.executable).parent / "sluice"  # the installed console script
DOCUMENTED = ("SLUICE_GRPC_HOST", "SLUICE_GRPC_PORT", "SLUICE_DATABASE_URL", "SLUICE_API_KEY", "SLUICE_API_KEYS",
              "SLUICE_SIM_LATENCY_MS", "SLUICE_SIM_FAILURE_RATE", "SLUICE_LOG_LEVEL")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([str(SLUICE), *args], env={**clean, **(env or {})}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args", [("--help",), ("serve", "--help")], ids=["sluice", "serve"])
def test_help_lists_the_environment(args: tuple[str, ...]) -> None:
    out = run(*args)
    assert out.returncode == 0, out.stderr
    for name in DOCUMENTED:
        assert re.search(rf"\b{name}\b", out.stdout), f"{name} missing from `sluice {' '.join(args)}`"
    # Every variable the help names is one the code really reads.
    runtime = ROOT / "service" / "runtime"
    source = (runtime / "config.py").read_text() + (runtime / "cli.py").read_text().split(
        "ENV_HELP", 1)[1].split('"""', 2)[2]
    for name in set(re.findall(r"SLUICE_[A-Z_]+", out.stdout)):
        assert f'"{name}"' in source, f"`sluice {' '.join(args)}` documents {name}, which nothing reads"
    if args[0] == "serve":
        assert "--port" in out.stdout and "--ready-line" in out.stdout
    else:
        assert "serve" in out.stdout and "migrate" in out.stdout


def test_serve_without_a_key_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    out = run("serve", "--port", "0", env={"SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/s.db"},
              cwd=tmp_path)
    assert out.returncode == 2
    assert "SLUICE_API_KEY" in out.stderr and "no API key" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "s.db").exists()  # refused before touching anything


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    out = run("serve", env={"SLUICE_API_KEY": "k", "SLUICE_SIM_LATENCY_MS": "fast",
                            "SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/s.db"}, cwd=tmp_path)
    assert out.returncode == 2
    assert "sluice: SLUICE_SIM_LATENCY_MS must be a number" in out.stderr and "Traceback" not in out.stderr


def test_bad_providers_file_is_a_clear_error(tmp_path: Path) -> None:
    """The providers file is read by library code (service/providers/registry.py) once the server
    starts; its error still reaches the user as one line and exit status 2, not a traceback."""
    providers = tmp_path / "providers.yaml"
    providers.write_text("providers:\n  x: {kind: nope, base_url: http://h}\n")
    out = run("serve", "--port", "0", env={"SLUICE_API_KEY": "k", "SLUICE_PROVIDERS_FILE": str(providers),
                                           "SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/s.db"},
              cwd=tmp_path)
    assert out.returncode == 2
    assert f"sluice: {providers}: provider 'x': unknown kind 'nope'" in out.stderr
    assert "Traceback" not in out.stderr


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "m" / "s.db"
    for _ in range(2):
        out = run("migrate", env={"SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{db}"}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    assert {"batches", "batch_requests", "batch_results", "api_keys"} <= tables


def test_unknown_command_is_a_usage_error() -> None:
    out = run("frobnicate")
    assert out.returncode == 2 and "usage:" in out.stderr


def test_banner_prints_a_key_only_when_sluice_generated_it(capsys: pytest.CaptureFixture[str]) -> None:
    from service.runtime.cli import _banner
    from service.runtime.config import Settings

    supplied = Settings(api_keys={"sk-supplied-secret-123": "default"},
                        database_url="postgresql+asyncpg://user:hunter2@db:5432/sluice")
    _banner(8080, 50051, supplied, generated="")
    out = capsys.readouterr().out
    assert "sk-supplied-secret-123" not in out and "hunter2" not in out and "not shown" in out
    _banner(8080, 50051, Settings(), generated="sk-sluice-generated")
    assert "sk-sluice-generated   (generated" in capsys.readouterr().out

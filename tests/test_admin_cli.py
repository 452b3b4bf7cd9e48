"""`sluice admin projects|keys`: the installed console script against a real `sluice serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import KEY_A, ServerProcess

SLUICE = Path(sys.executable).parent / "sluice"
ADMIN_KEY = "sk-admin-cli-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("admin-cli-server")
    env = {"SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{work}/sluice.db", "SLUICE_API_KEYS": f"alpha={KEY_A}",
           "SLUICE_API_KEY": "", "SLUICE_PROVIDERS_FILE": "", "SLUICE_ADMIN_KEY": ADMIN_KEY}
    process = ServerProcess(env, work / "sluice.log").start()
    try:
        yield process
    finally:
        assert process.stop() == 0


def sluice(server: ServerProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    full.update(SLUICE_ADDRESS=f"127.0.0.1:{server.port}", **env)
    return subprocess.run([str(SLUICE), *args], env=full, capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_projects_and_keys_from_the_command_line(server: ServerProcess) -> None:
    admin = {"SLUICE_ADMIN_KEY": ADMIN_KEY}
    project = json.loads(ok(sluice(server, "admin", "projects", "create", "Team CLI", "--json", **admin)).stdout)
    assert project["id"].startswith("proj_") and project["status"] == "active"
    listing = ok(sluice(server, "admin", "projects", "list", **admin)).stdout
    assert project["id"] in listing and "Team CLI" in listing and "alpha" in listing

    created = ok(sluice(server, "admin", "keys", "create", project["id"], "--name", "deploy", **admin))
    value = created.stdout.strip()
    assert value.startswith("sk-proj-") and "shown only this once" in created.stderr
    ok(sluice(server, "batches", "list", SLUICE_API_KEY=value))

    keys = ok(sluice(server, "admin", "keys", "list", project["id"], **admin)).stdout
    assert "deploy" in keys and value not in keys and "..." in keys
    key_id = json.loads(ok(sluice(server, "admin", "keys", "list", project["id"], "--json", **admin)).stdout)[
        "data"][0]["id"]
    assert f"revoked {key_id}" in ok(sluice(server, "admin", "keys", "revoke", project["id"], key_id, **admin)).stdout
    refused = sluice(server, "batches", "list", SLUICE_API_KEY=value)
    assert refused.returncode == 1 and "Incorrect API key" in refused.stderr

    budget = json.loads(ok(sluice(server, "admin", "projects", "budget", project["id"], "40", "--json",
                                  **admin)).stdout)
    assert budget["monthly_budget_usd"] == 40
    archived = ok(sluice(server, "admin", "projects", "archive", project["id"], **admin)).stdout
    assert "archived" in archived


def test_admin_commands_need_the_admin_key(server: ServerProcess) -> None:
    missing = sluice(server, "admin", "projects", "list")
    assert missing.returncode == 2 and "SLUICE_ADMIN_KEY" in missing.stderr
    denied = sluice(server, "admin", "projects", "list", SLUICE_ADMIN_KEY=KEY_A)
    assert denied.returncode == 1 and "admin key" in denied.stderr

"""A non-editable install runs on its own: `pip install <clone>` into a fresh venv, the clone deleted,
then `sluice run` (gRPC, engine, Envoy) started elsewhere serves the README's openai SDK example.

This is what catches a file the server reads from the source tree instead of from its package
(Envoy's template, the Lua filter, the descriptor set, the migrations): every other test runs from
the editable install, where the source tree is always there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import ROOT

KEY = "sk-install-check-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clone(dest: Path) -> None:
    """The files a clone would hold if the work tree were committed now: tracked and new ones, not
    ignored ones (no .venv, no build output)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not in the clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def readme_sdk_example(base_url: str, key: str) -> str:
    """The README's openai SDK example, pointed at this server (fails if the README changed shape)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### With the official `openai` SDK", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README.md: no python block under 'With the official `openai` SDK'"
    example = code.group(1)
    for placeholder in ('"http://127.0.0.1:8080/v1"', '"<the key make run printed>"'):
        assert placeholder in example, f"README.md's SDK example no longer has {placeholder}"
    return example.replace('"http://127.0.0.1:8080/v1"', repr(base_url)).replace(
        '"<the key make run printed>"', repr(key))


def _wait_for_rest(proc: subprocess.Popen[bytes], base_url: str, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"sluice run exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"{base_url}/batches", timeout=5).status_code == 401:  # Envoy -> gRPC -> auth
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"REST did not answer within {timeout}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


def test_installed_wheel_serves_the_readme_sdk_example(tmp_path: Path) -> None:
    clone, venv, elsewhere = tmp_path / "clone", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _clone(clone)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLUICE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(clone)], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(clone)  # from here on, only the installed package exists

    where = subprocess.run([str(python), "-c", "import service; print(service.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where

    http_port, grpc_port = _free_port(), _free_port()
    base_url = f"http://127.0.0.1:{http_port}/v1"
    log = tmp_path / "sluice.log"
    server_env = {**env, "SLUICE_HTTP_PORT": str(http_port), "SLUICE_GRPC_PORT": str(grpc_port),
                  "SLUICE_API_KEY": KEY, "SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/sluice.db"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "sluice"), "run"], cwd=elsewhere, env=server_env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for_rest(proc, base_url, log)
        example = subprocess.run([sys.executable, "-c", readme_sdk_example(base_url, KEY)], cwd=elsewhere,
                                 capture_output=True, text=True, timeout=180)
        assert example.returncode == 0, example.stdout + example.stderr + log.read_text()[-4000:]
        status, *contents = example.stdout.splitlines()
        assert status.startswith("completed BatchRequestCounts(completed=3, failed=0, total=3)"), status
        assert len(contents) == 3 and all(contents), example.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-4000:]
    assert "Traceback" not in log.read_text()
    # The Envoy config was rendered from the installed template, in the run's own work dir.
    assert (elsewhere / "var" / "envoy" / "envoy.yaml").is_file()

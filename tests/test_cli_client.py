"""`sluice batches|files`: the command line for people, driven as a user would (the installed
console script in a child process) against a real `sluice serve` process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import KEY_A, KEY_B, ROOT, ServerProcess

SLUICE = Path(sys.executable).parent / "sluice"


def start_server(work: Path, sim_latency_ms: int) -> ServerProcess:
    env = {"SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{work}/sluice.db", "SLUICE_API_KEYS": f"alpha={KEY_A},"
           f"beta={KEY_B}", "SLUICE_API_KEY": "", "SLUICE_PROVIDERS_FILE": "",
           "SLUICE_SIM_LATENCY_MS": str(sim_latency_ms), "SLUICE_EXECUTOR_CONCURRENCY": "4",
           "SLUICE_ENGINE_TICK_SECONDS": "0.05"}
    return ServerProcess(env, work / "sluice.log").start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("cli-server"), sim_latency_ms=20)
    try:
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture
def stuck_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """Every request takes ten minutes: a batch there is still running whenever a test cancels it."""
    process = start_server(tmp_path, sim_latency_ms=600_000)
    try:
        yield process
    finally:
        assert process.stop() == 0


def sluice(server: ServerProcess, *args: str, key: str | None = KEY_A, cwd: Path | None = None,
           address: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_ADDRESS"] = address or f"127.0.0.1:{server.port}"
    if key is not None:
        env["SLUICE_API_KEY"] = key
    return subprocess.run([str(SLUICE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


def questions(path: Path, n: int, model: str = "sim/demo", url: str = "/v1/chat/completions") -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": url, "body": {
        "model": model, "messages": [{"role": "user", "content": f"Question {i}"}]}}) + "\n" for i in range(n)))
    return path


def readme_example() -> list[str]:
    """The shell lines of README.md's "With the command line" example."""
    text = (ROOT / "README.md").read_text().split("### With the command line", 1)[1]
    return text.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()


def test_the_readme_example_end_to_end(server: ServerProcess, tmp_path: Path) -> None:
    """README, "With the command line", as written: make the file, create with --watch, then the
    results to a file and the listing."""
    lines = readme_example()
    assert lines[0].startswith("export SLUICE_API_KEY=") and lines[-1].startswith(".venv/bin/sluice ")
    subprocess.run(["bash", "-e", "-c", "\n".join(lines[1:-1])], cwd=tmp_path, check=True, timeout=60)
    command = lines[-1].split()[1:]
    assert command == ["batches", "create", "questions.jsonl", "--watch"]
    created = ok(sluice(server, *command, cwd=tmp_path))
    assert "uploaded questions.jsonl as file-" in created.stderr
    assert "100/100" in created.stderr and "0 failed" in created.stderr and "tokens" in created.stderr
    batch_id = created.stderr.split("created batch ")[1].split()[0]
    shown = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in created.stdout.splitlines() if line.strip())
    assert shown["id"] == batch_id and shown["status"] == "completed"
    assert shown["requests"] == "100 completed, 0 failed, 100 total"
    assert shown["output file"] == f"file-output-{batch_id.removeprefix('batch_')}"

    results = ok(sluice(server, "batches", "results", batch_id, "-o", "answers.jsonl", cwd=tmp_path))
    assert f"wrote 100 results of {batch_id} (completed) to answers.jsonl" in results.stderr
    written = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in written] == [f"q{i}" for i in range(100)]
    assert all(r["status"] == "completed" and r["status_code"] == 200 for r in written)
    assert written[0]["response"]["choices"][0]["message"]["content"]
    assert isinstance(written[0]["usage"]["total_tokens"], int)

    listed = ok(sluice(server, "batches", "list"))
    assert batch_id in listed.stdout and "100/100" in listed.stdout
    files = ok(sluice(server, "files", "list"))
    assert "questions.jsonl" in files.stdout and f"{batch_id}_output.jsonl" in files.stdout


def test_json_for_scripts(server: ServerProcess, tmp_path: Path) -> None:
    questions(tmp_path / "q.jsonl", 3)
    batch = as_json(sluice(server, "batches", "create", str(tmp_path / "q.jsonl"), "--json", "--watch",
                           "--metadata", "team=cli"))
    assert batch["status"] == "completed" and batch["object"] == "batch"
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert batch["metadata"] == {"team": "cli"}
    assert as_json(sluice(server, "batches", "get", batch["id"], "--json")) == batch
    page = as_json(sluice(server, "batches", "list", "--json", "--limit", "1"))
    assert page["object"] == "list" and page["data"] == [batch] and page["first_id"] == batch["id"]

    # stdout without -o: one JSON object per line, nothing else.
    lines = ok(sluice(server, "batches", "results", batch["id"])).stdout.splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["q0", "q1", "q2"]

    uploaded = as_json(sluice(server, "files", "upload", str(tmp_path / "q.jsonl"), "--json"))
    assert uploaded["filename"] == "q.jsonl" and uploaded["bytes"] == (tmp_path / "q.jsonl").stat().st_size
    assert as_json(sluice(server, "files", "get", uploaded["id"], "--json")) == uploaded
    assert as_json(sluice(server, "files", "delete", uploaded["id"], "--json")) == {
        "id": uploaded["id"], "object": "file", "deleted": True}


def test_a_multi_megabyte_upload_round_trips(server: ServerProcess, tmp_path: Path) -> None:
    """More than one 1 MiB upload message; the bytes come back as sent."""
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for i in range(12_000):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "sim/e", "input": f"text number {i} " * 10}}) + "\n")
    assert big.stat().st_size > 3 * 1024 * 1024
    uploaded = as_json(sluice(server, "files", "upload", str(big), "--json"))
    ok(sluice(server, "files", "content", uploaded["id"], "-o", str(tmp_path / "back.jsonl")))
    assert (tmp_path / "back.jsonl").read_bytes() == big.read_bytes()


def test_watch_exits_1_unless_the_batch_completed(server: ServerProcess, stuck_server: ServerProcess,
                                                  tmp_path: Path) -> None:
    # Fails at creation: the lines target another endpoint than the batch's.
    questions(tmp_path / "bad.jsonl", 2, url="/v1/embeddings")
    failed = sluice(server, "batches", "create", str(tmp_path / "bad.jsonl"), "--endpoint", "/v1/chat/completions",
                    "--watch")
    assert failed.returncode == 1
    assert "ended failed" in failed.stderr and "line 1:" in failed.stdout and "Traceback" not in failed.stderr

    questions(tmp_path / "long.jsonl", 8)
    created = as_json(sluice(stuck_server, "batches", "create", str(tmp_path / "long.jsonl"), "--json"))
    cancelled = as_json(sluice(stuck_server, "batches", "cancel", created["id"], "--json"))
    assert cancelled["status"] == "cancelling"
    watched = sluice(stuck_server, "batches", "watch", created["id"])
    assert watched.returncode == 1 and f"batch {created['id']} ended cancelled" in watched.stderr
    assert "cancelled" in watched.stdout


def test_failures_exit_non_zero_with_the_message(server: ServerProcess, tmp_path: Path) -> None:
    # A batch of KEY_A's own, whatever ran before on the module's server (tests run in random order).
    ok(sluice(server, "batches", "create", str(questions(tmp_path / "one.jsonl", 1)), "--json"))
    missing = sluice(server, "batches", "get", "batch_missing")
    assert missing.returncode == 1 and missing.stderr.strip() == "sluice: No batch found with id 'batch_missing'."
    theirs = as_json(sluice(server, "batches", "list", "--json", key=KEY_A))["data"][0]["id"]
    assert "No batch found" in sluice(server, "batches", "get", theirs, key=KEY_B).stderr  # tenants isolated
    bad_key = sluice(server, "files", "list", key="sk-wrong")
    assert bad_key.returncode == 1 and "Incorrect API key" in bad_key.stderr
    no_key = sluice(server, "batches", "list", key=None)
    assert no_key.returncode == 2 and "SLUICE_API_KEY" in no_key.stderr
    down = sluice(server, "batches", "list", address="127.0.0.1:1")
    assert down.returncode == 1 and "cannot reach Sluice at 127.0.0.1:1" in down.stderr
    nofile = sluice(server, "batches", "create", str(tmp_path / "nope.jsonl"))
    assert nofile.returncode == 1 and "no such file" in nofile.stderr
    unknown_endpoint = tmp_path / "odd.jsonl"
    unknown_endpoint.write_text('{"custom_id": "a", "url": "/v1/images"}\n')
    odd = sluice(server, "batches", "create", str(unknown_endpoint))
    assert odd.returncode == 1 and "--endpoint" in odd.stderr
    for result in (missing, bad_key, no_key, down, nofile, odd):
        assert "Traceback" not in result.stderr


def test_retry_makes_a_linked_batch_of_the_lines_that_failed(server: ServerProcess, tmp_path: Path) -> None:
    """`sluice batches retry`: the failed lines (by default), exactly the lines named, or on another
    model; the new batch names the batch it retries, which lists it."""
    path = questions(tmp_path / "q.jsonl", 4)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("Question 1", "Question 1 SIM_FAIL")  # the sim fails this line, every time
    lines[3] = lines[3].replace("Question 3", "Question 3 SIM_FAIL")
    path.write_text("\n".join(lines) + "\n")
    first = as_json(sluice(server, "batches", "create", str(path), "--json", "--watch"))
    assert first["request_counts"] == {"total": 4, "completed": 2, "failed": 2}

    again = sluice(server, "batches", "retry", first["id"], "--watch")
    assert again.returncode == 0, again.stderr
    retry_id = again.stderr.split("created batch ")[1].split()[0]
    assert f"retrying {first['id']} (2 lines)" in again.stderr
    shown = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in again.stdout.splitlines() if line.strip())
    assert shown["id"] == retry_id and shown["status"] == "completed" and shown["retry of"] == first["id"]
    assert shown["requests"] == "0 completed, 2 failed, 2 total"  # only q1 and q3 ran again (and failed again)
    results = ok(sluice(server, "batches", "results", retry_id)).stdout.splitlines()
    assert [json.loads(r)["custom_id"] for r in results] == ["q1", "q3"]

    chosen = as_json(sluice(server, "batches", "retry", first["id"], "--custom-id", "q0", "--custom-id", "q3",
                            "--model", "sim/other", "--metadata", "why=cli", "--json", "--watch"))
    assert chosen["retry_of"] == first["id"] and chosen["model"] == "sim/other"
    assert chosen["metadata"] == {"why": "cli"} and chosen["request_counts"]["total"] == 2
    original = as_json(sluice(server, "batches", "get", first["id"], "--json"))
    assert original["retries"] == [retry_id, chosen["id"]]  # oldest first
    shown = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1)
                 for line in ok(sluice(server, "batches", "get", first["id"])).stdout.splitlines() if line.strip())
    assert shown["retried by"] == f"{retry_id}, {chosen['id']}"

    cancelled_only = sluice(server, "batches", "retry", first["id"], "--outcome", "cancelled")
    assert cancelled_only.returncode == 1 and "has no lines to retry (cancelled)" in cancelled_only.stderr
    both = sluice(server, "batches", "retry", first["id"], "--outcome", "failed", "--custom-id", "q0")
    assert both.returncode == 1 and "Give either outcomes or custom_ids" in both.stderr
    unknown = sluice(server, "batches", "retry", first["id"], "--custom-id", "nope")
    assert unknown.returncode == 1 and "has no line 'nope'" in unknown.stderr
    usage = sluice(server, "batches", "retry", first["id"], "--outcome", "completed")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    for result in (cancelled_only, both, unknown, usage):
        assert "Traceback" not in result.stderr

"""`sluice serve` as a real child process: a crash (SIGKILL) mid-batch loses nothing already
stored and a new process finishes the batch; SIGTERM/SIGINT shut down promptly and cleanly."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.v1 import batch_pb2
from tests.harness import KEY_A, Client, ServerProcess, chat_line, client

LINES = 40


def env(db_url: str, **extra: str) -> dict[str, str]:
    return {
        "SLUICE_DATABASE_URL": db_url,
        "SLUICE_API_KEYS": f"alpha={KEY_A}",
        "SLUICE_API_KEY": "",
        "SLUICE_PROVIDERS_FILE": "",
        "SLUICE_SIM_LATENCY_MS": "150",
        "SLUICE_SIM_FAILURE_RATE": "0",
        "SLUICE_EXECUTOR_CONCURRENCY": "2",
        "SLUICE_ENGINE_TICK_SECONDS": "0.05",
        "SLUICE_POLL_SECONDS": "0.05",
        "SLUICE_LEASE_SECONDS": "1.5",
        "SLUICE_LOG_LEVEL": "INFO",
        **extra,
    }


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Every process a test starts; any still running at the end is killed."""
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.close()
    for p in started:
        p.check_log()


def start(processes: list[ServerProcess], environ: dict[str, str], log: Path) -> ServerProcess:
    p = ServerProcess(environ, log)
    processes.append(p)
    return p.start()


async def stored(c: Client, batch_id: str) -> list[batch_pb2.BatchResult]:
    return await c.results(batch_id)


async def until_partly_done(c: Client, batch_id: str, at_least: int, timeout: float = 30) -> None:
    await c.wait_until(batch_id, lambda b: b.request_counts.completed >= at_least, timeout)


async def test_sigkill_mid_batch_loses_nothing(db_url: str, tmp_path: Path, processes: list[ServerProcess]) -> None:
    log = tmp_path / "sluice.log"
    cids = [f"line-{i:03d}" for i in range(LINES)]
    first = start(processes, env(db_url), log)
    async with client(first.port) as c:
        batch = await c.create([chat_line(cid, f"text of {cid} here") for cid in cids])
        await until_partly_done(c, batch.id, 4)
        before = await stored(c, batch.id)
        first.stop(signal.SIGKILL)
    assert 4 <= len(before) < LINES, f"{len(before)} stored before the crash: make the batch slower"
    assert all(r.status == "completed" for r in before)

    second = start(processes, env(db_url), log)
    async with client(second.port) as c:
        done = await c.wait_for(batch.id, timeout=60)
        after = await stored(c, batch.id)
    assert done.status == "completed"
    assert [r.custom_id for r in after] == cids  # each exactly once, in order
    assert done.request_counts == batch_pb2.BatchRequestCounts(total=LINES, completed=LINES, failed=0)
    by_id = {r.custom_id: r for r in after}
    for r in before:
        assert by_id[r.custom_id] == r, f"{r.custom_id} changed across the crash"
    # The batch's sums are the sums of its lines: nothing counted twice.
    assert done.usage.input_tokens == sum(r.usage.input_tokens for r in after) == LINES * 4
    assert done.usage.output_tokens == sum(r.usage.output_tokens for r in after)
    assert done.usage.total_cost == pytest.approx(sum(r.usage.total_cost for r in after))
    assert second.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_shuts_down_gracefully(sqlite_url: str, tmp_path: Path, processes: list[ServerProcess],
                                            sig: signal.Signals) -> None:
    log = tmp_path / "sluice.log"
    p = start(processes, env(sqlite_url, SLUICE_SIM_LATENCY_MS="200"), log)
    async with client(p.port) as c:
        batch = await c.create([chat_line(f"l{i}") for i in range(200)])  # ~20 s of work
        await until_partly_done(c, batch.id, 2)
        t0 = time.monotonic()
        code = await asyncio.to_thread(p.stop, sig)
        took = time.monotonic() - t0
    assert code == 0, log.read_text()[-2000:]
    assert took < 3.0, f"shutdown took {took:.1f}s with a batch in flight"
    text = log.read_text()
    assert "shutting down" in text and "Traceback" not in text

    # The lease was handed back: a new replica with a long lease takes the batch over at once.
    q = start(processes, env(sqlite_url, SLUICE_SIM_LATENCY_MS="0", SLUICE_LEASE_SECONDS="60"), log)
    async with client(q.port) as c:
        done = await c.wait_for(batch.id, timeout=10)
        assert done.status == "completed" and done.request_counts.completed == 200
        assert len(await c.results(batch.id)) == 200
    assert q.stop() == 0

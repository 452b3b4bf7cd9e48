"""`sluice serve` as a real child process, on both backends: a crash (SIGKILL) mid-batch, while
a native provider works on it, while the provider refuses the upload, or while the output files
are half written, loses and duplicates nothing, and a new process finishes the batch;
SIGTERM/SIGINT shut down promptly and cleanly."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service.storage.db import create_engine
from service.storage.repository import Store
from service.storage.tables import FileChunkRow, FileRow
from sluice.v1 import batch_pb2
from tests.harness import KEY_A, Client, ServerProcess, assert_files_match_results, chat_line, client, until
from tests.native_scenarios import HOLD, release, step
from tests.provider_fake import ProviderFake

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


# --------------------------------------------------------------------------- native providers


def native_env(db_url: str, fake: ProviderFake, tmp_path: Path) -> dict[str, str]:
    """A server whose only real provider is OpenAI at the provider fake."""
    providers = tmp_path / "providers.yaml"
    providers.write_text(f"""
providers:
  openai:
    kind: openai
    base_url: {fake.url("openai")}
    api_key_env: SLUICE_TEST_OPENAI_KEY
    models: {{gpt-4o-mini: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}
""")
    return env(db_url, SLUICE_PROVIDERS_FILE=str(providers), SLUICE_TEST_OPENAI_KEY=fake.key("openai"))


async def test_sigkill_while_a_native_batch_runs_at_the_provider(db_url: str, tmp_path: Path,
                                                                  processes: list[ServerProcess]) -> None:
    """SIGKILL while the provider works on the batch; the provider finishes meanwhile; a new
    process resumes polling the SAME provider batch: one upload, one batch at the provider, every
    result stored once, and the files say what the results say."""
    log = tmp_path / "sluice.log"
    texts = {"a": "hello there", "b": "please FAIL this", "c": "one two three"}
    with ProviderFake() as fake:
        fake.configure(polls_per_state=HOLD)
        first = start(processes, native_env(db_url, fake, tmp_path), log)
        async with client(first.port) as c:
            created = await c.create([chat_line(cid, text, model="openai/gpt-4o-mini") for cid, text in texts.items()])
            running = await c.wait_until(created.id, lambda b: bool(b.provider_batch_id), timeout=30)
            pid = running.provider_batch_id
            step(fake, "openai", pid)
            await c.wait_for(created.id, {"in_progress"}, timeout=30)
            first.stop(signal.SIGKILL)
        release(fake, "openai", pid)  # the provider carries on while Sluice is dead

        second = start(processes, native_env(db_url, fake, tmp_path), log)
        async with client(second.port) as c:
            done = await c.wait_for(created.id, timeout=60)
            results = {r.custom_id: r for r in await c.results(created.id)}
            await assert_files_match_results(c, done)
        assert second.stop() == 0
        state = fake.state()
    assert done.status == "completed" and done.provider_batch_id == pid
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert [results[cid].status for cid in texts] == ["completed", "failed", "completed"]
    assert state["batch_creates"]["openai"] == 1 and state["file_uploads"]["openai"] == 1
    downloads = [r for r in state["requests"] if r["method"] == "GET" and r["path"].endswith("/content")]
    assert len(downloads) == len({r["path"] for r in downloads}) == 2  # output and error file, once each


async def test_sigkill_while_the_provider_refuses_the_upload(db_url: str, tmp_path: Path,
                                                             processes: list[ServerProcess]) -> None:
    """SIGKILL after Sluice noted that it started submitting, while the provider kept answering
    503: the new process asks the provider whether it has the batch (it has not) and submits
    exactly once."""
    log = tmp_path / "sluice.log"
    with ProviderFake() as fake:
        fake.add_fault(provider="openai", method="POST", path_regex=r"/files$", status=503, times=HOLD)
        first = start(processes, native_env(db_url, fake, tmp_path), log)
        async with client(first.port) as c:
            created = await c.create([chat_line("a", "hello there", model="openai/gpt-4o-mini")])

            async def refused_twice() -> bool:
                return sum(r["fault"] for r in fake.state()["requests"]) >= 2

            await until("two refused uploads", refused_twice)
            first.stop(signal.SIGKILL)
        fake.clear_faults()
        second = start(processes, native_env(db_url, fake, tmp_path), log)
        async with client(second.port) as c:
            done = await c.wait_for(created.id, timeout=60)
            await assert_files_match_results(c, done)
        assert second.stop() == 0
        state = fake.state()
    assert done.status == "completed" and done.request_counts.completed == 1
    assert state["batch_creates"]["openai"] == 1 and state["file_uploads"]["openai"] == 1
    # Before submitting again, Sluice looked for an earlier submission (OpenAI: the batch list).
    assert any(r["method"] == "GET" and r["path"].endswith("/batches") for r in state["requests"])


# --------------------------------------------------------------------------- a crash while finalizing


async def _output_file_state(store: Store, batch_id: str) -> str | None:
    """The output file's status while the engine writes it (`uploading`), once written
    (`processed`), or None before finalization began."""
    async with store.sessions() as s:
        status = await s.scalar(select(FileRow.status).where(
            FileRow.id == f"file-output-{batch_id.removeprefix('batch_')}"))
    return str(status) if status is not None else None


@pytest.mark.timeout(600)
async def test_sigkill_while_writing_the_output_files(db_url: str, tmp_path: Path,
                                                      processes: list[ServerProcess]) -> None:
    """The process is frozen (SIGSTOP) while its output file is half written, checked to be
    half written, then killed. The next process takes the batch over and finishes it: the
    output file holds every successful line exactly once, in order, and nothing of the
    half-written one is left."""
    log = tmp_path / "sluice.log"
    lines = 6000  # several 1 MiB chunks of output, so writing them takes a while
    watcher = Store(create_engine(db_url))
    try:
        for _attempt in range(5):
            p = start(processes, env(db_url, SLUICE_SIM_LATENCY_MS="0", SLUICE_EXECUTOR_CONCURRENCY="16"), log)
            async with client(p.port) as c:
                created = await c.create([chat_line(f"l{i:05d}", "SIM_FAIL" if i % 1000 == 7 else f"q {i}")
                                          for i in range(lines)])
                deadline = time.monotonic() + 120
                while (state := await _output_file_state(watcher, created.id)) is None:
                    assert time.monotonic() < deadline, "finalization never began"
                    await asyncio.sleep(0.005)  # a poll interval: the window we look for lasts far longer
            assert p.proc is not None
            p.proc.send_signal(signal.SIGSTOP)
            if state == "uploading" and await _output_file_state(watcher, created.id) == "uploading":
                p.stop(signal.SIGKILL)
                break
            p.proc.send_signal(signal.SIGCONT)  # it finished writing before it froze: try again
            assert p.stop() == 0
        else:
            raise AssertionError("never caught the server while it wrote an output file")
        half = await batch_status(watcher, created.id)
        assert half == "finalizing", half

        q = start(processes, env(db_url, SLUICE_SIM_LATENCY_MS="0"), log)
        async with client(q.port) as c:
            done = await c.wait_for(created.id, timeout=120)
            assert done.status == "completed"
            assert (done.request_counts.completed, done.request_counts.failed) == (lines - 6, 6)
            out = await c.file_lines(done.output_file_id)
            assert [x["custom_id"] for x in out] == [f"l{i:05d}" for i in range(lines) if i % 1000 != 7]
            await assert_files_match_results(c, done)
        assert q.stop() == 0
        async with watcher.sessions() as s:
            seqs = list((await s.scalars(select(FileChunkRow.seq).where(
                FileChunkRow.file_id == done.output_file_id).order_by(FileChunkRow.seq))).all())
        assert seqs == list(range(len(seqs))), "chunks of the half-written file were left behind"
    finally:
        await watcher.close()


async def batch_status(store: Store, batch_id: str) -> str:
    return str((await store.engine_batch(batch_id)).status)

"""The breakages of issue 14, applied to product code one at a time: each must fail a test.

    .venv/bin/python -m tests.breakages              # all of them (about 20 minutes on 2 cores)
    .venv/bin/python -m tests.breakages 3 7          # only these (numbers from the table)

Each breakage is a literal text replacement in one product file (it must match exactly once, so
a refactor that moves the code makes the driver say so rather than silently test nothing). The
named tests run against the broken code; the file is restored whatever happens. The table it
prints is the one in docs/mutation.md.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Breakage:
    what: str  # the promise broken, in the words
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or -k expressions ("-k ..." as one item)


BREAKAGES = [
    Breakage("claim's UPDATE does not re-check the status (the re-finalization defect)",
             "service/storage/repository.py",
             "BatchRow.id == batch_id, unfinished, free, due).values(",
             "BatchRow.id == batch_id, free, due).values(",
             ("tests/test_refinalize.py",)),
    Breakage("the finalizer of an ended batch discards and rewrites its files",
             "service/engine/output_files.py",
             "        if current.status.terminal:  # ended",
             "        if False:  # ended",
             ("tests/test_refinalize.py::test_the_finalizer_leaves_an_ended_batchs_files_alone",)),
    Breakage("non-exclusive leases: a lease held by another replica is taken anyway",
             "service/storage/repository.py",
             "free = or_(BatchRow.lease_owner.is_(None), BatchRow.lease_owner == owner, BatchRow.lease_until < t)",
             "free = or_(BatchRow.lease_owner.is_(None), BatchRow.lease_owner.is_not(None))",
             ("tests/test_replicas.py::test_two_replicas_finish_every_batch_exactly_once",
              "tests/test_store.py::test_claim_leases_are_exclusive")),
    Breakage("the second replica does nothing (its engine never claims)",
             "service/engine/engine.py",
             "                free = self.settings.max_parallel_batches - len(self._running)\n",
             "                free = 0 if self.settings.replica_id == 'replica-b' else "
             "self.settings.max_parallel_batches - len(self._running)\n",
             ("tests/test_replicas.py::test_two_replicas_finish_every_batch_exactly_once",)),
    Breakage("Retry-After ignored",
             "service/engine/engine.py",
             "return float(max(delay, retry_after or 0.0))",
             "return float(delay)",
             ("-k", "transient_faults or batch_through_the_executor")),
    Breakage("renew is not for the owner only",
             "service/storage/repository.py",
             "res = await s.execute(update(BatchRow).where(BatchRow.id == batch_id, BatchRow.lease_owner == owner)\n"
             "                                  .values(lease_until=",
             "res = await s.execute(update(BatchRow).where(BatchRow.id == batch_id)\n"
             "                                  .values(lease_until=",
             ("tests/test_store.py::test_renew_and_release_are_for_the_owner_only",)),
    Breakage("a wrong edge in the state machine (completed -> in_progress)",
             "service/domain/model.py",
             "    BatchStatus.COMPLETED: frozenset(),",
             "    BatchStatus.COMPLETED: frozenset({BatchStatus.IN_PROGRESS}),",
             ("tests/test_store.py::test_transition_table_is_the_documented_state_machine",)),
    Breakage("ids no longer in creation order (random ids): 'newest first' breaks",
             "service/storage/repository.py",
             'return f"{prefix}{time.time_ns():016x}{uuid.uuid4().hex[:16]}"',
             'return f"{prefix}{uuid.uuid4().hex}"',
             ("-k", "newest_first")),
    Breakage("a provider's per-line expiry stored as failed, not expired",
             "service/engine/engine.py",
             '_ENDED_BY_BATCH = {"batch_cancelled": ResultStatus.CANCELLED, "batch_expired": ResultStatus.EXPIRED}',
             '_ENDED_BY_BATCH = {"batch_cancelled": ResultStatus.CANCELLED}',
             ("tests/test_adapter_anthropic.py::test_partial_expiry_ends_completed",)),
    Breakage("an unknown input file is UNIMPLEMENTED instead of NOT_FOUND",
             "service/intake/file_inputs.py",
             'raise NotFound(f"No such File object: {file_id}", param="input_file_id", code="file_not_found") from None',
             'raise InvalidRequest("input files are not supported", param="input_file_id") from None',
             ("-k", "unknown_file_is_not_found or unknown_ids_are_404")),
    Breakage("a SluiceError's mapping changes (NotFound becomes INVALID_ARGUMENT)",
             "service/domain/errors.py",
             '    error_type = "not_found_error"\n    grpc_code = "NOT_FOUND"',
             '    error_type = "not_found_error"\n    grpc_code = "INVALID_ARGUMENT"',
             ("tests/test_errors.py::test_error_class_maps_to_code_envelope_and_error_info",)),
    Breakage("cancel of a completed batch succeeds",
             "service/storage/repository.py",
             "        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):\n            return batch",
             "        if True:\n            return batch",
             ("-k", "every_rpc_needs_a_known_key or completed_batch_is_a_conflict")),
    Breakage("sim/... no longer reaches sim once a real provider is active",
             "service/providers/registry.py",
             "    entries = {SIM: ProviderEntry(provider=sim, default_price=DEFAULT_SIM_PRICE)}\n    if providers_file:\n"
             "        entries.update(load_entries(providers_file))",
             "    entries = {SIM: ProviderEntry(provider=sim, default_price=DEFAULT_SIM_PRICE)}\n    if providers_file:\n"
             "        entries = load_entries(providers_file) or entries",
             ("tests/test_providers_config.py",)),
    Breakage("an internal error leaks its exception text to the caller",
             "service/edge/grpc_errors.py",
             "return Internal(",
             "return Internal(str(exc) or ",
             ("tests/test_e2e_openai_sdk.py::test_an_internal_failure_is_a_500_envelope_that_leaks_nothing",
              "tests/test_errors.py")),
    Breakage("the file routes skip authentication (ListFiles)",
             "service/edge/file_service.py",
             "    async def ListFiles(self, request: file_pb2.ListFilesRequest, context: Context) -> file_pb2.ListFilesResponse:\n"
             "        project = await self.auth.project(context.invocation_metadata())",
             "    async def ListFiles(self, request: file_pb2.ListFilesRequest, context: Context) -> file_pb2.ListFilesResponse:\n"
             '        project = "alpha"',
             ("tests/test_files_api.py::test_every_file_rpc_needs_a_known_key",
              "tests/test_e2e_openai_sdk.py::test_authentication_errors")),
    Breakage("an unknown model is accepted at create",
             "service/intake/validation.py",
             '                raise LineProblem("model_not_found", f"model {clip(model)} is not served by any configured provider",\n'
             '                                  "body.model") from None',
             '                route = self.routes[model] = router.resolve("sim/" + model)',  # served anyway
             ("tests/test_batches_api.py::test_an_unknown_model_is_rejected_and_mixed_providers_are_split_at_create",)),
    Breakage("a mixed batch's lines all go into the first provider's part",
             "service/intake/validation.py",
             "        part = self.open_parts.get(route.provider)\n",
             "        part = next(iter(self.open_parts.values()), None)\n",
             ("tests/test_batches_api.py::test_an_unknown_model_is_rejected_and_mixed_providers_are_split_at_create",)),
    Breakage("custom_id limit off by one (513 accepted)",
             "service/intake/validation.py",
             "        if len(custom_id) > MAX_CUSTOM_ID_LEN:",
             "        if len(custom_id) > MAX_CUSTOM_ID_LEN + 1:",
             ("-k", "validation_errors or rejected_uploads")),
    Breakage("custom_id limit off by one the other way (512 refused)",
             "service/intake/validation.py",
             "        if len(custom_id) > MAX_CUSTOM_ID_LEN:",
             "        if len(custom_id) >= MAX_CUSTOM_ID_LEN:",
             ("-k", "exactly_the_limits_are_accepted",)),
    Breakage("metadata key limit off by one (65 accepted)",
             "service/intake/validation.py",
             "        if len(key) > MAX_METADATA_KEY_LEN or",
             "        if len(key) > MAX_METADATA_KEY_LEN + 1 or",
             ("tests/test_batches_api.py::test_validation_errors[sqlite-metadata key of 65 characters]",)),
    Breakage("metadata key limit off by one the other way (64 refused)",
             "service/intake/validation.py",
             "        if len(key) > MAX_METADATA_KEY_LEN or",
             "        if len(key) >= MAX_METADATA_KEY_LEN or",
             ("-k", "exactly_the_limits_are_accepted")),
    Breakage("metadata value limit off by one (513 accepted)",
             "service/intake/validation.py",
             "len(value) > MAX_METADATA_VALUE_LEN or",
             "len(value) > MAX_METADATA_VALUE_LEN + 1 or",
             ("tests/test_batches_api.py::test_validation_errors[sqlite-metadata value of 513 characters]",)),
    Breakage("metadata value limit off by one the other way (512 refused)",
             "service/intake/validation.py",
             "len(value) > MAX_METADATA_VALUE_LEN or",
             "len(value) >= MAX_METADATA_VALUE_LEN or",
             ("-k", "exactly_the_limits_are_accepted")),
    Breakage("50,000 lines refused (limit off by one)",
             "service/intake/jsonl.py",
             "        if self.count > self.max_requests:",
             "        if self.count >= self.max_requests:",
             ("-k", "50000_lines")),
    Breakage("50,000 inline requests refused (limit off by one)",
             "service/edge/batch_service.py",
             "    if len(lines) > max_requests:",
             "    if len(lines) >= max_requests:",
             ("-k", "50000_inline")),
    Breakage("exactly 200 MB refused (limit off by one)",
             "service/edge/file_service.py",
             "            if self.size > self.max_bytes:",
             "            if self.size >= self.max_bytes:",
             ("tests/test_e2e_openai_sdk.py::test_exactly_200_mb_is_accepted_one_byte_more_is_413_and_neither_is_held_in_memory",)),
    Breakage("keys stored in clear",
             "service/edge/auth.py",
             "    return hashlib.sha256(key.encode(\"utf-8\", \"surrogatepass\")).hexdigest()",
             "    return key",
             ("tests/test_store.py::test_api_keys_are_stored_hashed_only",)),
    Breakage("executor batches never expire",
             "service/engine/engine.py",
             "        if now() >= batch.expires_at:\n            await self._close_unfinished(batch, part, ResultStatus.EXPIRED",
             "        if False:\n            await self._close_unfinished(batch, part, ResultStatus.EXPIRED",
             ("-k", "executor_batch_expire")),
    Breakage("a cancel that loses the race to the provider's completion ends cancelled",
             "service/engine/engine.py",
             "        final = BatchStatus(state.status.value)  # completed, expired or cancelled\n",
             "        final = BatchStatus(state.status.value)  # completed, expired or cancelled\n"
             "        if status is BatchStatus.CANCELLING:\n            final = BatchStatus.CANCELLED\n",
             ("-k", "loses_the_race")),
    Breakage("a batch cannot be cancelled while validating",
             "service/domain/model.py",
             "CANCELLABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})",
             "CANCELLABLE = frozenset({BatchStatus.IN_PROGRESS})",
             ("-k", "cancel_while_validating or cancel_before_submission")),
    Breakage("output files rewritten after a crash without discarding the half-written one",
             "service/engine/output_files.py",
             "            await self.store.discard_file(self.row.id)\n",
             "",
             ("tests/test_restart.py::test_sigkill_while_writing_the_output_files",)),
    Breakage("a restarted process submits a native batch again (the stored provider id is ignored)",
             "service/engine/engine.py",
             "        if part.provider_batch_id is None:\n",
             "        if part.provider_batch_id is None or batch.status is BatchStatus.IN_PROGRESS:\n",
             ("tests/test_restart.py::test_sigkill_while_a_native_batch_runs_at_the_provider",)),
    Breakage("a restarted process submits again without asking the provider (find_submitted skipped)",
             "service/engine/engine.py",
             "        if part.submit_started_at is not None:\n            provider_id = await adapter.find_submitted(",
             "        if False:\n            provider_id = await adapter.find_submitted(",
             ("-k", "recovers_a_lost_submission or refuses_the_upload")),
    Breakage("failed lines missing from the error file",
             "service/engine/output_files.py",
             "                await (output if succeeded else errors).add(line)",
             "                if succeeded:\n                    await output.add(line)",
             ("-k", "output_and_error_files or test_full_batch or test_expiry or executor_batch_expires")),
    Breakage("ListFiles ignores `after` in descending order",
             "service/storage/repository.py",
             "                                or_(key[0] < a.created_at, and_(key[0] == a.created_at, key[1] < a.id)))",
             "                                or_(key[0] <= a.created_at))",
             ("tests/test_files_api.py::test_list_files_newest_first_with_cursor_and_order",)),
    Breakage("ListFiles lists oldest first by default",
             "service/edge/file_service.py",
             "ascending=request.order == \"asc\")",
             "ascending=request.order != \"desc\")",
             ("tests/test_files_api.py::test_list_files_newest_first_with_cursor_and_order",)),
    Breakage("results stored twice count twice (on-conflict insert counts every row)",
             "service/storage/repository.py",
             "            new = [by_index[i] for i in inserted]",
             "            new = list(by_index.values())",
             ("tests/test_store.py::test_store_results_counts_each_result_once",)),
]


def run(number: int, b: Breakage) -> tuple[bool, str, float]:
    """Apply, run the tests, restore. (failed?, summary line, seconds)."""
    path = ROOT / b.path
    original = path.read_text()
    assert original.count(b.old) == 1, f"#{number}: the text to break is not in {b.path} exactly once"
    path.write_text(original.replace(b.old, b.new))
    started = time.monotonic()
    try:
        args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider"]
        args += [*b.tests[:2], "tests"] if b.tests[0] == "-k" else list(b.tests)
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    finally:
        path.write_text(original)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED tests/", "ERROR tests/"))]
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return proc.returncode == 1, (lines[0] if lines else summary), time.monotonic() - started


def main(argv: list[str]) -> int:
    chosen = [int(a) for a in argv] or list(range(1, len(BREAKAGES) + 1))
    missed = 0
    print("| # | breakage | file | first failing test | s |")
    print("| --- | --- | --- | --- | --- |")
    for number in chosen:
        b = BREAKAGES[number - 1]
        failed, line, seconds = run(number, b)
        missed += not failed
        verdict = line.removeprefix("FAILED ").removeprefix("ERROR ") if failed else f"**NOTHING FAILED** ({line})"
        print(f"| {number} | {b.what} | `{b.path}` | {verdict} | {seconds:.0f} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

# Sluice: `make run` to try it, `make test` for the whole suite. Both set up everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run serve test postgres lint lint-imports typecheck proto proto-check buf-lint buf-breaking pytest bench mutation breakages clean

## Python's bytecode cache stays on even where the environment turns it off (this machine sets
## PYTHONDONTWRITEBYTECODE): the suite starts hundreds of Python processes (workers, `sluice run`,
## the provider fake), and without the cache each one compiles every module it imports from source
## again (collecting the suite alone: 25 s of CPU per worker instead of 8).
unexport PYTHONDONTWRITEBYTECODE

## uv installs the same versions pip would, and compiles them to bytecode as pip does, in half the
## time; pip only installs uv itself.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv>=0.13,<1'
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

## Start the gRPC server, the engine and Envoy (REST) on SQLite with the simulated provider.
## Real providers join when their keys are in the environment (see providers.example.yaml).
run: $(STAMP)
	SLUICE_PROVIDERS_FILE=$${SLUICE_PROVIDERS_FILE:-providers.example.yaml} $(BIN)/sluice run

## The gRPC server alone (no Envoy).
serve: $(STAMP)
	SLUICE_PROVIDERS_FILE=$${SLUICE_PROVIDERS_FILE:-providers.example.yaml} $(BIN)/sluice serve

## Everything CI checks: lint, types, protobuf lint/breaking/freshness, then the test suite (which
## starts its own throwaway PostgreSQL servers, and installs Sluice from a copy of the clone into a
## fresh venv to prove `sluice run` needs no source tree: tests/test_install.py).
test: $(STAMP) lint lint-imports typecheck buf-lint buf-breaking proto-check pytest

## PostgreSQL's server binaries for the tests (Debian's package; does nothing when they are there).
postgres:
	scripts/install_postgres.sh

lint: $(STAMP)
	$(BIN)/ruff check .

## The layering of service/ and adapters/ (contracts in pyproject.toml, [tool.importlinter]).
lint-imports: $(STAMP)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy service adapters

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

buf-lint: $(STAMP)
	$(BIN)/buf lint

## The contract may not break against the previous commit (skipped when there is none).
buf-breaking: $(STAMP)
	@if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1 && \
	    git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
	  echo "buf breaking --against .git#ref=HEAD~1"; \
	  $(BIN)/buf breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: no previous commit with buf.yaml; skipped"; fi

## Three workers, each module on one of them (its module-scoped servers start once): most tests wait
## on real processes, so three share two cores well. A crashed worker ends the run rather than
## restarting (its module's remaining tests would be lost). PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 3
pytest: $(STAMP) postgres
	$(BIN)/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile --max-worker-restart 0

## Mutation testing, not part of `make test` (docs/mutation.md says how long it takes): mutmut
## mutates the engine, storage, intake and auth modules and runs the fast in-process tests
## against each mutant; the scores and every surviving mutant go to var/mutation-report.md.
## MUTANTS narrows it, e.g. `make mutation MUTANTS='service.edge.auth*'`. Results are kept in
## mutants/ and only mutants whose code or tests changed run again (`rm -rf mutants` starts afresh).
MUTANTS ?=
mutation: $(STAMP)
	$(BIN)/mutmut run $(MUTANTS)
	@mkdir -p var
	$(BIN)/python -m tests.mutation_report > var/mutation-report.md; status=$$?; \
	  sed -n '1,/^$$/p' var/mutation-report.md; echo "full report: var/mutation-report.md"; exit $$status

## The breakages of issue 14 applied to product code one by one; each must fail a test.
breakages: $(STAMP)
	$(BIN)/python -m tests.breakages

## Sluice and LiteLLM's proxy side by side (bench/README.md); BENCH_ARGS=--postgres for PostgreSQL,
## BENCH_ARGS="--rounds 1" for a quick look. LiteLLM goes into its own venv under var/bench/, created
## by the bench, never by `make test`.
bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var mutants .pytest_cache .mypy_cache .ruff_cache

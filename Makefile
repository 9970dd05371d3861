# AIOS developer entry points. `make run` and `make test` are the two a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Parallel test processes (pytest-xdist); each gets its own PostgreSQL schema and Redis prefix.
# 5 on 2 cores: most integration tests wait on real worker/API/beat subprocesses, not on the CPU
# (a CI run at 4 used 12 min of CPU in 10.7 min of wall time).
TEST_WORKERS ?= 5
# What ruff checks and formats (mypy's list is [tool.mypy] files in pyproject.toml).
LINTED := aios aios_client workers webapi tests bench

.PHONY: install run test test-unit test-integration lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

## install: create .venv and install AIOS with its test and lint tools
install: $(STAMP)
	@echo "AIOS and its tools are in $(VENV) (reinstalled when pyproject.toml changes)"

## run: API + one agent + beat on the embedded default (SQLite ledger + SQLite broker), or on
##      PostgreSQL/Redis when AIOS_DATABASE__URL / AIOS_BROKER__URL are set
run: $(STAMP)
	$(BIN)/aios up --migrate

## test: the whole suite (unit + integration on the real PostgreSQL and Redis). .ci/bootstrap first
##       starts PostgreSQL/Redis if they are down and installs missing test tools (as root with apt),
##       else lists what is missing and which tests skip (and stops here under CI=true)
test: $(STAMP)
	.ci/bootstrap
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile -q -ra

## test-unit: the fast tests of plain logic (no PostgreSQL, Redis or processes to start)
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

## test-integration: the tests on the real PostgreSQL, Redis and processes, fault injection included
test-integration: $(STAMP)
	.ci/bootstrap
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile -q -ra tests/integration tests/faults tests/ha

## bench: AIOS against Celery, Flower and a bare Flask ceiling (PostgreSQL and Redis on localhost);
##        rewrites BENCHMARKS.md (15-20 minutes on 2 cores at the spec's sizes, about half of it end to end)
bench: $(STAMP)
	$(BIN)/python bench/run_all.py

## lint: ruff's rules, ruff's formatting (checked, not changed) and mypy ([tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

## format: rewrite the code in ruff's format (what `make lint` checks)
format: $(STAMP)
	$(BIN)/ruff format $(LINTED)

## clean: remove the virtualenv, local state and caches
clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache *.egg-info

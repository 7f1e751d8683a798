# One command for the demo and one for the tests; both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install

$(BIN)/.installed: pyproject.toml
	@echo "Creating $(VENV) and installing pgskewer with its extras (a minute or two)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[notebook,dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	env -u PGSKEWER_DSN -u DATABASE_URL -u PGHOST -u PGPORT -u PGUSER -u PGDATABASE \
		-u PGPASSWORD $(BIN)/python examples/quickstart.py

lint: $(BIN)/.installed
	$(BIN)/ruff check pgskewer tests benchmarks examples
	$(BIN)/mypy --strict pgskewer

test: lint
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_pipelines.py
	$(BIN)/python benchmarks/bench_result_wakeup.py
	$(BIN)/python benchmarks/bench_unblock.py
	$(BIN)/python benchmarks/bench_widget.py

# The two commands: `make serve` (install, then run the gateway) and `make test`
# (install, then run the whole suite). .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve sandbox test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: install
	$(PY) -m gateway

sandbox: install
	$(PY) -m gateway --sandbox

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.hedging

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache

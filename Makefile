# The two commands: `make serve` (install, then run the gateway) and `make test`
# (install, then run the whole suite). .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve sandbox test lint bench bench-hedging soak reliability clean

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

# Performance: gateway overhead against direct calls and a bare proxy, then image work
# against libvips (under 5 minutes on 2 cores). Figures are ratios within one run.
bench: install
	$(PY) -m bench.overhead
	$(PY) -m bench.imaging
	$(PY) -m bench.inputs

bench-hedging: install
	$(PY) -m bench.hedging

# RSS and open files of the gateway over a 10-minute run at concurrency 32.
soak: install
	$(PY) -m bench.overhead --soak 600

# Bad inputs (10,000 generated and hand-made), fault drills on three replicas, and a
# 10-minute soak with mixed faults; prints one table (about 20 minutes on 2 cores).
reliability: install
	$(PY) -m reliability

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache

# The two commands: `make serve` (install, then run the gateway) and `make test`
# (install, then run the whole suite). .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The model card's JavaScript example runs with the official openai npm package (tests/js).
JS_STAMP := tests/js/node_modules/.installed

.PHONY: install serve sandbox test lint bench bench-hedging soak reliability clean

install: $(STAMP) $(JS_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(JS_STAMP): tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

serve: $(STAMP)
	$(PY) -m gateway

sandbox: $(STAMP)
	$(PY) -m gateway --sandbox

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Three pytest workers, each test file on one worker (its module's servers start once): the
# suite waits on sockets far more than it computes, so three share two cores (656 s with
# one worker, 295 s with three). Each worker takes test ports from a range of its own
# (tests/integration/servers.py free_port).
test: install lint
	$(PY) -m pytest -q -n 3 --dist loadfile

# Performance: gateway overhead against direct calls and a bare proxy, image work against
# libvips, input preparation, and CPU per request against the last Starlette-only commit
# (under 8 minutes on 2 cores). Figures are ratios within one run.
bench: install
	$(PY) -m bench.overhead
	$(PY) -m bench.imaging
	$(PY) -m bench.inputs
	$(PY) -m bench.framework
	$(PY) -m bench.scale
	$(PY) -m bench.provider_calls

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

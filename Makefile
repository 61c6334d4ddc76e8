# One command runs the platform, one runs the tests; both build .venv on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench fuzz clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or make PY=python3)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[all]'
	@touch $(STAMP)

# ARGS="--verbose" adds third-party logs; ARGS="--duration 30 --agents 5" stops by itself.
demo: $(STAMP)
	$(BIN)/edgefleet demo $(ARGS)

# Two workers: most tests wait on brokers, agents and timers rather than the CPU. A file's
# tests stay together and the machine-Mosquitto tests share one worker (tests/conftest.py).
# TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cloud edge_agent shared dashboard tests bench
	$(BIN)/ruff format --check cloud edge_agent shared dashboard tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

fuzz: $(STAMP)
	$(BIN)/python -m pytest -q tests/cloud/api/test_openapi_fuzz.py $(ARGS)

clean:
	rm -rf $(VENV) .edgefleet .pytest_cache .mypy_cache .ruff_cache

# Both main commands set up what they need: a virtual environment installed from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out/demo

.PHONY: demo serve test test-jit test-nojit fuzz bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scoring.sim --out $(OUT)

# The API server on localhost with a demo team, workflow and keys (written to out/serve/demo.json);
# `python -m scoring.server.agent --demo out/serve/demo.json` runs fake agents against it.
serve: $(STAMP)
	$(PY) -m scoring.server --host 127.0.0.1 --port 8000 --database sqlite:///out/serve/scoring.db \
		--files out/serve/files --demo out/serve/demo.json --log-level info

test: test-jit test-nojit

test-jit: $(STAMP)
	$(PY) -m pytest

# The same suite with numba off, so every kernel body also runs (and is covered) as plain Python.
test-nojit: $(STAMP)
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest

# Schemathesis at depth (nightly): 300 generated requests per operation and 300 stateful scenarios
# against a real server; CI runs the same tests with 30.
fuzz: $(STAMP)
	SCORING_FUZZ_EXAMPLES=300 $(PY) -m pytest tests/server/test_fuzz.py -q

# The whole ladder up to 1,000,000 agents (about 5 minutes on an idle 2-core machine), then the report and the plot.
bench: $(STAMP)
	mkdir -p out/bench
	$(PY) -m pytest benchmarks --benchmark-json=out/bench/benchmark.json
	$(PY) -m benchmarks.report out/bench/benchmark.json --out out/bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis

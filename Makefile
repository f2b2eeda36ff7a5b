# Each command sets up what it needs: a virtual environment with the package and one extra of
# pyproject.toml (`make demo` the `sim` extra, `make serve` the `server` extra, `make test` and
# `make lint` the `dev` extra, `make bench` the `bench` extra). Each extra has its own stamp, so a
# second command installs only what it lacks, and an edit of pyproject.toml installs again.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo
# Extra arguments of the demo's simulation, e.g. DEMO_ARGS="--tasks 2000" for a shorter run.
DEMO_ARGS ?=

.PHONY: demo serve test test-jit test-nojit test-all fuzz bench bench-server lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The package (editable) with one extra: $(VENV)/.installed-sim, -server, -dev, -bench.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-sim
	$(PY) -m scoring.sim --out $(OUT) $(DEMO_ARGS)

# The API server on localhost with a demo team, workflow and keys (written to out/serve/demo.json);
# `python -m scoring.server.agent --demo out/serve/demo.json` runs fake agents against it.
serve: $(VENV)/.installed-server
	$(PY) -m scoring.server --host 127.0.0.1 --port 8000 --database sqlite:///out/serve/scoring.db \
		--files out/serve/files --demo out/serve/demo.json --log-level info

# CI runs `make test` (.ci/run): every test but the slow ones with the kernels compiled, then the
# kernels' tests again with numba off. `make test-all` adds the slow suites.
# Each run uses $(WORKERS) pytest-xdist workers: the server tests mostly wait on their server
# processes, the Hypothesis suites use a core each; `worksteal` keeps a module's tests together
# (its module-scoped server starts once) and rebalances at the end. WORKERS=0 runs in one process.
# Under -n, tests/conftest.py compiles the kernels once before the workers start.
WORKERS ?= 2
XDIST   := -n $(WORKERS) --dist worksteal
test: test-jit test-nojit

test-jit: $(VENV)/.installed-dev
	$(PY) -m pytest $(XDIST) -m "not slow"

# The tests that exercise the kernels (marked `kernels`) with numba off, so every kernel body also
# runs (and is covered) as plain Python; the server and simulation suites run once, above.
test-nojit: $(VENV)/.installed-dev
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest $(XDIST) -m "kernels and not slow"

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest $(XDIST)
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest $(XDIST) -m kernels

# Schemathesis at depth (nightly): 300 generated requests per operation and 300 stateful scenarios
# against a real server; CI runs the same tests with 30.
fuzz: $(VENV)/.installed-dev
	SCORING_FUZZ_EXAMPLES=300 $(PY) -m pytest tests/server/test_fuzz.py -q

# The whole ladder up to 1,000,000 agents (about 5 minutes on an idle 2-core machine), then the report and the plot.
bench: $(VENV)/.installed-bench
	mkdir -p out/bench
	$(PY) -m pytest benchmarks --benchmark-json=out/bench/benchmark.json
	$(PY) -m benchmarks.report out/bench/benchmark.json --out out/bench

# The API server under load (DESIGN section 12): wrk for submissions (installed when missing),
# simulated agents end to end; writes benchmarks/SERVER.md and benchmarks/server.png (~10 min).
bench-server: $(VENV)/.installed-bench $(VENV)/.installed-server
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	$(PY) -m benchmarks.server $(BENCH_SERVER_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis

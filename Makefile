# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on a fresh machine; re-runs reuse it.
# The install is one pip resolution of the project, its test extra and the torch pin, constrained by
# requirements.lock, so a fresh clone gets exactly the versions the suite was run with (scripts/check_env.py checks).
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP ?= pip==26.3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test test-fast check-env bench triton lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP)"
	$(BIN)/python -m pip install -q -c requirements.lock "$(TORCH)" -e ".[test]"
	$(BIN)/python scripts/check_env.py "$(TORCH)"
	touch $@

# DEMO_ARGS: more of `akd demo`'s arguments, e.g. `make demo DEMO_ARGS=--fresh` after `AKD_DEMO_QUICK=1 make demo`
# (runs/demo is then the quick plan's folder, which the default plan's demo refuses, saying so).
demo: $(STAMP)
	$(BIN)/akd demo --out runs/demo $(DEMO_ARGS)

serve: $(STAMP)
	$(BIN)/python scripts/make_example_teachers.py build/example
	$(BIN)/akd serve --config build/example/teachers.toml

check-env: $(STAMP)
	$(BIN)/python scripts/check_env.py "$(TORCH)"

test: check-env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The edit loop: lint, then the unit tier only (no servers, no subprocesses); `make test` runs every tier.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/akd bench --out runs/bench

# The Triton Inference Server peer of `akd bench` (benchmarks 1, 3 and 6): its own environment, apart from .venv.
# PyTriton's Python backend stub needs Debian's python3.11 (apt-get install python3.11 python3.11-venv): with another
# build of 3.11 (pyenv's) the stub fails in multiprocessing.resource_tracker. About 1.3 GB.
TRITON_PYTHON ?= /usr/bin/python3.11
TRITON_VENV := .venv-triton

$(TRITON_VENV)/.installed: bench/triton-requirements.txt
	@test -x $(TRITON_PYTHON) || { echo "make triton: no $(TRITON_PYTHON) (Debian: apt-get install python3.11 python3.11-venv)"; exit 2; }
	rm -rf $(TRITON_VENV)
	$(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q "$(PIP)"
	$(TRITON_VENV)/bin/python -m pip install -q "$(TORCH)" -r bench/triton-requirements.txt
	PYTHONPATH=$(CURDIR) $(TRITON_VENV)/bin/python -c "import pytriton.triton, tritonclient.http, bench.triton_app, teacher_service.local"
	touch $@

triton: $(TRITON_VENV)/.installed

# requirements.lock: every dependency of .[test,bench] but torch, as pip resolves them beside $(TORCH), unconstrained.
lock:
	rm -rf build/lock && $(PYTHON) -m venv build/lock
	build/lock/bin/python -m pip install -q "$(PIP)"
	build/lock/bin/python -m pip install -q "$(TORCH)" ".[test,bench]"
	{ echo "# Every dependency of \`pip install .[test,bench]\` except torch, pinned: what pip resolved beside $(TORCH)."; \
	  echo "# A constraints file (pip -c): \`make\` installs .[test] and the image .[bench] through it in one resolution with"; \
	  echo "# their torch pin, so both get exactly these versions and nothing else. Regenerate after changing pyproject.toml: make lock"; \
	  build/lock/bin/python -m pip freeze --exclude akd --exclude torch; } > requirements.lock

clean:
	rm -rf $(VENV) $(TRITON_VENV) build runs/demo runs/bench

# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on a fresh machine; re-runs reuse it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/akd demo --out runs/demo

serve: $(STAMP)
	$(BIN)/python scripts/make_example_teachers.py build/example
	$(BIN)/akd serve --config build/example/teachers.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/akd bench --out runs/bench

clean:
	rm -rf $(VENV) build runs/demo runs/bench

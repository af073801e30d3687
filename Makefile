# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on a fresh machine; re-runs reuse it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test bench lock clean

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
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/akd bench --out runs/bench

# requirements.lock: the Docker image's pinned dependencies, as pip resolves pyproject.toml beside $(TORCH).
lock:
	rm -rf build/lock && $(PYTHON) -m venv build/lock
	build/lock/bin/python -m pip install -q "$(TORCH)"
	build/lock/bin/python -m pip install -q ".[bench]"
	{ echo "# The Docker image's dependencies, pinned: what \`pip install .[bench]\` resolved beside $(TORCH) (torch itself"; \
	  echo "# comes from the image's TORCH build argument). Regenerate after changing pyproject.toml: make lock"; \
	  build/lock/bin/python -m pip freeze --exclude akd --exclude torch; } > requirements.lock

clean:
	rm -rf $(VENV) build runs/demo runs/bench

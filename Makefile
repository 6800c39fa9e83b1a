# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first, so pip takes the builds this machine has (see README: Setup)
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch>=2.4" torchvision
	$(BIN)/pip install -q -e .
	touch $@

# the test stack is pinned (constraints/test.txt: the transformers oracle and what the tests assert), so a fresh
# machine tests against exactly what was tested; the runtime above stays unpinned, as it is for users
$(VENV)/.test: $(VENV)/.runtime pyproject.toml constraints/test.txt tests/fixtures/splice_toyconv/pyproject.toml tests/fixtures/splice_tinyllama/pyproject.toml \
              tests/fixtures/splice_classifier/pyproject.toml tests/fixtures/splice_starter/pyproject.toml
	$(BIN)/pip install -q -c constraints/test.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps --no-build-isolation -e tests/fixtures/splice_toyconv -e tests/fixtures/splice_tinyllama \
		-e tests/fixtures/splice_classifier -e tests/fixtures/splice_starter
	touch $@

demo: $(VENV)/.runtime
	OMP_WAIT_POLICY=PASSIVE $(BIN)/splice demo --out out/demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow

# side-by-side with transformers on the same weights (needs the test extra for transformers); see docs/benchmarks.md
bench: $(VENV)/.test
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) out .pytest_cache

# Everything a fresh machine needs: `make demo` and `make test` create the virtualenv themselves.
# `make demo` installs the runtime (requirements.txt) only; `make test` adds the test stack
# (requirements-test.txt: torch, transformers, libtpu ...; requirements-gemma.txt) to that venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test test test-fast lint demo clean

# The runtime: train, checkpoint, export, import and sample (GGUF needs the gguf package).
install: $(RUNTIME_STAMP)

# setuptools>=70.1 (bdist_wheel built in) for the editable install without build isolation.
$(RUNTIME_STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70.1"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(RUNTIME_STAMP)

# The runtime plus the test stack. Depends on the runtime stamp, so a venv that `make demo` made
# (or one whose requirements.txt changed) gets the test stack here.
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP) requirements-test.txt requirements-gemma.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-gemma.txt
	touch $(TEST_STAMP)

# The whole suite, slow end-to-end tests included (what CI runs).
test: install-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=30 tests

# Everything but the tests marked slow.
test-fast: install-test
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

lint: install-test
	$(PY) -m ruff check .

demo: install
	$(PY) -m maxgemma.demo

clean:
	rm -rf $(VENV) build *.egg-info

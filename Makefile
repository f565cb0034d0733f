# Everything a fresh machine needs: `make demo` and `make test` create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt requirements-gemma.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-gemma.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The whole suite, slow end-to-end tests included (what CI runs).
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# Everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

lint: install
	$(PY) -m ruff check .

demo: install
	$(PY) -m maxgemma.demo

clean:
	rm -rf $(VENV) build *.egg-info

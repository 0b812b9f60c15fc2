# make demo: set up .venv and run the ELPV demo end to end.  make test: set up .venv with dev tools and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup clean-venv

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime

demo: $(VENV)/.runtime
	PYTHON=$(PY) bash scripts/demo.sh

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

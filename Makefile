# Two entry points (see README): `make demo` sets up and runs the pipeline on the demo data,
# `make test` sets up and runs the tests. Both create .venv from pyproject.toml on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	dvc repro

test: setup
	$(PY) -m pytest

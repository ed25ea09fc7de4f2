# `make test` and `make bench` set everything up on a fresh machine that has python3 and a C compiler:
# a virtual environment in .venv, torch pinned to a CPU wheel, fastrnn installed in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.fastrnn-installed
BENCH_ARGS ?= --quick

.PHONY: venv test bench info clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[test,bench]"
	touch $@

test: venv
	$(PY) -m pytest tests

bench: venv
	$(PY) -m benchmarks.run $(BENCH_ARGS)

info: venv
	$(PY) -m fastrnn.info

clean:
	rm -rf $(VENV) build *.egg-info

# `make test` and `make bench` set everything up on a fresh machine that has python3 and a C++ compiler:
# a virtual environment in .venv, torch pinned to a CPU wheel, fastrnn installed in editable mode with
# its C++ extension (fastrnn/_C*.so, rebuilt by `make ext` whenever csrc/ changes).
# FASTRNN_DEBUG_BUILD=1 make ext: a debug build of the extension (-O0 -g).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.fastrnn-installed
EXT_STAMP := fastrnn/.ext-built
NINJA_VERSION ?= 1.13.2
BENCH_ARGS ?= --quick

.PHONY: venv ext test test-triton-all bench examples info clean

venv: $(STAMP)

ext: $(EXT_STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) ninja==$(NINJA_VERSION)
	FASTRNN_NO_EXT=1 $(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[test,bench,examples]"
	touch $@

# the extension, built in place (the install above skips it, so it is built once); again after a change in csrc/
$(EXT_STAMP): $(STAMP) $(wildcard csrc/*.cpp csrc/*.h) fastrnn/_build.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

# second pass: the triton backend on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), ~100x slower
# than compiled code, so CI runs its own tests, the parity grid's pairwise cover, the seq == T x step and
# variant tests, the double-backward, in-place and weight-dropout tests, and the eager training op path, on
# two workers;
# `make test-triton-all` runs every test file's triton cases (~20 min here).
TRITON_TESTS ?= tests/test_triton.py tests/test_parity.py tests/test_cells.py tests/test_variants.py \
	tests/test_double_backward.py tests/test_inplace.py tests/test_weight_dropout.py tests/test_cell_options.py \
	tests/test_ops.py::test_eager_training_skips_the_op_layer_with_the_ops_numbers \
	tests/test_cell_train.py::test_one_step_sequence_calls_equal_torch_nn

# first pass: every test, on two workers (in one process it took 744 s of a 33-minute CI at 3ba0914 on a slow
# day, against the 25 allowed: benchmarks/NOTES.md, thirty-fourth session)
test: ext
	$(PY) -m pytest -n 2 tests
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -k triton $(TRITON_TESTS)

test-triton-all: ext
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -k triton tests

bench: ext
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.cell_options --budget 0.2 --out benchmarks/results/cell_options.txt

# the examples with their default, CPU-friendly settings: torch.nn, then fastrnn's automatic backend
examples: ext
	$(PY) -m examples.text_classify --backend torch
	$(PY) -m examples.text_classify --backend auto
	$(PY) -m examples.forecast --backend torch
	$(PY) -m examples.forecast --backend auto --plot examples/forecast.png
	$(PY) -m examples.ddp_train --nproc 2 --backend auto

info: ext
	$(PY) -m fastrnn.info

clean:
	rm -rf $(VENV) build *.egg-info fastrnn/_C*.so $(EXT_STAMP)

#!/usr/bin/env bash
# benchmarks/gpu_check.sh [RESULTS_DIR]: the GPU check, for a machine with one CUDA GPU, in under 8 minutes.
#
#   1. what it needs: torch with CUDA, triton, pytest (+ xdist), numpy, tqdm. It uses what the machine has
#      (a lent GPU machine has them and reaches no package index); whatever is missing it installs with pip
#      from the project's pins (constraints.txt), and says so when pip cannot reach an index;
#   2. the triton backend's tests on CUDA tensors: tests/test_cuda.py (against torch.nn on cuDNN, and against
#      the reference backend for what cuDNN lacks) and tests/test_triton.py;
#   3. the GPU benchmark against cuDNN (python -m benchmarks.run --device cuda --quick).
#
# Everything lands in RESULTS_DIR (default: $OUT when set, else benchmarks/results/gpu): nvidia-smi.txt,
# info.txt, tests.log, tests.xml, bench.txt. Record the numbers in benchmarks/GPU.md.
# Exits 2 with a message on a machine without CUDA; otherwise with the tests' status (0: all passed).
set -u
RESULTS=${1:-${OUT:-}}
case "$RESULTS" in ""|/*) ;; *) RESULTS="$PWD/$RESULTS" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-$PWD/benchmarks/results/gpu}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTRNN_NO_EXT=1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here ($PY's torch: $($PY -c 'import torch; print(torch.__version__)' 2>&1 | tail -1);" \
         "torch.cuda.is_available() is False). Run this on a machine with one CUDA GPU." >&2
    exit 2
fi
mkdir -p "$RESULTS"

missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("triton", "pytest", "xdist", "numpy", "tqdm") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    pkgs=$(echo "$missing" | sed 's/xdist/pytest-xdist/')
    echo "gpu_check: installing $pkgs"
    $PY -m pip install -q -c constraints.txt $pkgs || {
        echo "gpu_check: pip could not install $pkgs (no package index reachable?); carry them as wheels" >&2
        exit 3; }
fi

nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
$PY -m fastrnn.info > "$RESULTS/info.txt" 2>&1
echo "gpu_check: tests (tests/test_cuda.py, tests/test_triton.py) ..."
timeout 300 $PY -m pytest -p no:cacheprovider -n 4 --junitxml="$RESULTS/tests.xml" tests/test_cuda.py \
    tests/test_triton.py -rs > "$RESULTS/tests.log" 2>&1
status=$?
tail -5 "$RESULTS/tests.log"
echo "gpu_check: benchmark against cuDNN ..."
timeout 200 $PY -m benchmarks.run --device cuda --quick --budget 0.3 > "$RESULTS/bench.txt" 2>&1 \
    || echo "gpu_check: the benchmark did not finish (status $?); see $RESULTS/bench.txt"
cat "$RESULTS/bench.txt"
echo "gpu_check: results in $RESULTS (tests exit status $status)"
exit $status

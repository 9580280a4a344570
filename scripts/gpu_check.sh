#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests + benchmarks, logs under $OUT (or ./out).
# Runs from the tree (PYTHONPATH=src); the machine's image has cupy, numpy, ml_dtypes, pytest, hypothesis.
# Usage: bash scripts/gpu_check.sh [pytest selection...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EPKERN_CACHE_DIR="${EPKERN_CACHE_DIR:-/tmp/epkern-cache}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
SEL=("$@")
[ ${#SEL[@]} -eq 0 ] && SEL=(tests -m gpu)
timeout 420 python3 -m pytest -q -p no:cacheprovider "${SEL[@]}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "pytest rc=${PIPESTATUS[0]}"
timeout 120 python3 bench/bench_layout.py --json "$OUT/bench_layout.json" 2>&1 | tee "$OUT/bench_layout.log"

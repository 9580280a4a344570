#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests (in-process), MPS multi-process tests, benchmarks.
# Logs under $OUT (or ./out). Runs from the tree (PYTHONPATH=src).
# Usage: bash scripts/gpu_check.sh [tests|layoutbench|patterns|inprocbench|llbench|mps|mpsraw|bench|llmpsbench|all]...
# Each of tests / mps / bench takes minutes: under a 10-minute limit per command, run them as separate calls,
# or shorten them: TESTS_TIMEOUT (s, default 400), TEST_FILES (default: tests), PYTEST_EXTRA (e.g. --timeout=60),
# TESTS_TAG (log name), STEP_TIMEOUT / MPS_STEPS (mpsraw), LLBENCH_VARIANTS ("bf16 fp8") and LLBENCH_TIMEOUT (llmpsbench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EPKERN_CACHE_DIR="${EPKERN_CACHE_DIR:-/tmp/epkern-cache}"
MPIRUN=(mpiexec --allow-run-as-root -x PYTHONPATH -x PYTHONUNBUFFERED -x EPKERN_CACHE_DIR -x CUDA_MPS_PIPE_DIRECTORY)
what=("$@")
[ ${#what[@]} -eq 0 ] && what=(all)
summary=()
has() { for w in "${what[@]}"; do [ "$w" = "$1" ] || [ "$w" = all ] && return 0; done; return 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# Single-process tests first, without MPS (a process that opened the GPU and the MPS server exclude
# each other); then MPS for the multi-process tests and benchmarks.
if has tests; then
  # shellcheck disable=SC2086
  timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -rfE --durations=12 ${PYTEST_EXTRA:-} \
    -m "gpu and not mpi" ${TEST_FILES:-tests} 2>&1 | tee "$OUT/${TESTS_TAG:-gpu_tests}.log" | tail -15
  summary+=("${TESTS_TAG:-gpu_tests} rc=${PIPESTATUS[0]}: $(tail -1 "$OUT/${TESTS_TAG:-gpu_tests}.log")")
fi
if has patterns; then
  timeout 300 python3 bench/bench_copy_patterns.py --json "$OUT/bench_copy_patterns.json" 2>&1 | tee "$OUT/bench_copy_patterns.log" | tail -4
fi
if has inprocbench; then
  timeout 300 python3 bench/bench_ht.py --inprocess 8 --tokens 4096 --iters 10 \
    --json "$OUT/bench_ht_inproc8.json" 2>&1 | tee "$OUT/bench_ht_inproc8.log" | tail -9
fi
if has llbench; then
  timeout 500 python3 bench/bench_ll.py --inprocess 8 --tokens 128 --json "$OUT/bench_ll_inproc8.json" 2>&1 |
    tee "$OUT/bench_ll_inproc8.log" | tail -14
fi
if has layoutbench; then
  timeout 120 python3 bench/bench_layout.py --json "$OUT/bench_layout.json" 2>&1 | tee "$OUT/bench_layout.log"
fi
if has mps || has mpsraw || has bench || has llmpsbench; then
  bash scripts/mps.sh start
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/epkern-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/epkern-mps-log
fi
if has mps; then
  timeout 560 python3 -m pytest -q -p no:cacheprovider -m "gpu and mpi" tests/test_ht_mps.py 2>&1 | tee "$OUT/mps_tests.log" | tail -8
  summary+=("mps tests rc=${PIPESTATUS[0]}: $(tail -1 "$OUT/mps_tests.log")")
fi
if has mpsraw; then
  # The MPS workers one by one, each under its own limit (STEP_TIMEOUT), with their wall time: partial
  # results survive a slow step. MPS_STEPS picks and orders them ("ht:8 ll:8 ..."; ":absent" = --absent).
  for step in ${MPS_STEPS:-ht:8 ll:8 ht:4 ll:4 ht:2 ll:2 ht:4:absent ll:4:absent}; do
    IFS=: read -r kind n extra <<<"$step"
    log="$OUT/mps_${kind}_${n}${extra:+_$extra}.log"
    t0=$(date +%s)
    timeout "${STEP_TIMEOUT:-240}" "${MPIRUN[@]}" --oversubscribe -n "$n" python3 "tests/${kind}_mpi_worker.py" \
      ${extra:+--$extra} >"$log" 2>&1
    rc=$?
    summary+=("mps $step rc=$rc $(($(date +%s) - t0)) s: $(grep -c '^OK rank' "$log") OK; $(grep -m1 -E 'Error|error' "$log" | cut -c1-240)")
  done
fi
if has bench; then
  timeout 300 "${MPIRUN[@]}" -n 8 python3 bench/bench_ht.py --tokens 512,1024,2048,4096 --iters 6 \
    --json "$OUT/bench_ht_mps8.json" --plot "$OUT/bench_ht_mps8.png" 2>&1 | tee "$OUT/bench_ht_mps8.log" | tail -18
fi
if has llmpsbench; then
  for variant in ${LLBENCH_VARIANTS:-bf16 fp8}; do
    fp8=""; [ "$variant" = fp8 ] && fp8=--fp8
    timeout "${LLBENCH_TIMEOUT:-280}" "${MPIRUN[@]}" -n 8 python3 bench/bench_ll.py --tokens 128 $fp8 \
      --json "$OUT/bench_ll_mps8${fp8}.json" 2>&1 | tee "$OUT/bench_ll_mps8${fp8}.log" | tail -14
  done
fi
if has mps || has mpsraw || has bench || has llmpsbench; then bash scripts/mps.sh stop; fi
echo "==== summary"
printf '%s\n' "${summary[@]}"

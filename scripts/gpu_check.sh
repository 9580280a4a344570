#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests (in-process), MPS multi-process tests, benchmarks.
# Logs under $OUT (or ./out). Runs from the tree (PYTHONPATH=src).
# Usage: bash scripts/gpu_check.sh [ncu|faults|deepep|firsthour|mpsraw|htalt|htinterbench|llmpsbench|llnicbench|abbench|htsweep|patternmps|bench|patternsplit|mps|tests|absentrepro|absentloop|multigpu|layoutbench|patterns|inprocbench|llbench|all]...
# (multigpu: a machine of several GPUs, issue #6; with `tests` the in-process ranks spread over its GPUs too.)
# Steps run in the order of this file, MPS ones first (a process that opened the GPU without MPS and the MPS
# server exclude each other, and a crashed in-process run can hold the GPU for a while).
# Knobs: STEP_TIMEOUT / MPS_STEPS (mpsraw: "ht:8 ll:8 ll:4:absent ..."), LLBENCH_VARIANTS ("bf16 fp8") and
# LLBENCH_TIMEOUT (llmpsbench), LLBENCH_EXTRA (bench_ll.py options, e.g. --zero-copy), HTSWEEP_VARIANTS ("threads:blocks_per_sm:dunroll:cunroll:loads_first ...") and HTSWEEP_NP ("2 4 8", htsweep), TEST_FILES (tests: each file in
# its own pytest process, so one crashed CUDA context cannot fail the next file), FILE_TIMEOUT (s per file),
# PYTEST_EXTRA, PYTEST_K (pytest -k, spaces kept), DEEPEP_BENCH_EXTRA (bench_deep_ep.py options, e.g. --profile 5), PACK (1: all logs into $OUT/logs.tgz beside summary.txt). Never give pytest-timeout to in-process tests: it abandons rank threads that keep running.
# Measured on the H200 (2026-12-01, kernels compiled and cached): ht:8 15 s, ll:4:absent ~8 s, one bench_ll
# variant ~9 s, bench_ht at 4096 tokens ~6 s, rdma tests 3 s, the in-process LL tests 2-3 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EPKERN_CACHE_DIR="${EPKERN_CACHE_DIR:-/tmp/epkern-cache}"
MPIRUN=(mpiexec --allow-run-as-root -x PYTHONPATH -x PYTHONUNBUFFERED -x EPKERN_CACHE_DIR -x CUDA_MPS_PIPE_DIRECTORY)
# Every other EPKERN_* variable set here (EPKERN_TIMEOUT_S, EPKERN_IPC, ...) reaches the ranks too.
for v in $(compgen -e | grep '^EPKERN_' | grep -v '^EPKERN_CACHE_DIR$'); do MPIRUN+=(-x "$v"); done
what=("$@")
[ ${#what[@]} -eq 0 ] && what=(all)
# Each finding goes to $OUT/summary.txt as it is made, so a call cut short still returns what ran.
note() { printf '%s\n' "$1" >>"$OUT/summary.txt"; }
: >"$OUT/summary.txt"
# Every step's limit is cut to what is left of GPU_CHECK_BUDGET (s, default 540: the device tool stops a command at
# 600), so the archive of logs is always written: a step that would start past the budget is skipped.
deadline=$(($(date +%s) + ${GPU_CHECK_BUDGET:-540}))
timeout() {
  local t=$1 left=$((deadline - $(date +%s)))
  shift
  if [ "$left" -le 5 ]; then
    echo "gpu_check: skipped (GPU_CHECK_BUDGET spent): $*" >&2
    return 124
  fi
  [ "$t" -gt "$left" ] && t=$left
  command timeout "$t" "$@"
}
has() { for w in "${what[@]}"; do [ "$w" = "$1" ] || [ "$w" = all ] && return 0; done; return 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
mps_steps() { # does any requested step run under MPS?
  for w in mps mpsraw htalt bench htinterbench llmpsbench llnicbench abbench htsweep patternmps firsthour faults deepep; do has "$w" && return 0; done
  return 1
}
if mps_steps; then
  bash scripts/mps.sh start
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/epkern-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/epkern-mps-log
  # A client must get the GPU through MPS before anything is timed (session L: right after a previous call's MPS
  # server, every rank got cudaErrorDevicesUnavailable and each step waited out its limit): restart once if not.
  mps_probe() { timeout 60 python3 -c "import cupy; assert int((cupy.arange(4) + 1).sum()) == 10" >>"$OUT/mps_probe.log" 2>&1; }
  if ! mps_probe; then
    bash scripts/mps.sh restart
    mps_probe
    note "MPS probe failed once, restarted: rc=$? ($(grep -m1 -i error "$OUT/mps_probe.log" | cut -c1-200))"
  fi
fi
if has firsthour; then
  # Issue #21: the doctor with MPS running (text and --json); without MPS below, with the demo and the examples.
  timeout 300 python3 -m epkern.doctor >"$OUT/doctor_mps.txt" 2>&1
  note "doctor (MPS on) rc=$?: $(sed -n '/^\[smoke\]/,$p' "$OUT/doctor_mps.txt" | tr -s ' \n' ' ' | cut -c1-240)"
  timeout 300 python3 -m epkern.doctor --json >"$OUT/doctor_mps.json" 2>"$OUT/doctor_mps_json.err"
  note "doctor --json (MPS on) rc=$?"
fi
if has faults; then
  # Issue #20: tests/fault_injection.py, 4 MPS processes, rank 3 misbehaves (FAULT_TIMEOUT: the deadline, s).
  # The kill scenarios need a launcher that keeps the job alive: Open MPI 4 --enable-recovery, 5 --with-ft ulfm.
  ompi_info 2>/dev/null | grep -m1 "Open MPI:" >"$OUT/ompi.txt"
  ompi_major=$(sed -n 's/.*Open MPI: *v\{0,1\}\([0-9]*\)\..*/\1/p' "$OUT/ompi.txt")
  ft=(--enable-recovery)
  [ "${ompi_major:-4}" -ge 5 ] && ft=(--with-ft ulfm)
  for sc in ${FAULT_SCENARIOS:-ht_dispatch_silent ht_combine_silent late_buffer kill_ht_dispatch kill_ht_combine kill_ll_dispatch}; do
    extra=()
    [[ $sc == kill* ]] && extra=("${ft[@]}")
    EPKERN_TIMEOUT_S=${FAULT_TIMEOUT:-4} timeout 90 "${MPIRUN[@]}" "${extra[@]}" -x EPKERN_TIMEOUT_S --oversubscribe -n 4 \
      python3 tests/fault_injection.py "$sc" >"$OUT/fault_$sc.log" 2>&1
    note "fault $sc rc=$?: $(grep -c '^PASS' "$OUT/fault_$sc.log") PASS, $(grep -c '^FAIL' "$OUT/fault_$sc.log") FAIL; $(grep -m1 -E '^FAIL|Error' "$OUT/fault_$sc.log" | cut -c1-200)"
  done
  note "faults ran under: $(cat "$OUT/ompi.txt"), kill scenarios with ${ft[*]}"
fi
if has deepep; then
  # Issue #19: tests/deep_ep_worker.py, DeepEP-style scenarios through epkern.deep_ep as DEEPEP_NP processes under
  # torch.distributed (gloo rendezvous), all on device 0 through MPS. DEEPEP_RPN: virtual nodes of that many ranks
  # (the HT cases across nodes, graph capture included; then the step skips LL and the benchmark).
  for n in ${DEEPEP_NP:-2 4 8}; do
    rdv="/tmp/epkern-deepep-rdv-$n-$$"
    rm -f "$rdv"
    t0=$(date +%s)
    for r in $(seq 0 $((n - 1))); do
      EPKERN_RANKS_PER_NODE=${DEEPEP_RPN:-${EPKERN_RANKS_PER_NODE:-}} timeout "${STEP_TIMEOUT:-240}" \
        python3 tests/deep_ep_worker.py "$r" "$n" "$rdv" gpu >"$OUT/deepep_${n}_$r.log" 2>&1 &
    done
    wait
    note "deepep n=$n $(($(date +%s) - t0)) s: $(cat "$OUT"/deepep_"${n}"_*.log | grep -c '^OK rank') OK; $(cat "$OUT"/deepep_"${n}"_*.log | grep -m1 -E 'Error|error' | cut -c1-240)"
  done
  # The front end against the CuPy API, same calls, one run: 8 MPS processes (HT 4096 tokens, LL 128, H 7168).
  [ -n "${DEEPEP_RPN:-}" ] || timeout 300 "${MPIRUN[@]}" -n 8 python3 bench/bench_deep_ep.py ${DEEPEP_BENCH_EXTRA:-} --json "$OUT/bench_deep_ep_mps8.json" \
    >"$OUT/bench_deep_ep_mps8.log" 2>&1
  note "bench_deep_ep rc=$?: $(grep -E '^(ht|ll)_' "$OUT/bench_deep_ep_mps8.log" | awk '{printf "%s %s %s/%s/%s; ", $1, $2, $3, $4, $5}') $(grep -m1 'bitwise' "$OUT/bench_deep_ep_mps8.log")"
  grep '^trace ' "$OUT/bench_deep_ep_mps8.log" >>"$OUT/summary.txt" # --trace: each HT call's kernels in its GPU window
  grep -E '^(cupy|deep_ep): LL calls' "$OUT/bench_deep_ep_mps8.log" >>"$OUT/summary.txt" # how LL calls were served
fi
if has mps; then
  timeout 560 python3 -m pytest -q -p no:cacheprovider -m "gpu and mpi" tests/test_ht_mps.py tests/test_nic_device_ranks.py 2>&1 | tee "$OUT/mps_tests.log" | tail -8
  note "mps tests rc=${PIPESTATUS[0]}: $(tail -1 "$OUT/mps_tests.log")"
fi
if has mpsraw; then
  # The MPS workers one by one, each under its own limit (STEP_TIMEOUT), with their wall time: partial
  # results survive a slow step. MPS_STEPS picks and orders them ("ht:8 ll:8 nic:2 ..."; ":absent" = --absent).
  for step in ${MPS_STEPS:-ht:8 ll:8 nic:2 ht:4 ll:4 ht:2 ll:2 ht:4:absent ll:4:absent}; do
    IFS=: read -r kind n extra <<<"$step"
    log="$OUT/mps_${kind}_${n}${extra:+_$extra}.log"
    t0=$(date +%s)
    timeout "${STEP_TIMEOUT:-240}" "${MPIRUN[@]}" --oversubscribe -n "$n" python3 -m mpi4py "tests/${kind}_mpi_worker.py" \
      ${extra:+--$extra} >"$log" 2>&1
    rc=$?
    note "mps $step rc=$rc $(($(date +%s) - t0)) s: $(grep -c '^OK rank' "$log") OK; $(grep -m1 -E 'Error|error' "$log" | cut -c1-240)"
  done
fi
if has bench; then
  timeout 300 "${MPIRUN[@]}" -n 8 python3 bench/bench_ht.py --tokens 512,1024,2048,4096 --iters 6 \
    --json "$OUT/bench_ht_mps8.json" --plot "$OUT/bench_ht_mps8.png" 2>&1 | tee "$OUT/bench_ht_mps8.log" | tail -18
fi
if has htalt; then
  # Issue #18, session N: back-to-back dispatch / combine pairs across nodes failed on the H100 with ranks per node
  # > 1 (a hang at 2 x 4; 1 x 8 passed). Only the pairs (10 s deadline), then the same
  # with the host waiting for the dispatch and the NIC between the two (ALT_RPN: ranks per node, default "2 4").
  # ALT_MODES (default "alt alt-drain"): "graph" runs the worker's HT-in-a-CUDA-graph scenario across nodes instead.
  for rpn in ${ALT_RPN:-2 4}; do
    for mode in ${ALT_MODES:-alt alt-drain}; do
      log="$OUT/htalt_${rpn}_$mode.log"
      t0=$(date +%s)
      timeout "${STEP_TIMEOUT:-60}" "${MPIRUN[@]}" --oversubscribe -n $((2 * rpn)) python3 -m mpi4py \
        tests/ht_inter_mpi_worker.py --rpn="$rpn" --"$mode" >"$log" 2>&1
      note "htalt rpn=$rpn $mode rc=$? $(($(date +%s) - t0)) s: $(grep -c '^OK rank' "$log") OK; $(grep -c 'pairs exact' "$log") x10 pairs; $(grep -m2 -E 'Error: ' "$log" | cut -c1-400 | tr '\n' ' ')"
    done
  done
fi
if has htinterbench; then
  # Issue #18: HT across 2 virtual nodes of 4 (8 MPS processes, the emulated NIC) beside the same run as one node of
  # 8; network bytes against the minimum. HTINTER_TOKENS (default 4096; the emulated NIC is slow: try 512 first),
  # HTINTER_NP (processes, default 8; 16 with HTINTER_RPN="8" for two nodes of 8), HTINTER_RPN (default "4 0").
  for rpn in ${HTINTER_RPN:-4 0}; do
    timeout "${HTINTER_TIMEOUT:-300}" "${MPIRUN[@]}" -n "${HTINTER_NP:-8}" python3 bench/bench_ht.py \
      --tokens "${HTINTER_TOKENS:-4096}" \
      --iters "${HTINTER_ITERS:-5}" --ranks-per-node "$rpn" --json "$OUT/bench_ht_inter_rpn${rpn}.json" 2>&1 |
      tee "$OUT/bench_ht_inter_rpn${rpn}.log" | tail -16
    note "htinterbench rpn=$rpn rc=${PIPESTATUS[0]}: $(grep -m1 'network:' "$OUT/bench_ht_inter_rpn${rpn}.log")"
  done
fi
if has llmpsbench; then
  for variant in ${LLBENCH_VARIANTS:-bf16 fp8}; do
    fp8=""; [ "$variant" = fp8 ] && fp8=--fp8
    timeout "${LLBENCH_TIMEOUT:-280}" "${MPIRUN[@]}" -n 8 python3 bench/bench_ll.py --tokens 128 $fp8 ${LLBENCH_EXTRA:-} \
      --json "$OUT/bench_ll_mps8${fp8}.json" 2>&1 | tee "$OUT/bench_ll_mps8${fp8}.log" | tail -14
  done
fi
if has llnicbench; then
  # Issue #17: LL over virtual nodes (8 MPS processes, each of NICBENCH_RPN ranks per node, default "4"), IPC / PROXY
  # / RDMA, each of NICBENCH_VARIANTS ("bf16", "fp8"), 128 tokens; IPC once per variant (ranks per node change
  # nothing for it); then the emulated NIC's own ceiling (GPU memory).
  for var in ${NICBENCH_VARIANTS:-bf16}; do
    flags=(); [ "$var" = fp8 ] && flags=(--fp8)
    rpns="${NICBENCH_RPN:-4}"
    for rpn in $rpns; do
      for tr in ${NICBENCH_TRANSPORTS:-ipc proxy rdma}; do
        [ "$tr" = ipc ] && [ "$rpn" != "${rpns%% *}" ] && continue
        name="${tr}_${var}_rpn${rpn}"; log="$OUT/bench_ll_nic_${name}.log"
        split=(--ranks-per-node "$rpn"); [ "$tr" = ipc ] && split=() # the all-IPC baseline: one node
        # --calls 10: about 220 calls per run; over the emulated NIC each takes tens of ms (docs/performance.md, L)
        tmo=${LLBENCH_TIMEOUT:-300}
        timeout "$tmo" "${MPIRUN[@]}" -n 8 python3 bench/bench_ll.py --tokens 128 --iters 10 --calls 10 \
          --watchdog $((tmo - 15)) "${flags[@]}" --transport "$tr" "${split[@]}" --json "$OUT/bench_ll_nic_${name}.json" >"$log" 2>&1
        rc=$?
        # a killed MPS client can leave the server refusing new ones (cudaErrorDevicesUnavailable): restart it
        [ $rc != 0 ] && bash scripts/mps.sh restart >>"$OUT/mps_restarts.log" 2>&1
        note "llnicbench $name rc=$rc: $(grep -o 'validated=[A-Za-z]*' "$log" | head -1) $(grep -E '^ +128 +(dispatch|combine|dispatch_pipelined|combine_pipelined) ' "$log" | awk '{printf "%s %s; ", $2, $3}') $(grep -m1 'NIC per LL call' "$log")"
      done
    done
  done
  timeout 120 python3 bench/bench_emulated_nic.py --json "$OUT/bench_emulated_nic.json" >"$OUT/bench_emulated_nic.log" 2>&1
  note "emulated NIC ceiling rc=$?: $(tail -8 "$OUT/bench_emulated_nic.log" | tr -s ' \n' ' ')"
fi
if has abbench; then
  # A/B against another tree (AB_BASE: a checkout of the previous commit beside this one, e.g. .base): 8 MPS ranks,
  # HT at 4096 tokens and LL at 128 tokens (BF16), base and this tree AB_ROUNDS times, the first side alternating, same machine.
  # AB_HT_EXTRA: more bench_ht.py options (a later --iters wins; --ranks-per-node 4: across 2 virtual nodes); AB_LL=0: HT only.
  # AB_NEW_EXTRA: bench_ht.py options of the new side only; with AB_BASE=. an A/B of a switch in one tree
  # (e.g. AB_BASE=. AB_NEW_EXTRA="--replay-graph 1").
  for round in $(seq 1 "${AB_ROUNDS:-2}"); do
    sides="base new"; [ $((round % 2)) = 0 ] && sides="new base" # alternate which side runs first
    for side in $sides; do
      dir=$PWD; [ "$side" = base ] && dir=$(cd "${AB_BASE:-.base}" && pwd)
      log="$OUT/ab_${side}_${round}"
      side_extra=""; [ "$side" = new ] && side_extra="${AB_NEW_EXTRA:-}"
      # shellcheck disable=SC2086
      (cd "$dir" && PYTHONPATH="$dir/src" timeout 200 "${MPIRUN[@]}" -n 8 python3 bench/bench_ht.py --tokens 4096 \
        --iters 10 ${AB_HT_EXTRA:-} $side_extra --json "${log}_ht.json" >"${log}_ht.log" 2>&1)
      note "ab $side $round ht rc=$?: $(grep -E '^ +4096 +(layout_dispatch|dispatch|cached_dispatch|cached_dispatch_pipelined|combine|combine_pipelined|combine_fresh|combine_buffer|combine_buffer_pipelined|combine_alloc) ' "${log}_ht.log" | awk '{printf "%s %s/%s; ", $2, $3, $NF}')"
      [ "${AB_LL:-1}" = 0 ] && continue
      (cd "$dir" && PYTHONPATH="$dir/src" timeout 200 "${MPIRUN[@]}" -n 8 python3 bench/bench_ll.py --tokens 128 \
        --iters 10 --calls 50 --json "${log}_ll.json" >"${log}_ll.log" 2>&1)
      note "ab $side $round ll rc=$?: $(grep -o 'validated=[A-Za-z]*' "${log}_ll.log" | head -1) $(grep -E '^ +128 +(dispatch|dispatch_pipelined|combine|combine_pipelined|pair_graph|dispatch_host|combine_host|dispatch_host_prepared|combine_host_prepared|dispatch_host_library|combine_host_library) ' "${log}_ll.log" | awk '{printf "%s %s; ", $2, $3}')"
    done
  done
fi
if has htsweep; then
  # HT launch shapes, 8 MPS ranks, 4096 tokens, BF16: each variant threads:blocks_per_sm:dunroll:cunroll:loads_first.
  # HTSWEEP_NP: the rank counts ("8", or "2 4 8"): 4096 tokens per rank each.
  for np_ in ${HTSWEEP_NP:-8}; do
    for v in ${HTSWEEP_VARIANTS:-512:1:4:2:0 512:2:4:2:0 1024:1:4:2:0 512:1:4:1:1 256:4:4:2:0}; do
      IFS=: read -r th bps du cu lf <<<"$v"
      log="$OUT/bench_ht_sweep_n${np_}_${th}_${bps}_${du}_${cu}_${lf}.log"
      timeout "${LLBENCH_TIMEOUT:-120}" "${MPIRUN[@]}" -n "$np_" python3 bench/bench_ht.py --tokens 4096 --iters 6 \
        --threads "$th" --blocks-per-sm "$bps" --dunroll "$du" --cunroll "$cu" --loads-first "$lf" ${HTSWEEP_EXTRA:-} >"$log" 2>&1
      rc=$?
      note "htsweep n=$np_ $v rc=$rc: $(grep -E '^ +4096 +(cached_dispatch|cached_dispatch_pipelined|combine|combine_pipelined) ' "$log" | awk '{printf "%s %s us %s; ", $2, $3, $6}')"
    done
  done
fi
if has patternmps; then
  # The copy loops alone as 8 MPS processes, each its own rank's share on its own memory (no IPC, no sync).
  timeout 200 "${MPIRUN[@]}" -n 8 python3 bench/bench_copy_patterns.py --mpi ${PATTERN_IPC:-} ${PATTERN_SHAPES:---shape 512:4:1:0:0 --shape 512:2:1:0:1 --shape 512:2:1:0:0} \
    --json "$OUT/bench_copy_patterns_mps8.json" >"$OUT/bench_copy_patterns_mps8.log" 2>&1
  note "patternmps rc=$?: $(grep -o '"kind": "[a-z]*", "threads": [0-9]*, "unroll": [0-9]*\|"loads_first": [0-9]*, "us": [0-9.]*\|"ratio": [0-9.]*' "$OUT/bench_copy_patterns_mps8.log" | tr '\n' ' ')"
fi
if mps_steps; then
  bash scripts/mps.sh stop
  sleep 2
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY # the in-process runs below are no MPS clients
fi
if has firsthour; then
  timeout 300 python3 -m epkern.doctor >"$OUT/doctor_nomps.txt" 2>&1
  note "doctor (MPS off) rc=$?: $(sed -n '/^\[smoke\]/,$p' "$OUT/doctor_nomps.txt" | tr -s ' \n' ' ' | cut -c1-240)"
  EPKERN_LOG_LEVEL=INFO EPKERN_CACHE_DIR=/tmp/epkern-cache-demo timeout 300 python3 -m epkern.demo --backend gpu \
    >"$OUT/demo_gpu.log" 2>&1
  note "demo gpu (cold cache) rc=$?: $(grep -c 'compiled ' "$OUT/demo_gpu.log") compiles; $(grep -m1 validated "$OUT/demo_gpu.log")"
  timeout 600 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_examples_cpu.py >"$OUT/examples_gpu.log" 2>&1
  note "examples gpu rc=$?: $(tail -1 "$OUT/examples_gpu.log")"
fi
if has absentrepro; then
  # The reproducer of the absent-rank failure (docs/architecture.md, Known problems): another LL test first in the
  # same process, with a cold kernel cache of its own; runs before the other in-process tests.
  log="$OUT/absent_repro.log"
  EPKERN_CACHE_DIR="/tmp/epkern-cache-repro" timeout "${FILE_TIMEOUT:-300}" python3 -m pytest -q \
    -p no:cacheprovider -rfE -m "gpu and not mpi" tests/test_ll_gpu.py -k "zero_tokens or absent" >"$log" 2>&1
  note "absent repro rc=$?: $(tail -1 "$log")"
fi
if has ncu; then
  # Issue #22 item 5: Nsight Compute readings (DRAM throughput, top stall reasons) of every HT and LL kernel at the
  # benchmark shapes, one call each inside bench/ncu_kernels.py's profiler range, with ONE in-process rank: ncu
  # replays a kernel alone, and a kernel that waits for peers' kernels cannot be replayed beside them. Without MPS
  # (ncu does not profile MPS clients). NCU_EXTRA: more ncu_kernels.py options (e.g. --tokens 512).
  # shellcheck disable=SC2086
  timeout "${NCU_TIMEOUT:-240}" ncu --profile-from-start off --clock-control none -k regex:"${NCU_KERNELS:-epk_(ht|ll)_(dispatch|combine)}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
    --section Occupancy python3 bench/ncu_kernels.py ${NCU_EXTRA:-} >"$OUT/ncu.log" 2>&1
  note "ncu rc=$?: $(grep -cE '^ +epk_' "$OUT/ncu.log") kernels; $(grep -m1 'ncu_kernels:' "$OUT/ncu.log"); $(grep -m1 -E 'ERR|rror' "$OUT/ncu.log" | cut -c1-200)"
  note "$(grep -E '^ +epk_|DRAM Throughput|^ +Duration|Memory Throughput' "$OUT/ncu.log" | tr -s ' ' | head -40 | tr '\n' ';')"
fi
if has tests; then
  for f in ${TEST_FILES:-tests/test_rdma_gpu.py tests/test_layout_gpu.py tests/test_ll_gpu.py tests/test_ht_gpu.py tests/test_nic_device_ranks.py}; do
    [ -f "$f" ] || continue
    log="$OUT/pytest_$(basename "$f" .py).log"
    # shellcheck disable=SC2086
    timeout "${FILE_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE --durations=8 ${PYTEST_EXTRA:-} \
      ${PYTEST_K:+-k "$PYTEST_K"} -m "gpu and not mpi" "$f" >"$log" 2>&1
    rc=$?
    note "$(basename "$f") rc=$rc: $(grep -E ' (passed|failed|errors?)[ ,]' "$log" | tail -1)" # not tail -1: exit-time noise can follow
  done
fi
if has absentloop; then
  # The flaky in-process absent-rank LL test (docs/architecture.md, Known problems): ABSENT_RUNS runs, each with
  # a cold kernel cache (the failures were seen on fresh machines only); the logs keep the signal dumps.
  for i in $(seq 1 "${ABSENT_RUNS:-4}"); do
    log="$OUT/absent_run_$i.log"
    EPKERN_CACHE_DIR="/tmp/epkern-cache-absent-$i" timeout "${FILE_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider \
      -rfE -m "gpu and not mpi" tests/test_ll_gpu.py -k absent >"$log" 2>&1
    note "absent run $i rc=$?: $(tail -1 "$log")"
  done
fi
if has multigpu; then
  # Issue #6, a machine of several GPUs (no MPS): one process per GPU. NVLink multicast stays off throughout.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  ngpu=$(nvidia-smi -L | wc -l)
fi
if has multigpu && [ "$ngpu" -lt 2 ]; then
  note "multigpu: skipped, $ngpu GPU"
elif has multigpu; then
  MG=("${MPIRUN[@]}" -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -n "$ngpu")
  timeout 180 python3 bench/bench_p2p.py --json "$OUT/bench_p2p.json" >"$OUT/bench_p2p.log" 2>&1
  note "p2p rc=$?: $(tail -1 "$OUT/bench_p2p.log")"
  for w in ht ll; do
    timeout "${STEP_TIMEOUT:-240}" "${MG[@]}" python3 -m mpi4py "tests/${w}_mpi_worker.py" >"$OUT/multigpu_${w}.log" 2>&1
    note "$ngpu-GPU $w worker rc=$?: $(grep -c '^OK rank' "$OUT/multigpu_${w}.log") OK"
  done
  for fp8 in "" --fp8; do
    timeout 300 "${MG[@]}" python3 bench/bench_ht.py --tokens 4096 $fp8 --json "$OUT/mg_ht$fp8.json" >"$OUT/mg_ht$fp8.log" 2>&1
    timeout 300 "${MG[@]}" python3 bench/bench_ll.py --tokens 128 $fp8 --json "$OUT/mg_ll$fp8.json" >"$OUT/mg_ll$fp8.log" 2>&1
    timeout 300 "${MG[@]}" python3 bench/bench_a2a_nccl.py --tokens 4096 $fp8 --json "$OUT/mg_a2a$fp8.json" \
      >"$OUT/mg_a2a$fp8.log" 2>&1
    note "$ngpu-GPU benches ${fp8:-bf16}: ht/ll/a2a logs under mg_*$fp8.log"
  done
fi
if has patterns; then
  timeout 300 python3 bench/bench_copy_patterns.py --json "$OUT/bench_copy_patterns.json" 2>&1 | tee "$OUT/bench_copy_patterns.log" | tail -4
fi
if has patternsplit; then
  # One process, the work as 1 and as 8 concurrent launches on 8 streams (8 ranks' kernels without MPS).
  for split in 1 8; do
    timeout 200 python3 bench/bench_copy_patterns.py --split $split ${PATTERN_SHAPES:---shape 512:4:1:0:0 --shape 512:2:1:0:1 --shape 512:2:1:0:0} \
      --json "$OUT/bench_copy_patterns_split$split.json" >"$OUT/bench_copy_patterns_split$split.log" 2>&1
    note "patternsplit $split rc=$?: $(grep -o '"kind": "[a-z]*", "threads": [0-9]*, "unroll": [0-9]*\|"loads_first": [0-9]*, "us": [0-9.]*\|"ratio": [0-9.]*' "$OUT/bench_copy_patterns_split$split.log" | tr '\n' ' ')"
  done
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
echo "==== summary"
cat "$OUT/summary.txt"
# The device tool returns at most 8 files: with PACK=1 (default) every log goes into one archive.
if [ "${PACK:-1}" = 1 ]; then
  (cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.txt ! -name logs.tgz -printf '%P\n' >/tmp/gpu_check_files &&
    tar czf logs.tgz -T /tmp/gpu_check_files && xargs rm -f </tmp/gpu_check_files)
fi

#!/usr/bin/env bash
# Start (or stop) the CUDA MPS daemon so several processes share one GPU concurrently.
#   bash scripts/mps.sh start | stop | restart
set -euo pipefail
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/epkern-mps-pipe}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/epkern-mps-log}"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
# `quit` returns before the daemon and its server have exited; a new daemon started meanwhile hands clients
# cudaErrorDevicesUnavailable (seen in session L, two calls in a row on one machine): wait up to 30 s for them.
wait_mps_gone() {
  for _ in $(seq 30); do
    pgrep -f nvidia-cuda-mps >/dev/null || return 0
    sleep 1
  done
  echo "MPS processes still running after 30 s: $(pgrep -af nvidia-cuda-mps | tr '\n' ';')" >&2
}
case "${1:-start}" in
  start)
    wait_mps_gone
    # The MPS server cannot start while a process without MPS still holds the GPU (a test run that is
    # still exiting): wait up to 30 s for the GPU to have no compute processes.
    for _ in $(seq 30); do
      [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break
      sleep 1
    done
    nvidia-cuda-mps-control -d && echo "MPS started (pipe $CUDA_MPS_PIPE_DIRECTORY)" ;;
  stop) echo quit | nvidia-cuda-mps-control && wait_mps_gone && echo "MPS stopped" ;;
  restart) bash "$0" stop || true; exec bash "$0" start ;; # a server left refusing clients by a killed one
  *) echo "usage: $0 start|stop|restart" >&2; exit 2 ;;
esac

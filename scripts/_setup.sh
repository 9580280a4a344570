# Sourced by demo.sh and test.sh: make ./.venv with epkern (editable) and its GPU (CUDA 13), rdma, MPI and test
# extras, once. Re-installs only when pyproject.toml changes. Needs python3 >= 3.11 with venv, and network for pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
EXTRAS="cuda13,rdma,mpi,test"
if [ ! -x "$VENV/bin/python" ]; then
  echo "epkern setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.epkern-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  start=$SECONDS
  echo "epkern setup: upgrading pip in $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  echo "epkern setup: installing epkern (editable) with extras [$EXTRAS] into $VENV:" >&2
  echo "  CuPy, NVRTC and CUDA headers (CUDA 13), cffi, mpi4py + mpich, pytest/ruff/clang-format/build;" >&2
  echo "  several hundred MB of wheels: this takes a few minutes (pip's progress follows)." >&2
  "$VENV/bin/python" -m pip install --progress-bar off -e "$ROOT[$EXTRAS]" >&2
  echo "$WANT" >"$STAMP"
  echo "epkern setup: done in $((SECONDS - start)) s (re-runs only when pyproject.toml changes)" >&2
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

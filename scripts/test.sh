#!/usr/bin/env bash
# The test suite: sets up ./.venv on first use, then runs pytest. Extra arguments go to pytest.
# On a machine without a GPU the GPU tests are skipped (and say so); MPI tests use the mpich wheel.
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
exec timeout "${EPKERN_TEST_TIMEOUT:-3600}" python -m pytest "$@"

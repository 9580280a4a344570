#!/usr/bin/env bash
# The demo: dispatch -> a stand-in expert -> combine across in-process ranks, validated and timed.
# Sets up ./.venv on first use. Extra arguments go to `python -m epkern.demo` (see --help).
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
exec python -m epkern.demo "$@"

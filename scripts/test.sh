#!/usr/bin/env bash
# Sets up and runs the whole test suite (CI runs exactly this). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
python -m pytest -q tests --durations=15 "$@"  # The 15 slowest stay visible.

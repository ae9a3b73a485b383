#!/usr/bin/env bash
# Sets up and runs the whole test suite (CI runs exactly this). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# One house style (pyproject.toml [tool.ruff]: 2-space indentation, 120 columns) and no unused or undefined names.
ruff format --check --quiet . || { echo "style: run 'ruff format .' (the files above differ)" >&2; exit 1; }
ruff check --quiet .
# Two workers (pytest-xdist; `-n N` among the arguments overrides): the 2-core machine's second core would otherwise
# idle through compilation. The 15 slowest tests stay visible.
python -m pytest -q tests -n 2 --dist loadgroup --durations=15 "$@"

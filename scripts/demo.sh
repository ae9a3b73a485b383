#!/usr/bin/env bash
# Sets up and runs the demo: synthetic data -> TFRecords -> training -> evaluation table. Extra arguments are passed
# to atr_jax.main (e.g. --config.data.raw_dir=/path/to/clotho_layout_folder).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m atr_jax.main --config configs/demo.py --workdir "${WORKDIR:-runs/demo}" "$@"

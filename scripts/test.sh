#!/usr/bin/env bash
# Set up and run the test suite (CPU, no downloads; about 18 minutes on 2 cores: 18:24 measured 2026-11-25 in session 18,
# 4,674 cases; much of it the fast path's compiles: tests/test_fastpath*.py, which scripts/bench/fast_path_check.sh runs
# on their own with every case traced).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set up and run the test suite (CPU, no downloads, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
python -m pytest -q -p no:cacheprovider "$@"

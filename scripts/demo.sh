#!/usr/bin/env bash
# Set up and run the embedded default job (tiny-model demo over the three families; no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m llava.cli demo

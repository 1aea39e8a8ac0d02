#!/usr/bin/env bash
# Set up and run the embedded default job: the trained testbed (synthetic shapes QA, the shipped tiny
# LLaVA checkpoint in testbed/weights; CPU, no downloads) through the evaluation harness - the unpruned
# model, ConsensusDrop and two baselines at 16 of 64 visual tokens - then the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OUT="${OUT:-runs/demo}"
bash scripts/eval/shapes.sh none none
for method in consensusdrop fastervlm random; do
    bash scripts/eval/shapes.sh "$method" 16
done
python -m eval table "$OUT/shapes"

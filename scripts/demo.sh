#!/usr/bin/env bash
# Set up and run the embedded default job: the trained testbed (synthetic shapes QA, the shipped tiny
# LLaVA checkpoint in testbed/weights; CPU, no downloads) through the evaluation harness - the unpruned
# model, ConsensusDrop and two baselines at 16 of 64 visual tokens - then the results table. Each step
# says which of the six it is on (stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=6
step() { echo "== demo step $1 of $STEPS: $2" >&2; }
step 1 "install (scripts/install.sh, into the active Python)"
bash scripts/install.sh
export OUT="${OUT:-runs/demo}"
step 2 "the unpruned model on the testbed"
bash scripts/eval/shapes.sh none none
n=3
for method in consensusdrop fastervlm random; do
    step "$n" "$method at 16 of 64 visual tokens"
    bash scripts/eval/shapes.sh "$method" 16
    n=$((n + 1))
done
step 6 "the results table ($OUT/shapes)"
python -m eval table "$OUT/shapes"

#!/usr/bin/env bash
# Testbed v2 (cluttered 336 px scenes, 576 visual tokens, seven question types; docs/testbed.md "Testbed v2"):
# usage: bash scripts/eval/shapes2.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/shapes2.sh consensusdrop 64   (EXTRA_ARGS="--bench-opt n=100 --bench-opt seeds=1" for a quick look)
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-testbed/weights2}"                 # the v2 checkpoint (scripts/train_testbed2.sh)
DATA_ROOT="${DATA_ROOT:-.}"                        # unused: questions are generated (seeded)
OUT="${OUT:-./runs}"                               # results: $OUT/shapes2/<run-name>/results.json
NPROC="${NPROC:-1}"                                # processes; CPU runs use 1 (or 2 with gloo)
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:---no-wandb --batch-size 50}"
BENCH=shapes2
if [[ ($# -lt 3 || "${3:0:2}" == "--") && "$MODEL" == "testbed/weights2" && ! -f "$(dirname "${BASH_SOURCE[0]}")/../../testbed/weights2/config.json" ]]; then
    echo "testbed/weights2 is missing: train it with 'DEVICE=cuda bash scripts/train_testbed2.sh' (a GPU, about" \
         "15 minutes on an H100; docs/testbed.md \"Testbed v2\"), or pass a model as the third argument" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

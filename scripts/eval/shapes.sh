#!/usr/bin/env bash
# The trained testbed (synthetic shapes QA, CPU-friendly): accuracy overall / per type / per salience.
# usage: bash scripts/eval/shapes.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/shapes.sh consensusdrop 8
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-testbed/weights}"                  # the shipped testbed checkpoint
DATA_ROOT="${DATA_ROOT:-.}"                        # unused: questions are generated (seeded)
OUT="${OUT:-./runs}"                               # results: $OUT/shapes/<run-name>/results.json
NPROC="${NPROC:-1}"                                # processes; CPU runs use 1 (or 2 with gloo)
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:---no-wandb --batch-size 50}"
BENCH=shapes
if [[ "$MODEL" == "testbed/weights" && ! -f "$(dirname "${BASH_SOURCE[0]}")/../../testbed/weights/config.json" ]]; then
    echo "testbed/weights is missing: restore it with 'git checkout -- testbed/weights', retrain it with" \
         "'bash scripts/train_testbed.sh' (about 3 hours on 2 CPU cores, docs/testbed.md), or pass a model as the third argument" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

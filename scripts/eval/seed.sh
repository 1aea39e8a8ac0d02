#!/usr/bin/env bash
# SEED-Bench: SEED-all, SEED-IMG, SEED-video (exact letter match).
# usage: bash scripts/eval/seed.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/seed.sh consensusdrop 64
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-llava-hf/llava-1.5-7b-hf}"
DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"   # LLaVA's playground/data/eval (check: python -m eval check-data)
OUT="${OUT:-./runs}"                               # results: $OUT/seed/<run-name>/results.json
NPROC="${NPROC:-}"                                 # processes (GPUs) per node; empty = all visible GPUs
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:-}"                       # e.g. "--opt key=value --batch-size 1 --no-wandb"
BENCH=seed
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

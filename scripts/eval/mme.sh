#!/usr/bin/env bash
# MME: perception (MME-P), cognition (MME-C) and their sum (MME-P+C); acc + acc+ per subtask.
# usage: bash scripts/eval/mme.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/mme.sh consensusdrop 64
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-llava-hf/llava-1.5-7b-hf}"
DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"   # LLaVA's playground/data/eval (check: python -m eval check-data)
OUT="${OUT:-./runs}"                               # results: $OUT/mme/<run-name>/results.json
NPROC="${NPROC:-}"                                 # processes (GPUs) per node; empty = all visible GPUs
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:-}"                       # e.g. "--opt key=value --batch-size 1 --no-wandb"
BENCH=mme
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

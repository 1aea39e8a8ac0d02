#!/usr/bin/env bash
# VizWiz test: answers + the EvalAI upload file.
# usage: bash scripts/eval/vizwiz.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/vizwiz.sh consensusdrop 64
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-llava-hf/llava-1.5-7b-hf}"
DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"   # LLaVA's playground/data/eval (check: python -m eval check-data)
OUT="${OUT:-./runs}"                               # results: $OUT/vizwiz/<run-name>/results.json
NPROC="${NPROC:-}"                                 # processes (GPUs) per node; empty = all visible GPUs
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:-}"                       # e.g. "--opt key=value --batch-size 1 --no-wandb"
BENCH=vizwiz
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

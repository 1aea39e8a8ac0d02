#!/usr/bin/env bash
# VQAv2 test-dev: answers + the EvalAI upload file (score on the server, then `python -m eval record`).
# usage: bash scripts/eval/vqav2.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/vqav2.sh consensusdrop 64
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-llava-hf/llava-1.5-7b-hf}"
DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"   # LLaVA's playground/data/eval (check: python -m eval check-data)
OUT="${OUT:-./runs}"                               # results: $OUT/vqav2/<run-name>/results.json
NPROC="${NPROC:-}"                                 # processes (GPUs) per node; empty = all visible GPUs
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:-}"                       # e.g. "--opt key=value --batch-size 1 --no-wandb"
BENCH=vqav2
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

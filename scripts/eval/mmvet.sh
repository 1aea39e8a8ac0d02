#!/usr/bin/env bash
# MM-Vet: answers + results file; graded by an OpenAI-compatible judge if JUDGE_BASE_URL / JUDGE_MODEL are set.
# usage: bash scripts/eval/mmvet.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/mmvet.sh consensusdrop 64
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-llava-hf/llava-1.5-7b-hf}"
DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"   # LLaVA's playground/data/eval (check: python -m eval check-data)
OUT="${OUT:-./runs}"                               # results: $OUT/mmvet/<run-name>/results.json
NPROC="${NPROC:-}"                                 # processes (GPUs) per node; empty = all visible GPUs
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:-}"                       # e.g. "--opt key=value --batch-size 1 --no-wandb"
JUDGE_BASE_URL="${JUDGE_BASE_URL:-}"               # OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
JUDGE_MODEL="${JUDGE_MODEL:-}"                     # e.g. gpt-3.5-turbo-0125 (record the snapshot)
if [[ -n "$JUDGE_BASE_URL" && -n "$JUDGE_MODEL" ]]; then EXTRA_ARGS="$EXTRA_ARGS --judge-base-url $JUDGE_BASE_URL --judge-model $JUDGE_MODEL"; fi
BENCH=mmvet
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

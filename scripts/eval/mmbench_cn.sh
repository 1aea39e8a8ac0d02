#!/usr/bin/env bash
# MMBench-CN: local CircularEval on dev (MMB-CN-dev; MMB-CN-dev-local = single-row rate) + xlsx for the server.
# usage: bash scripts/eval/mmbench_cn.sh <method> <budget|none> [model] [extra `python -m eval run` args]
#   e.g. bash scripts/eval/mmbench_cn.sh consensusdrop 64
# Every variable below can be overridden from the environment.
MODEL="${MODEL:-llava-hf/llava-1.5-7b-hf}"
DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"   # LLaVA's playground/data/eval (check: python -m eval check-data)
OUT="${OUT:-./runs}"                               # results: $OUT/mmbench_cn/<run-name>/results.json
NPROC="${NPROC:-}"                                 # processes (GPUs) per node; empty = all visible GPUs
LAUNCHER="${LAUNCHER:-torchrun}"                   # torchrun | deepspeed | python
EXTRA_ARGS="${EXTRA_ARGS:-}"                       # e.g. "--opt key=value --batch-size 1 --no-wandb"
BENCH_OPTS="${BENCH_OPTS:-}"                       # e.g. "split=mmbench_test_en_20231003 all_rounds=true"
for o in $BENCH_OPTS; do EXTRA_ARGS="$EXTRA_ARGS --bench-opt $o"; done
BENCH=mmbench_cn
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh" "$@"

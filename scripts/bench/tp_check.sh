#!/usr/bin/env bash
# Tensor-parallel check (python -m bench.tp_check): every registered method on every tiny family under DeepSpeed
# AutoTP gives the plain model's greedy tokens (fp32, logits within 1e-5), with the weights really sharded.
# Spawns TP ranks itself (no launcher). CPU by default (about 20 s at TP=2 on 2 cores); on GPUs: DEVICE=cuda.
#   bash scripts/bench/tp_check.sh                    # TP=2, CPU, report printed
#   TP=4 DEVICE=cuda OUT=docs/results bash scripts/bench/tp_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ARGS=(--tp "${TP:-2}" --device "${DEVICE:-cpu}")
[[ -n "${OUT:-}" ]] && ARGS+=(--out "$OUT")
exec "${PYTHON:-python}" -m bench.tp_check "${ARGS[@]}" "$@"

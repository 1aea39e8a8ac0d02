#!/usr/bin/env bash
# Train testbed v2 (testbed/train2.py: LLaVA's recipe in three stages, docs/testbed.md "Testbed v2") and export
# it to testbed/weights2. Resumable: each call continues the run in $WORK; on a machine whose commands are
# time-limited (the device tool: 10 minutes) set LIMIT (seconds) and call it again until it prints DONE.
#   bash scripts/train_testbed2.sh [out_dir]       (default: testbed/weights2)
#   DEVICE=cuda LIMIT=540 bash scripts/train_testbed2.sh       # a GPU (bf16 autocast, all cores generate data)
# Needs a GPU in practice: about 10-15 minutes of an H100 for the default recipe, data generation being the
# bound (about 10 ms per sample per CPU core); on 2 CPU cores the same recipe would take days.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-testbed/weights2}"
WORK="${WORK:-runs/testbed2-train}"
DEVICE="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
DTYPE="${DTYPE:-$([[ $DEVICE == cuda* ]] && echo bfloat16 || echo float32)}"
WORKERS="${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 0 ))}"
ARGS=(--work "$WORK" --seed "${SEED:-0}" --device "$DEVICE" --dtype "$DTYPE" --workers "$WORKERS")
[[ -n "${LIMIT:-}" ]] && ARGS+=(--time-limit "$((LIMIT - 45))")   # leave time to save the state and the log
# RECIPE: extra recipe flags (e.g. "--instruct-steps 12000 --tower-lr-scale 0.1"); repeat them on every call
# shellcheck disable=SC2086
python -m testbed.train2 "${ARGS[@]}" ${RECIPE:-} | tee -a "$WORK.log"
if tail -n 1 "$WORK.log" | grep -q '^DONE'; then
    python -m testbed.train2 --work "$WORK" --export "$OUT" ${RECIPE:-}
fi

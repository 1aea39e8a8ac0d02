#!/usr/bin/env bash
# A paper column run through lmms-eval (a spec column with `lmms_task`: MMMU and the like, which the harness lacks):
#   bash scripts/eval/lmms.sh <task> <method> <budget|none> <model> [--opt key=value ...]
# runs `python -m lmms_eval --model vtprune` (integrations/lmms_eval/plugin.py) in the lmms-eval environment
# (scripts/lmms_eval_env.sh -> .venv-lmms) with its output in OUT/lmms/<task>/<run-name>/lmms, then imports the
# task's scores into OUT/lmms/<task>/<run-name>/lmms_results.json (python -m eval lmms-import), where
# `python -m eval paper` finds them. Variables: OUT (default ./runs), LMMS_PYTHON (default .venv-lmms/bin/python,
# or $VTPRUNE_LMMS_PYTHON), LMMS_BATCH (lmms-eval --batch_size, default 1), LMMS_LIMIT (--limit, a smoke run),
# PYTHON (this environment's python, default python). lmms-eval fetches the task's data from the hub itself.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -lt 4 ]]; then
    echo "usage: bash scripts/eval/lmms.sh <task> <method> <budget|none> <model> [--opt key=value ...]" >&2
    exit 2
fi
TASK="$1"; METHOD="$2"; BUDGET="$3"; MODEL="$4"; shift 4
OPTS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --opt) OPTS+=(--opt "$2"); shift 2 ;;
        *) echo "error: lmms.sh takes --opt key=value only (the lmms-eval plugin has no run settings), got $1" >&2
           exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python}"
LMMS_PYTHON="${LMMS_PYTHON:-${VTPRUNE_LMMS_PYTHON:-$REPO/.venv-lmms/bin/python}}"
OUT="${OUT:-./runs}"; [[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
source "$REPO/scripts/eval/_methods.sh"   # VTPRUNE_METHODS=./my_method.py: absolute for the lmms-eval plugin
if [[ ! -x "$LMMS_PYTHON" ]]; then
    echo "error: lmms-eval task $TASK needs the lmms-eval environment: bash scripts/lmms_eval_env.sh" \
         "(or LMMS_PYTHON=<its python>); $LMMS_PYTHON is not there" >&2
    exit 2
fi
cd "$REPO"
IMPORT=(-m eval lmms-import "$TASK" "$METHOD" "$BUDGET" "$MODEL" --out "$OUT" "${OPTS[@]}")
RUN_DIR="$("$PYTHON" "${IMPORT[@]}" --run-dir)"
ARGS="$("$PYTHON" "${IMPORT[@]}" --model-args)"
mkdir -p "$RUN_DIR/lmms"
echo "lmms-eval $TASK: $ARGS -> $RUN_DIR"
"$LMMS_PYTHON" -m lmms_eval --model vtprune --model_args "$ARGS" --tasks "$TASK" \
    --batch_size "${LMMS_BATCH:-1}" --output_path "$RUN_DIR/lmms" --log_samples \
    ${LMMS_LIMIT:+--limit "$LMMS_LIMIT"}
"$PYTHON" "${IMPORT[@]}"

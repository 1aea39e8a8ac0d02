#!/usr/bin/env bash
# Submit a paper's grid to Slurm: a job array (paper.sbatch, one task per shard of the configs) and the report
# after it (report.sbatch, --dependency=afterok:<array> --kill-on-invalid-dep=yes). docs/cluster.md.
#   bash scripts/slurm/submit_paper.sh PAPER [TABLE] [--shards N] [--count N] [--max-parallel K] [--dry-run]
#                                      [-- SBATCH OPTIONS ...]
#   e.g. NPROC=1 bash scripts/slurm/submit_paper.sh visionzip "Table 1" -- --partition=gpu --gres=gpu:1 --time=4:00:00
# PAPER: a paper's name, or a spec file of your own (./my_table.toml; docs/your-method.md): copied beside the
# variables at submission, so every job, a resubmitted one included, runs the grid that was submitted.
# The grid's config count is read from `python -m eval paper-grid PAPER ... --dry-run` (--count N gives it instead);
# SHARDS = that count (one config per task) or --shards N, fixed here for every task, resubmitted ones included.
# sbatch options after `--` go to both jobs (--partition, --account, --qos, --time, ...; the report job drops the
# GPU requests: --gres, --gpus*, -G). Variables as for the paper scripts (OUT, DATA_ROOT, ONLY, BUDGETS, MODEL,
# NPROC, TP, FAST, EXTRA_ARGS, VTPRUNE_METHODS: its .py files made absolute, ...), plus VENV (the environment the jobs activate: default the active one, else
# REPO/.venv), SETUP (a line the jobs run first, e.g. "module load cuda") and LOGS (default OUT/slurm-logs: created
# here; one log per task, appended across requeues). Prints the job ids and the commands to resubmit a task.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PAPER=""; TABLE=""; SHARDS_ARG="${SHARDS:-}"; COUNT=""; PAR=""; DRY=0; SB=()
usage() { sed -n 4,6p "${BASH_SOURCE[0]}" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --) shift; SB=("$@"); break ;;
        --shards) SHARDS_ARG="${2:?--shards N}"; shift 2 ;;
        --shards=*) SHARDS_ARG="${1#*=}"; shift ;;
        --count) COUNT="${2:?--count N}"; shift 2 ;;
        --count=*) COUNT="${1#*=}"; shift ;;
        --max-parallel) PAR="${2:?--max-parallel K}"; shift 2 ;;
        --max-parallel=*) PAR="${1#*=}"; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n 2,16p "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "submit_paper.sh: unknown option $1 (sbatch options go after --)" >&2; usage ;;
        *) if [[ -z "$PAPER" ]]; then PAPER="$1"; elif [[ -z "$TABLE" ]]; then TABLE="$1"; else usage; fi; shift ;;
    esac
done
[[ -n "$PAPER" ]] || usage
NAME="$PAPER"   # a spec file's name without .toml: the jobs' names, the logs, the report's file
if [[ "$PAPER" == *.toml || "$PAPER" == */* ]]; then
    [[ -f "$PAPER" ]] || { echo "error: no spec file $PAPER: a table of your own is a .toml file (eval/papers/FORMAT.md)" >&2; exit 2; }
    NAME="$(basename "$PAPER" .toml)"
    [[ "$PAPER" = /* ]] || PAPER="$PWD/${PAPER#./}"
elif [[ ! -f "$REPO/scripts/papers/$PAPER.sh" ]]; then
    echo "error: no paper script scripts/papers/$PAPER.sh (python -m eval paper --list)" >&2; exit 2
fi
LABEL="$NAME${TABLE:+ \"$TABLE\"}"   # visionzip "Table 1": a table's name has spaces
for v in COUNT SHARDS_ARG PAR; do
    if [[ -n "${!v}" && ! "${!v}" =~ ^[1-9][0-9]*$ ]]; then echo "error: ${v/_ARG/}=${!v}: a positive integer" >&2; exit 2; fi
done
export OUT="${OUT:-./runs}" DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
[[ "$DATA_ROOT" = /* ]] || DATA_ROOT="$PWD/$DATA_ROOT"
if [[ -n "${MODEL:-}" && -e "$MODEL" && "$MODEL" != /* ]]; then export MODEL="$PWD/$MODEL"; fi
if [[ -n "${WANDB_DIR:-}" && "$WANDB_DIR" != /* ]]; then export WANDB_DIR="$PWD/$WANDB_DIR"; fi  # the jobs run elsewhere
source "$REPO/scripts/eval/_methods.sh"   # VTPRUNE_METHODS=./my_method.py: absolute, saved for the jobs below
VENV="${VENV:-${VIRTUAL_ENV:-}}"
if [[ -z "$VENV" && -x "$REPO/.venv/bin/python" ]]; then VENV="$REPO/.venv"; fi
PY="${PYTHON:-python}"; [[ -n "$VENV" ]] && PY="$VENV/bin/python"

if [[ -z "$COUNT" ]]; then  # the grid as the paper script builds it (the same ONLY / BUDGETS / MODEL / TABLE)
    DRYOUT="$(cd "$REPO" && SHARD="" PYTHON="$PY" bash scripts/paper.sh "$PAPER" ${TABLE:+"$TABLE"} --dry-run)" || {
        echo "error: could not read the grid of $NAME (above); --count N gives the config count instead" >&2; exit 2; }
    COUNT="$(sed -n '1s/^[^:]*: \([0-9][0-9]*\) configs.*/\1/p' <<< "$DRYOUT")"
    [[ -n "$COUNT" ]] || { echo "error: no config count in the dry run's first line: $(head -n 1 <<< "$DRYOUT")" >&2; exit 2; }
    if [[ "$COUNT" == 0 ]]; then echo "$LABEL: the grid has no configs (ONLY / BUDGETS / TABLE?): nothing submitted"; exit 0; fi
fi
SHARDS="${SHARDS_ARG:-$COUNT}"
if (( SHARDS > COUNT )); then echo "$LABEL: --shards $SHARDS > $COUNT configs: $COUNT tasks"; SHARDS=$COUNT; fi
LOGS="${LOGS:-$OUT/slurm-logs}"
[[ "$LOGS" = /* ]] || LOGS="$PWD/$LOGS"
mkdir -p "$LOGS"   # sbatch -o into a missing folder fails with no output anywhere

# Every variable that shapes the grid or its runs goes into one file the jobs source: a task resubmitted later,
# from another shell, runs exactly the shard it ran before (an --export value cannot hold ONLY=gqa,pope's comma).
ENVF="$LOGS/$NAME-$(date +%Y%m%d-%H%M%S)-$$.env"
if [[ "$PAPER" = /* ]]; then   # a spec of one's own: the jobs read this copy (the file may change after submission)
    mkdir -p "${ENVF%.env}"; cp "$PAPER" "${ENVF%.env}/$NAME.toml"; PAPER="${ENVF%.env}/$NAME.toml"
fi
{
    echo "# scripts/slurm/submit_paper.sh, $(date '+%F %T'): the variables of this submission (sourced by the jobs)"
    for v in REPO PAPER TABLE SHARDS OUT DATA_ROOT VENV SETUP ONLY BUDGETS MODEL REVISION NPROC TP FAST FAST_BACKEND FAST_ATTENTION \
             LAUNCHER BACKEND VLLM_BATCH EXTRA_ARGS EFFICIENCY PYTHON WANDB_MODE WANDB_PROJECT WANDB_ENTITY WANDB_DIR \
             VTPRUNE_METHODS PYTHONPATH; do
        if [[ -n "${!v+x}" ]]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
    done
} > "$ENVF"
EXPORT="ALL,VTPRUNE_ENV=$ENVF"
REPORT_SB=()   # the report reads results: no GPU requests
skip=0
for a in ${SB[@]+"${SB[@]}"}; do
    if [[ $skip == 1 ]]; then skip=0; continue; fi
    case "$a" in
        --gres=*|--gpus=*|--gpus-per-node=*|--gpus-per-task=*|-G?*) ;;
        --gres|--gpus|--gpus-per-node|--gpus-per-task|-G) skip=1 ;;
        *) REPORT_SB+=("$a") ;;
    esac
done
SLOG="$LOGS/%x-%A_%a.out"
ARRAY=(sbatch --parsable --job-name="vtprune-$NAME" --output="$SLOG" --open-mode=append --requeue
       --export="$EXPORT" ${SB[@]+"${SB[@]}"})
REPORT=(sbatch --parsable --job-name="vtprune-$NAME-report" --output="$LOGS/%x-%j.out" --open-mode=append
        --export="$EXPORT" ${REPORT_SB[@]+"${REPORT_SB[@]}"})
q() {  # shell-quoted only where needed (a comma or a slash is safe), for commands a user pastes
    local a out=""
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=,%+@-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    printf '%s' "$out"
}
if [[ $DRY == 1 ]]; then
    echo "$LABEL: $COUNT configs, SHARDS=$SHARDS (dry run: nothing submitted)"
    echo "  $(q "${ARRAY[@]}" --array="0-$((SHARDS - 1))${PAR:+%$PAR}" "$REPO/scripts/slurm/paper.sbatch")"
    echo "  $(q "${REPORT[@]}" --dependency=afterok:ARRAY_ID --kill-on-invalid-dep=yes "$REPO/scripts/slurm/report.sbatch")"
    echo "  (variables in $ENVF)"
    exit 0
fi
A="$("${ARRAY[@]}" --array="0-$((SHARDS - 1))${PAR:+%$PAR}" "$REPO/scripts/slurm/paper.sbatch")"; A="${A%%;*}"
R="$("${REPORT[@]}" --dependency="afterok:$A" --kill-on-invalid-dep=yes "$REPO/scripts/slurm/report.sbatch")"; R="${R%%;*}"
cat <<MSG
$LABEL: $COUNT configs in $SHARDS array tasks (SHARDS=$SHARDS)
  array job  $A   logs $LOGS/vtprune-$NAME-${A}_<task>.out
  report job $R   after every task succeeds (cancelled if one fails)   log $LOGS/vtprune-$NAME-report-$R.out
  watch:     squeue -j $A,$R
  variables  $ENVF
resubmit a failed or cancelled task I (its configs resume where they stopped), then the report after it:
  J=\$($(q "${ARRAY[@]}" --array=I "$REPO/scripts/slurm/paper.sbatch"))
  $(q "${REPORT[@]}" --kill-on-invalid-dep=yes)--dependency=afterany:$A,afterok:\$J $(q "$REPO/scripts/slurm/report.sbatch")
MSG
echo "$A $R" > "$LOGS/.last-$NAME"

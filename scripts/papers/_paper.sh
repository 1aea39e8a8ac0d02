#!/usr/bin/env bash
# Shared runner of scripts/papers/<paper>.sh and scripts/paper.sh (PAPER set by the caller: a paper's name, or the
# path of a spec file of your own, e.g. ./my_table.toml): the table grid through the harness, then the report beside
# the published numbers (eval/papers/<paper>.toml; docs/papers.md; a table of your own: docs/your-method.md).
#   bash scripts/papers/<paper>.sh [TABLE] [--dry-run | --status]   (--status: one line, "done N of M")
#   bash scripts/paper.sh SPEC [TABLE] [--dry-run | --status]
# Variables (environment):
#   OUT        runs directory (default ./runs): each config in OUT/<bench>/<run-name>/, the report in OUT/papers/
#   DATA_ROOT  LLaVA's playground/data/eval (default ./playground/data/eval)
#   ONLY       benchmarks or column keys, comma-separated (ONLY=gqa,pope)
#   BUDGETS    budgets, comma-separated, as printed or in our convention (BUDGETS=64); the unpruned row always runs
#   MODEL      replaces the tables' model (a local directory of the same checkpoint)
#   CONTROLS=1 also run the controls random and downsample at every budget of a table whose spec names none
#              (--controls of paper-grid and paper; a spec's `controls` entry runs its own): their rows in the report
#   SHARD      i/n: this job runs every n-th config from the i-th (0-based), for several nodes or a job array;
#              the job that runs SHARD=0/n writes the report unless it is a Slurm array task or REPORT=0 (write it
#              with REPORT_ONLY=1 when every shard is done: scripts/slurm/submit_paper.sh does, docs/cluster.md)
#   REPORT     auto (default: the report after the runs, except from shards i > 0 and Slurm array tasks) | 1 | 0
#   REPORT_ONLY=1  no runs, only the report (of the whole grid: a SHARD left in the environment is ignored, said)
#   VTPRUNE_METHODS  your methods (docs/your-method.md): a relative .py path is made absolute before the runs
#   and everything scripts/eval/*.sh reads: NPROC, LAUNCHER (torchrun | deepspeed | python | inprocess), TP, FAST,
#              BACKEND, ... LAUNCHER=inprocess: every config in one `python -m eval run-many` process, the model
#              loaded once for the configs that load it alike (one process: NPROC=1, TP=1; lmms-eval columns each
#              in their own, after the others); the others start a process per config
#   W&B        one switch for the runs and the report: WANDB_MODE=disabled or --no-wandb in EXTRA_ARGS turns it off
#              for both. Offline runs stay under OUT: each config's in its run folder, the report's in
#              OUT/papers/wandb/ (WANDB_DIR moves it)
# Every config is resumable (the harness resumes per question) and skipped when its results.json is complete.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
TABLE=""; DRY=""; FAILED=()
NAME="$PAPER"   # the report's file name and the lines' prefix: a spec file's name without .toml
if [[ "$PAPER" == *.toml || "$PAPER" == */* ]]; then   # a spec file of one's own: absolute (the runs start elsewhere)
    [[ "$PAPER" = /* ]] || PAPER="$PWD/${PAPER#./}"
    if [[ ! -f "$PAPER" ]]; then
        echo "error: no spec file $PAPER: a table of your own is a .toml file (eval/papers/FORMAT.md)" >&2; exit 2
    fi
    NAME="$(basename "$PAPER" .toml)"
fi
for a in "$@"; do
    case "$a" in
        --dry-run|--status) DRY="$a" ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "unknown flag $a (usage: bash scripts/paper.sh $NAME [TABLE] [--dry-run | --status])" >&2; exit 2 ;;
        *) TABLE="$a" ;;
    esac
done
export OUT="${OUT:-./runs}" DATA_ROOT="${DATA_ROOT:-./playground/data/eval}"
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"                  # relative to where the script is called from
[[ "$DATA_ROOT" = /* ]] || DATA_ROOT="$PWD/$DATA_ROOT"
[[ -n "${MODEL:-}" && -e "$MODEL" && "$MODEL" != /* ]] && MODEL="$PWD/$MODEL"
source "$REPO/scripts/eval/_methods.sh"   # VTPRUNE_METHODS=./my_method.py: absolute before the cd below
# W&B: --no-wandb in EXTRA_ARGS is WANDB_MODE=disabled for everything started here (the runs and the report)
read -ra XARGS <<< "${EXTRA_ARGS:-}"
for a in ${XARGS[@]+"${XARGS[@]}"}; do
    if [[ "$a" == --no-wandb ]]; then export WANDB_MODE=disabled; fi
done
WANDB_OFF=0; WM="${WANDB_MODE:-}"; [[ "${WM,,}" == disabled ]] && WANDB_OFF=1
# the report's offline run under OUT (from the repository's folder, wandb would write <repository>/wandb/)
REPORT_WANDB_DIR="${WANDB_DIR:-$OUT/papers}"
[[ "$REPORT_WANDB_DIR" = /* ]] || REPORT_WANDB_DIR="$PWD/$REPORT_WANDB_DIR"
case "${REPORT:-auto}" in auto|0|1) ;; *) echo "REPORT=$REPORT: use auto, 1 or 0" >&2; exit 2 ;; esac
if [[ "${REPORT_ONLY:-0}" == 1 && -n "${SHARD:-}" ]]; then  # the report covers every shard's configs
    echo "$NAME: REPORT_ONLY=1: SHARD=$SHARD ignored (the report is the whole grid's)" >&2
    unset SHARD
fi
GRID=(paper-grid "$PAPER" --out "$OUT" --data-root "$DATA_ROOT")
[[ -n "$TABLE" ]] && GRID+=(--table "$TABLE")
[[ -n "${ONLY:-}" ]] && GRID+=(--only "$ONLY")
[[ -n "${BUDGETS:-}" ]] && GRID+=(--budgets "$BUDGETS")
[[ -n "${MODEL:-}" ]] && GRID+=(--model "$MODEL")
[[ "${CONTROLS:-0}" == 1 ]] && GRID+=(--controls)
[[ -n "${SHARD:-}" ]] && GRID+=(--shard "$SHARD")
cd "$REPO"
if [[ -n "$DRY" ]]; then exec "$PYTHON" -m eval "${GRID[@]}" "$DRY"; fi
if [[ "${REPORT_ONLY:-0}" != 1 ]]; then
    CMDS="$("$PYTHON" -m eval "${GRID[@]}" --commands)"   # configs still to run, unpruned first
    N=$(grep -c . <<< "$CMDS" || true)
    echo "$NAME: $N configs to run${SHARD:+ (shard $SHARD)}"
    I=0; FAILED=()
    if [[ "${LAUNCHER:-}" == inprocess ]]; then  # one process runs the configs (lmms-eval's columns: the loop below)
        BATCH=""; LABELS=()
        while IFS= read -r LINE; do
            [[ -z "$LINE" || "$LINE" == lmms:* ]] && continue
            eval "set -- $LINE"; BENCH="$1"; shift   # BENCH METHOD BUDGET MODEL [flags]: _launch.sh's arguments
            ARGV="$( unset MODEL; _VTPRUNE_ARGV=1 source "$REPO/scripts/eval/_launch.sh" "$@" )" || exit 2
            LABELS+=("$LINE"); BATCH+="${LINE@Q} $ARGV"$'\n'
        done <<< "$CMDS"
        if [[ ${#LABELS[@]} -gt 0 ]]; then
            REC="$(mktemp)"; RC=0   # '<exit status> <line>' as each config ends
            "$PYTHON" -m eval run-many --name "$NAME" --total "$N" --record "$REC" <<< "$BATCH" || RC=$?
            mapfile -t DONE < "$REC"; rm -f "$REC"
            for rec in ${DONE[@]+"${DONE[@]}"}; do [[ "${rec%% *}" == 0 ]] || FAILED+=("${rec#* }"); done
            if [[ ${#DONE[@]} -lt ${#LABELS[@]} ]]; then   # the process ended before the grid did
                echo "$NAME: the grid's process ended (status $RC) after ${#DONE[@]} of ${#LABELS[@]} configs;" \
                    "rerun the script to resume it" >&2
                FAILED+=("${LABELS[@]:${#DONE[@]}}")
            fi
            I=${#LABELS[@]}
        fi
    fi
    while IFS= read -r LINE; do
        [[ -z "$LINE" ]] && continue
        [[ "${LAUNCHER:-}" == inprocess && "$LINE" != lmms:* ]] && continue   # ran above
        I=$((I + 1)); echo "[$I/$N] $LINE"
        eval "set -- $LINE"   # BENCH METHOD BUDGET MODEL [flags]: shell-quoted by python -m eval paper-grid
        BENCH="$1"; shift
        OK=1
        if [[ "$BENCH" == lmms:* ]]; then  # a column run through lmms-eval (its environment: .venv-lmms)
            bash "$REPO/scripts/eval/lmms.sh" "${BENCH#lmms:}" "$@" </dev/null || OK=0
        else
            ( unset MODEL; source "$REPO/scripts/eval/_launch.sh" "$@" ) || OK=0
        fi
        if [[ $OK == 0 ]]; then
            FAILED+=("$LINE"); echo "$NAME: failed: $LINE (the grid goes on; rerun the script to resume it)" >&2
        fi
    done <<< "$CMDS"
fi
WRITE=1
if [[ "${REPORT_ONLY:-0}" != 1 ]]; then
    case "${REPORT:-auto}" in
        0) WRITE=0 ;;
        auto) if [[ -n "${SHARD:-}" && "${SHARD%%/*}" != 0 ]]; then WRITE=0
              elif [[ -n "${SHARD:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then  # the other tasks may still run
                  WRITE=0; echo "$NAME: shard $SHARD is a Slurm array task: the report is left to the job that" \
                      "runs when every task is done (REPORT_ONLY=1; scripts/slurm/submit_paper.sh submits it)"
              fi ;;
    esac
fi
if [[ $WRITE == 1 ]]; then
    mkdir -p "$OUT/papers"
    REP=(paper "$PAPER" "$OUT" --format both --out "$OUT/papers/$NAME${TABLE:+-${TABLE//[^A-Za-z0-9._]/-}}")
    [[ -n "$TABLE" ]] && REP+=(--table "$TABLE")
    [[ -n "${MODEL:-}" ]] && REP+=(--model "$MODEL")
    [[ "${CONTROLS:-0}" == 1 ]] && REP+=(--controls)
    [[ -n "${EFFICIENCY:-}" ]] && REP+=(--efficiency "$EFFICIENCY")
    [[ $WANDB_OFF == 0 ]] && REP+=(--wandb)
    WANDB_DIR="$REPORT_WANDB_DIR" "$PYTHON" -m eval "${REP[@]}"
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
    printf '%s: %d configs failed:\n' "$NAME" "${#FAILED[@]}" >&2; printf '  %s\n' "${FAILED[@]}" >&2; exit 1
fi

# Sourced by the sbatch scripts of scripts/slurm/: the repository, the environment, the threads, a header line.
# REPO: the repository (submit_paper.sh sets it; else the folder sbatch was called from, which must hold it).
# VENV: a virtual environment to activate, or an interpreter's prefix (pyenv, conda) put first on PATH
# (submit_paper.sh passes the one active at submission, else REPO/.venv);
# SETUP: a shell line run first (e.g. "module load cuda/12.4"). OMP_NUM_THREADS = the CPUs Slurm gave the task.
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f "$REPO/scripts/papers/_paper.sh" ]]; then
    echo "error: REPO=$REPO is not the vtprune repository (submit with scripts/slurm/submit_paper.sh or set REPO)" >&2
    exit 2
fi
if [[ -n "${SETUP:-}" ]]; then eval "$SETUP"; fi
if [[ -z "${VENV:-}" && -x "$REPO/.venv/bin/python" ]]; then VENV="$REPO/.venv"; fi
if [[ -n "${VENV:-}" ]]; then
    if [[ -f "$VENV/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    elif [[ -x "$VENV/bin/python" ]]; then   # an interpreter's prefix without an activate script (pyenv, conda)
        export PATH="$VENV/bin:$PATH"
    else
        echo "error: VENV=$VENV has neither bin/activate nor bin/python" >&2; exit 2
    fi
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"   # task/none and cgroup-less clusters do not bind -c
cd "$REPO"
echo "=== $(date '+%F %T') host $(hostname) job ${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} = }${SLURM_JOB_ID:-?}" \
     "attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) python $(command -v python) OMP_NUM_THREADS=$OMP_NUM_THREADS ==="

#!/usr/bin/env bash
# Shared launcher of scripts/eval/<bench>.sh (sourced; BENCH and the variables are set by the caller).
#   bash scripts/eval/<bench>.sh <method> <budget|none> [model] [extra args for `python -m eval run` ...]
# Variables (environment overrides the defaults at the top of each script):
#   MODEL      hub id / local dir / tiny:<family>        DATA_ROOT  LLaVA's playground/data/eval
#   REVISION   the hub id's branch / tag / commit (--revision; default main)
#   OUT        runs directory (OUT/<bench>/<run-name>/)   NPROC      processes per node (default: visible GPUs, else 1)
#   LAUNCHER   torchrun (default) | deepspeed | python | inprocess   NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT
#              for multi-node. inprocess: one process (NPROC=1, TP=1, BACKEND=hf); a paper's grid
#              (scripts/papers/_paper.sh) runs all its configs in that one process, the model loaded once;
#              here, one config, the same as python
#              (MASTER_PORT defaults to 29500, inside a Slurm job to 20000 + SLURM_JOB_ID mod 20000)
#   LAUNCHER=deepspeed with NNODES > 1: inside a Slurm job (or DS_NO_SSH=1) every node runs this script with its
#              NODE_RANK and MASTER_ADDR (scripts/slurm/multinode.sbatch: no ssh); HOSTFILE defaults to the job's
#              nodes with NPROC slots each. Elsewhere the deepspeed launcher starts the other nodes itself (ssh /
#              pdsh by default, DS_LAUNCHER=openmpi | mvapich | ... its --launcher) from a HOSTFILE
#   EXTRA_ARGS extra arguments for `python -m eval run` (e.g. "--opt key=value --no-wandb")
#   FAST=1     the fast path (--fast: captured prefills for capturable methods, else eager; results.json "paths")
#   FAST_BACKEND  with FAST=1: --fast-backend auto (default) | inductor | cudagraphs | eager | aot_eager | none
#   FAST_ATTENTION with FAST=1: --fast-attention auto (default) | causal | masked
#              With FAST=1 every config under OUT shares one compile cache, OUT/.compile-cache (a paper's grid compiles
#              each function once, on any node that sees OUT), unless VTPRUNE_COMPILE_CACHE names another
#   LOADER_WORKERS  processes per rank preparing the next questions' inputs (--loader-workers; default: LLaVA's 4
#              within the rank's share of the cores less one; 0: in the answering loop)
#   TP         tensor-parallel size (default 1): groups of TP processes share one model (its language model sharded
#              by DeepSpeed AutoTP, towers replicated); NPROC x NNODES must be a multiple of TP; needs LAUNCHER=deepspeed
#              or torchrun; each group answers its own shard of the questions
#   VTPRUNE_METHODS  your methods' files or modules (docs/your-method.md): a relative .py path is made absolute here
#   BACKEND    hf (default: our engine) | vllm (vLLM + the vtprune plugin, one process; PYTHON defaults to
#              .venv-vllm/bin/python, built by scripts/vllm_env.sh; VLLM_BATCH questions per generate call, 64)
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: bash scripts/eval/${BENCH}.sh <method> <budget|none> [model] [extra run args...]" >&2
    exit 2
fi
METHOD="$1"; BUDGET="$2"; shift 2
if [[ $# -ge 1 && "${1:0:2}" != "--" ]]; then MODEL="$1"; shift; fi

if [[ "${LAUNCHER:-}" == inprocess ]]; then  # one process: several GPUs need torchrun or deepspeed
    if [[ "${NPROC:-1}" != 1 || "${NNODES:-1}" != 1 || "${TP:-1}" != 1 || "${BACKEND:-hf}" != hf ]]; then
        echo "error: LAUNCHER=inprocess is one process of our engine (NPROC=${NPROC:-1} NNODES=${NNODES:-1}" \
             "TP=${TP:-1} BACKEND=${BACKEND:-hf}): use LAUNCHER=torchrun or deepspeed for several, python for vllm" >&2
        exit 2
    fi
    NPROC=1
fi
if [[ -z "${NPROC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then NPROC=$(nvidia-smi -L 2>/dev/null | wc -l); fi
    if [[ -z "${NPROC:-}" || "${NPROC}" -lt 1 ]]; then NPROC=1; fi
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then IFS=',' read -ra _GPUS <<< "$CUDA_VISIBLE_DEVICES"; NPROC=${#_GPUS[@]}; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -z "${MASTER_PORT:-}" && -n "${SLURM_JOB_ID:-}" ]]; then MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); fi
LAUNCHER="${LAUNCHER:-torchrun}"
PYTHON="${PYTHON:-python}"

# absolute paths, then run from the repository root (so `-m eval` resolves even without an install)
_abs() { if [[ -e "$1" ]]; then (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); else echo "$1"; fi; }
mkdir -p "$OUT"
DATA_ROOT="$(_abs "$DATA_ROOT")"; OUT="$(_abs "$OUT")"
[[ -e "$MODEL" ]] && MODEL="$(_abs "$MODEL")"
source "$(dirname "${BASH_SOURCE[0]}")/_methods.sh"   # VTPRUNE_METHODS=./my_method.py: absolute, for the run
ARGS=(run "$BENCH" --model "$MODEL" --method "$METHOD" --budget "$BUDGET" --data-root "$DATA_ROOT" --out "$OUT")
if [[ -n "${REVISION:-}" ]]; then ARGS+=(--revision "$REVISION"); fi
if [[ -n "${LOADER_WORKERS:-}" ]]; then ARGS+=(--loader-workers "$LOADER_WORKERS"); fi
case "${FAST:-0}" in
    1) ARGS+=(--fast); if [[ -n "${FAST_BACKEND:-}" ]]; then ARGS+=(--fast-backend "$FAST_BACKEND"); fi
       if [[ -n "${FAST_ATTENTION:-}" ]]; then ARGS+=(--fast-attention "$FAST_ATTENTION"); fi
       export VTPRUNE_COMPILE_CACHE="${VTPRUNE_COMPILE_CACHE:-$OUT/.compile-cache}" ;;
    0|"") if [[ -n "${FAST_BACKEND:-}${FAST_ATTENTION:-}" ]]; then
            echo "FAST_BACKEND / FAST_ATTENTION apply with FAST=1 only" >&2; exit 2; fi ;;
    *) echo "FAST=$FAST: use FAST=1 (the fast path) or FAST=0" >&2; exit 2 ;;
esac
case "${BACKEND:-hf}" in
    hf) ;;
    vllm)
        ARGS+=(--backend vllm --batch-size "${VLLM_BATCH:-64}")
        LAUNCHER=python  # one process: vLLM places the model on the visible GPUs itself
        _REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
        if [[ "$PYTHON" == python && -x "$_REPO/.venv-vllm/bin/python" ]]; then PYTHON="$_REPO/.venv-vllm/bin/python"; fi ;;
    *) echo "BACKEND=$BACKEND: use BACKEND=hf (our engine) or BACKEND=vllm" >&2; exit 2 ;;
esac
if [[ -n "${TP:-}" && "${TP}" != 1 ]]; then
    if [[ "$LAUNCHER" == python ]]; then echo "TP=$TP needs LAUNCHER=deepspeed or torchrun (NPROC=$TP or a multiple)" >&2; exit 2; fi
    ARGS+=(--tp "$TP")
fi
# shellcheck disable=SC2206
[[ -n "${EXTRA_ARGS:-}" ]] && ARGS+=(${EXTRA_ARGS})
ARGS+=("$@")
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ "$LAUNCHER" == inprocess ]]; then
    # scripts/papers/_paper.sh collects each config's arguments for its one `python -m eval run-many`
    if [[ "${_VTPRUNE_ARGV:-0}" == 1 ]]; then echo "${ARGS[*]@Q} --launcher python"; exit 0; fi
    LAUNCHER=python
fi
if [[ "$LAUNCHER" == "python" || ( "$LAUNCHER" == "torchrun" && "$NPROC" -eq 1 && "$NNODES" -eq 1 ) ]]; then
    exec "$PYTHON" -m eval "${ARGS[@]}" --launcher python
elif [[ "$LAUNCHER" == "torchrun" ]]; then
    if [[ "$NNODES" -eq 1 ]]; then
        exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m eval "${ARGS[@]}" --launcher torchrun
    fi
    exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
        --master_addr="${MASTER_ADDR:?set MASTER_ADDR for multi-node}" --master_port="${MASTER_PORT:-29500}" \
        -m eval "${ARGS[@]}" --launcher torchrun
elif [[ "$LAUNCHER" == "deepspeed" ]]; then
    # the deepspeed launcher passes --local_rank=N to every process (accepted by `eval run`);
    # --module runs `python -m eval` in every process
    DS=(deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}")
    if [[ "$NNODES" -gt 1 && ( -n "${SLURM_JOB_ID:-}" || "${DS_NO_SSH:-0}" == 1 ) && "${DS_NO_SSH:-1}" != 0 ]]; then
        # every node runs this launcher itself (srun): no ssh between the nodes
        if [[ -z "${HOSTFILE:-}" ]]; then
            [[ -n "${SLURM_JOB_NODELIST:-}" ]] || { echo "DS_NO_SSH=1 outside Slurm: set HOSTFILE" >&2; exit 2; }
            HOSTFILE="$(mktemp "${TMPDIR:-/tmp}/vtprune-hostfile.XXXXXX")"
            scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n "$NNODES" | sed "s/\$/ slots=$NPROC/" > "$HOSTFILE"
        fi
        DS+=(--num_nodes "$NNODES" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK"
             --master_addr "${MASTER_ADDR:?set MASTER_ADDR for multi-node}")
    elif [[ "$NNODES" -gt 1 ]]; then
        DS+=(--num_nodes "$NNODES" --hostfile "${HOSTFILE:?set HOSTFILE for multi-node deepspeed}")
        if [[ -n "${DS_LAUNCHER:-}" ]]; then DS+=(--launcher "$DS_LAUNCHER"); fi
    fi
    exec "${DS[@]}" --module eval "${ARGS[@]}" --launcher deepspeed
else
    echo "unknown LAUNCHER=$LAUNCHER (torchrun | deepspeed | python | inprocess)" >&2
    exit 2
fi

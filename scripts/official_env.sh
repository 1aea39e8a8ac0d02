#!/usr/bin/env bash
# Build the environment of the official code, `.venv-official`, for `python -m parity` (docs/parity.md): the
# official LLaVA codebase as released on the package index (llava-torch 1.2.2.post1) and FlowCut's authors' package
# (flowcut 1.0.2), on the transformers release they were written for. Idempotent: rerun it to repair the
# environment; it prints what it installed.
#
#   bash scripts/official_env.sh          # -> .venv-official/ (CPU build of torch on a CPU machine, CUDA build on a GPU one)
#   bash scripts/official_env.sh qwen     # -> .venv-official-qwen/: Hugging Face's own Qwen2.5-VL classes under
#                                         #    transformers 4.52.4 (MMTok's Qwen pin), for `python -m parity qwen`
#   bash scripts/official_env.sh qwen3    # -> .venv-official-qwen3/: transformers 5.1.0 for PriorTR's Qwen3-VL code
#                                         #    (its pin is 5.2.0.dev0 at a git commit; 5.1.0 is the release that runs it)
#   bash scripts/official_env.sh qwen2vl  # -> .venv-official-qwen2vl/: transformers 4.44.2 (dependencies) for the
#                                         #    Qwen2-VL code V2Drop and VLM-Pruner ship with their own transformers
#   bash scripts/official_env.sh qwen457  # -> .venv-official-qwen457/: transformers 4.57.6 for CLSE's Qwen2-VL copy
#   python -m parity all                  # compares the official code and ours on the same tiny weights
#
# Why a separate environment: the official code is a package named `llava`, like ours, and needs transformers
# 4.36.2 (this repository needs 5.x). The two sides therefore run in two processes and exchange tensors through
# files (parity/official_worker.py runs here, with nothing of this repository on its path).
# Both official packages are installed with --no-deps: llava-torch pins torch 2.0.1, torchvision, gradio, peft,
# bitsandbytes, deepspeed ... for training and serving; the model code, its builder, mm_utils, conversation and
# the llava/eval scorers need only what is listed below. torchvision is left out on purpose (it breaks beside a
# CPU torch here; nothing of the official inference path imports it).
#
# Environment variables:
#   VTPRUNE_OFFICIAL_VENV   where the environment goes (default: .venv-official in the repository)
#   PYTHON                  the interpreter that creates the environment (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VTPRUNE_OFFICIAL_VENV:-$REPO/.venv-official}
PY=${PYTHON:-python3}
say() { printf '[official_env] %s\n' "$*"; }

# An environment for the official Qwen code: torch 2.14.1 + torchvision 0.29.1 (transformers' Qwen processors build a
# video processor that needs torchvision, which breaks beside torch 2.13 here; these share nothing with ours), the
# transformers release $2, and what the official Qwen code imports; then the versions and the Python check $3.
# $1: the environment's folder; $4: what it is for.
hf_env() {
    # shellcheck source=scripts/_venv.sh
    . scripts/_venv.sh
    make_venv "$1" "$PY"
    say "installing torch 2.14.1 + torchvision 0.29.1, transformers $2 and what the official code imports"
    "$1/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" \
        "transformers==$2" "accelerate>=1,<2" "numpy<2" pillow loguru safetensors
    (cd "$(mktemp -d)" && PYTHONWARNINGS=ignore "$1/bin/python" -c '
import importlib.metadata as md
import sys
for name in ("torch", "torchvision", "transformers", "tokenizers"):
    print(f"[official_env]   {name:13} {md.version(name)}")
exec(sys.argv[1])' "$3")
    say "done: $4 (docs/parity.md)"
}

case "${1:-}" in
    qwen)
        # The Qwen side (docs/parity.md, "Qwen2.5-VL"): transformers 4.52.4 as MMTok's requirements.txt pins it.
        hf_env "${VTPRUNE_OFFICIAL_QWEN_VENV:-$REPO/.venv-official-qwen}" 4.52.4 '
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: F401
print("[official_env]   Qwen2_5_VLForConditionalGeneration and AutoProcessor import")' "python -m parity qwen"
        exit 0 ;;
    qwen2vl)
        # V2Drop's and VLM-Pruner's Qwen2-VL code (docs/parity.md, "Qwen2-VL"): each repository ships a copy of
        # transformers 4.45.0.dev0 (Qwen2-VL/transformers/src), which the official worker puts first on the path.
        # That copy requires tokenizers 0.19 at import, as the release 4.44.2 does: this environment installs
        # 4.44.2 for its pinned dependencies, and the repositories' copy shadows it.
        hf_env "${VTPRUNE_OFFICIAL_QWEN2VL_VENV:-$REPO/.venv-official-qwen2vl}" 4.44.2 '
print("[official_env]   (Qwen2-VL itself comes from each repository copy of transformers 4.45.0.dev0)")' \
            "python -m parity qwen --method v2drop vlmpruner"
        exit 0 ;;
    qwen457)
        # CLSE's Qwen2-VL code (docs/parity.md, "Qwen2-VL"): the repository ships transformers 4.57.6 with its
        # Qwen2-VL text model replaced (Qwen2VL/transformers-4.57.6/src), which the official worker puts first on the
        # path; this environment installs the release 4.57.6 for its pinned dependencies.
        hf_env "${VTPRUNE_OFFICIAL_QWEN457_VENV:-$REPO/.venv-official-qwen457}" 4.57.6 '' \
            "python -m parity qwen --method clse"
        exit 0 ;;
    qwen3)
        # PriorTR's Qwen3-VL code (docs/parity.md, "Qwen3-VL"): its environment pins transformers 5.2.0.dev0 at
        # commit f8f2834e1a (not on the package index) and replaces transformers' qwen3_vl model folder by the
        # repository's own copy (image/Qwen3-VL/qwen3/); the official worker installs that copy under the same module
        # name at import. That copy is 5.1.0's qwen3_vl plus the vision tower's attention output (diffed), and
        # imports `check_model_inputs`, which 5.2.0 no longer has: 5.1.0 is the nearest release that runs it.
        hf_env "${VTPRUNE_OFFICIAL_QWEN3_VENV:-$REPO/.venv-official-qwen3}" 5.1.0 '
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration  # noqa: F401
print("[official_env]   Qwen3VLForConditionalGeneration and AutoProcessor import")' \
            "python -m parity qwen --method priortr"
        exit 0 ;;
esac

# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
make_venv "$VENV" "$PY"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)

say "installing torch 2.13.0 (as scripts/install.sh), then transformers 4.36.2 and the official code's runtime needs"
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "torch==2.13.0" "transformers==4.36.2" "tokenizers==0.15.0" "accelerate>=1,<2" "numpy<2" \
    pillow einops shortuuid sentencepiece protobuf "matplotlib==3.9.2" loguru
say "installing llava-torch 1.2.2.post1 and flowcut 1.0.2 without their pins (--no-deps)"
"${PIP[@]}" --no-deps "llava-torch==1.2.2.post1" "flowcut==1.0.2"

say "checking the environment (from an empty folder: this repository's llava/ must not shadow the official one)"
(cd "$(mktemp -d)" && PYTHONWARNINGS=ignore "$VPY" - <<'EOF'
import importlib.metadata as md

for name in ("llava-torch", "flowcut", "torch", "transformers", "tokenizers", "accelerate", "numpy"):
    print(f"[official_env]   {name:13} {md.version(name)}")
from llava.model.builder import load_pretrained_model  # noqa: E402,F401
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402,F401
from flowcut import flowcut  # noqa: E402,F401

print("[official_env]   the official builder, mm_utils and flowcut import")
EOF
)
say "done: python -m parity all (docs/parity.md)"

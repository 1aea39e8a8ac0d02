#!/usr/bin/env bash
# Build a separate Python environment with lmms-eval (its current release) next to this package, for
# `python -m lmms_eval --model vtprune ...` (docs/evaluation.md section 8). Idempotent: rerun it to
# repair or update the environment; it prints what it installed.
#
#   bash scripts/lmms_eval_env.sh                 # -> .venv-lmms/ (torch + torchvision pair, ~5.5 GB)
#   VTPRUNE_LMMS_TORCH=cpu bash scripts/lmms_eval_env.sh   # lighter: CPU torch 2.13, no torchvision
#   .venv-lmms/bin/python -m lmms_eval --model vtprune --model_args pretrained=...,method=...,budget=... ...
#
# Why a separate environment, and what conflicts (verified with lmms-eval 0.7.3, Python 3.11, CPU):
# * lmms-eval requires torchvision (and timm, which requires it too). Each torchvision release on the
#   registry is built against one torch release: torchvision 0.28.0 beside this repository's CPU build of
#   torch 2.13.0 fails at import ("operator torchvision::nms does not exist"). A plain
#   `pip install -e ".[lmms]"` into the main environment therefore breaks torchvision (and would move
#   torch). Here torch and torchvision are installed as a matching pair from the registry: torch 2.14.1 +
#   torchvision 0.29.1 (the registry's default build, with its CUDA libraries: ~5.5 GB, runs on CPU too).
# * transformers: lmms-eval 0.7.3 asks for transformers>=4.39.2; this package pins 5.23.x, which pip
#   resolves to in the same command (no downgrade). wandb: lmms-eval pins 0.25.0, inside our range.
# * constraints.txt (torch==2.13.0, the main environment's pin) is NOT applied in pair mode.
# VTPRUNE_LMMS_TORCH=cpu instead keeps torch 2.13.0 (constraints.txt) and leaves torchvision and timm out:
# lmms-eval is installed with --no-deps, then its other requirements. lmms-eval's core, its CLI and the
# vtprune model need neither; some of lmms-eval's own model wrappers and tasks do (not used here).
#
# Environment variables:
#   VTPRUNE_LMMS_VENV     where the environment goes (default: .venv-lmms in the repository)
#   VTPRUNE_LMMS_TORCH    pair (default) or cpu, see above
#   LMMS_EVAL_VERSION     the lmms-eval release (default 0.7.3, the one verified; "latest": the newest)
#   PYTHON                the interpreter that creates the environment (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VTPRUNE_LMMS_VENV:-$REPO/.venv-lmms}
MODE=${VTPRUNE_LMMS_TORCH:-pair}
LMMS_VERSION=${LMMS_EVAL_VERSION:-0.7.3}
TORCH_PAIR=("torch==2.14.1" "torchvision==0.29.1")
# lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 removed: with filelock 4 every evaluation logs
# "Error during evaluation: No module named 'filelock._api'" and exits 0 with no results (seen 2026-11-26)
FILELOCK="filelock<4"
PY=${PYTHON:-python3}

case "$MODE" in pair|cpu) ;; *) echo "VTPRUNE_LMMS_TORCH must be 'pair' or 'cpu', got '$MODE'" >&2; exit 2 ;; esac
if [ "$LMMS_VERSION" = latest ]; then LMMS_REQ="lmms-eval"; else LMMS_REQ="lmms-eval==$LMMS_VERSION"; fi

say() { printf '[lmms_eval_env] %s\n' "$*"; }

# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
make_venv "$VENV" "$PY"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check)

if [ "$MODE" = pair ]; then
    say "installing ${TORCH_PAIR[*]} + $LMMS_REQ + this package (editable, with the test extra) in one resolve"
    "${PIP[@]}" "${TORCH_PAIR[@]}" "$LMMS_REQ" "$FILELOCK" -e ".[test]"
else
    say "installing torch 2.13.0 (constraints.txt), $LMMS_REQ without torchvision / timm, this package"
    "${PIP[@]}" -c constraints.txt "torch==2.13.0"
    "${PIP[@]}" --no-deps "$LMMS_REQ"
    # lmms-eval's own requirements (no extras), less torch (already there), torchvision and timm
    mapfile -t REQS < <("$VPY" - <<'EOF'
import re
from importlib.metadata import requires
for r in requires("lmms-eval") or []:
    if "extra ==" in r:
        continue
    name = re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-")
    if name not in ("torch", "torchvision", "timm"):
        print(r.split(";")[0].strip())
EOF
)
    "${PIP[@]}" -c constraints.txt "${REQS[@]}" "$FILELOCK" -e ".[test]"
fi

say "checking the environment"
if [ "$MODE" = cpu ]; then
    "$VPY" -m pip check || say "(cpu mode: lmms-eval's torchvision and timm requirements are left out on purpose)"
else
    "$VPY" -m pip check || say "warning: pip check reports the conflicts above"
fi
"$VPY" - <<'EOF'
import importlib.metadata as md

for name in ("lmms-eval", "vtprune", "torch", "torchvision", "transformers", "datasets", "accelerate", "wandb"):
    try:
        print(f"[lmms_eval_env]   {name:13} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"[lmms_eval_env]   {name:13} (not installed)")
import torch  # noqa: E402

try:
    import torchvision  # noqa: F401
    from torchvision.ops import nms

    nms(torch.rand(3, 4) * 10, torch.rand(3), 0.5)
    print("[lmms_eval_env]   torchvision imports and runs beside torch")
except ImportError:
    print("[lmms_eval_env]   torchvision absent (cpu mode)")
from lmms_eval.models import get_model  # noqa: E402

cls = get_model("vtprune")
print(f"[lmms_eval_env]   lmms-eval resolves --model vtprune to {cls.__module__}.{cls.__name__}")
EOF
say "done: $VPY -m lmms_eval --model vtprune ... (docs/evaluation.md section 8); tests: python -m pytest tests/test_lmms_eval.py"

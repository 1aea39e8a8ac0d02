#!/usr/bin/env bash
# The device tool's image has torch 2.11 and transformers 5.17 and no network; the project pins transformers 5.23.
#   bash scripts/bench/device_wheels.sh            # here (with network): download the wheels into .device-wheels/
#   bash scripts/bench/device_wheels.sh install    # on the device (carry .device-wheels): install them offline
# .device-wheels/ is git-excluded (it travels only when named in the device tool's `carry`; about 15 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=.device-wheels
PINS=(transformers==5.23.0 "tokenizers==$(python -c 'import tokenizers; print(tokenizers.__version__)')"
      "huggingface-hub>=1.31,<2"   # hub 2.x needs httpx2, which the device image lacks (it has httpx: hub 1.x)
      "safetensors==$(python -c 'import safetensors; print(safetensors.__version__)')")
if [[ "${1:-}" == install ]]; then
    [[ -d $DIR ]] || { echo "no $DIR: run this script without arguments where the registry is reachable, then carry $DIR" >&2; exit 2; }
    python -m pip install -q --no-index --find-links "$DIR" --no-deps "$DIR"/*.whl
    python -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'
    exit 0
fi
mkdir -p "$DIR"
grep -qxF "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
# pure-Python wheels except tokenizers / safetensors: those are taken for the device's Python (3.12, manylinux x86_64)
python -m pip download -q --no-deps -d "$DIR" "${PINS[0]}" "${PINS[2]}"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$DIR" "${PINS[1]}" "${PINS[3]}"
ls -la "$DIR"

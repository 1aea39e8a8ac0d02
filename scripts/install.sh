#!/usr/bin/env bash
# Install this repository and its pinned dependencies into the current Python environment.
# torch is pinned and installed FIRST (on CPU-only machines this pin is the CPU build; on GPU
# machines the same pin is the CUDA build), then everything else with torch constrained so that
# no dependency can pull a different torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
# DeepSpeed inference (the `deepspeed` extra; tests/test_deepspeed_inference.py runs it on DeepSpeed's CPU
# accelerator). It ships as an sdist whose setup imports torch: build it against the torch installed above.
python -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt "deepspeed>=0.16" \
    || echo "warning: deepspeed did not install; DeepSpeed inference and its tests are unavailable" >&2

#!/usr/bin/env bash
# Install (scripts/install.sh) and run the test suite on the CPU, offline, one pytest-xdist worker per core, a test
# file per worker at a time (--dist loadfile: a file's module fixtures are built once; tests/conftest.py hands out the
# slowest files first). PYTEST_WORKERS=N sets the workers (0: one process, e.g. with -k on a few tests).
# `bash scripts/test.sh --quick` runs the inner loop's tier (`pytest -m quick`, the tests tests/conftest.py's QUICK
# marks); CI runs the whole suite (no flag). Other arguments go to pytest. A hung test fails after PYTEST_TIMEOUT
# seconds (default 1200, pytest-timeout). Measured times: docs/results/test-suite-timings-cpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
workers="${PYTEST_WORKERS:-auto}"
# --quick: the inner loop's tier (the tests marked quick in tests/conftest.py: QUICK); any other arguments go to pytest
if [[ "${1:-}" == --quick ]]; then
    shift
    set -- -m quick "$@"
fi
# a test that hangs fails after PYTEST_TIMEOUT seconds with its stack (pytest-timeout) instead of stalling the run
timeout=()
if python -c "import pytest_timeout" 2>/dev/null; then
    timeout=(--timeout "${PYTEST_TIMEOUT:-1200}")
else
    echo "warning: pytest-timeout is not installed: a hung test would stall the run (pip install pytest-timeout)" >&2
fi
if [[ "$workers" == "0" ]]; then
    exec python -m pytest -q -p no:cacheprovider "${timeout[@]}" "$@"
fi
exec python -m pytest -q -p no:cacheprovider "${timeout[@]}" -n "$workers" --dist loadfile "$@"

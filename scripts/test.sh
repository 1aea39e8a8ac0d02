#!/usr/bin/env bash
# Set up and run the test suite (CPU, no downloads), one pytest-xdist worker per core, a test file per worker at a
# time (--dist loadfile: a file's module fixtures are built once). PYTEST_WORKERS=0 runs it in one process (e.g. with
# -k on a few tests); PYTEST_WORKERS=N sets the count. Much of the suite is the fast path's compiles
# (tests/test_fastpath*.py, which scripts/bench/fast_path_check.sh runs on their own with every case traced) and the
# harness's end-to-end scripts (subprocesses), and tests/test_slurm.py (a real local Slurm: a few minutes of one
# worker). tests/conftest.py hands the slowest files out first and gives the tests' child processes their worker's
# share of the threads. `bash scripts/test.sh --quick` is the inner loop's tier (`pytest -m quick`: the tests
# tests/conftest.py's QUICK marks, only their files collected): every registered method on LLaVA-1.5 and ConsensusDrop on
# every family (batch == alone, keep-all), the CLI and the documented commands; CI runs the whole suite (no flag).
# Measured on this project's 2-core CPU machine, alone, without .venv-official (as CI):
# 2026-11-26, 5867 tests, 568 skipped: 22:26 before that day's cuts, 21:07 with the first of them, 23:01 with all of
# them on a busier machine (the same unchanged files 10-70 % slower than in the run before); a third worker: 22:03.
# 2026-11-26 later, with `import llava` no longer importing transformers (the paper scripts' planning and report
# processes start in ~2 s, not ~5 s): 19:37 (2288 worker-seconds, was ~2700); the day's final tree: 20:46 (2422
# worker-seconds, 5871 passed, 571 skipped). Around the 20-minute goal here, not clearly under it.
# 2026-11-27, the machine otherwise quiet, after trimming the deepspeed-launcher TP test and the generated benchmarks'
# load test: 18:15 (5895 passed, 605 skipped without .venv-lmms; 2131 worker-seconds); the day's final tree, also
# alone: 19:43 (5897 passed; 2303 worker-seconds), and after its last fix 19:26 (5898 passed). The next session's
# cuts: 18:37 (2179 worker-seconds); then the workers' child processes found running 2 OpenMP threads each (the
# controller's count, inherited: fixed in tests/conftest.py), which had made two tests side by side take 4-10x their
# time (20:39 and 23:02 on a slower machine); with the fix, 18:54 (5899 passed, 605 skipped; 2200 worker-seconds);
# CI's report on that tree: 1183 s, its install included. A session later (the fast path's tower a function of its
# own): 18:10 (5903 passed, 605 skipped); its final tree: 17:02 (5907 passed, 605 skipped).
# 2026-11-27 (CI's report on the tower-split tree: 1292 s): 19:00 at the start (5908 passed); after trimming nine
# end-to-end test files (three interpreter starts fewer, smaller TP matrix, faster Slurm polls) and adding the
# precompile tests: 19:02 (5919 passed, 605 skipped; 2093 worker-seconds, was 2110): about the same.
# 2026-11-27, the next session (loader workers in every eval run, the fast path a package, the floor columns, the
# one-call part; a faster AMD EPYC machine, alone): 13:18 (5976 passed, 609 skipped; pytest alone, without the install).
# 2026-11-28 (a fresh clone's whole suite: 28:39, 37:21 on a loaded machine, 6961 tests collected), on a 2-core
# machine shared with other work (load 4-15), each file before / after back to back: --quick, 95 tests in 1:37
# (1:44 with the start; 3:23 at load 15), its longest part the docs' runnable blocks (~70 s of one worker);
# tests/test_slurm_scripts.py 137 -> 104 s (84 -> 72 CPU-s: two of the report decision's runs without the grid's
# interpreter, the dry run in process), tests/test_cli.py 30 -> 19 s (the process is the README's runnable block),
# tests/test_run_many.py's done-grid rerun 7.6 -> 3.8 s (no report), tests/test_papers.py 31 -> 26 CPU-s (one paper
# script's dry run in a shell, not two; the unknown paper's error in process). Not measured here: tests/test_slurm.py (no
# slurmctld on this machine: skipped); tests/test_fast_precompile.py's stale-file cases are another change's.
# The same day's whole suite on its final trees, this 2-core machine otherwise idle (no slurmctld: tests/test_slurm.py
# skipped; CI installs Slurm and runs it), the install included: 13:57 (6394 passed, 615 skipped, 6 failed on this
# Xeon's MKL, then fixed), 13:22 (6401 passed, 615 skipped; pytest 13:12) beside one nice'd job.
# A run that once took 1:29 was not slow but hung: a test left a
# launcher's RANK / WORLD_SIZE in its worker's environment and a later child waited for a rank 0 (now restored after
# every test by tests/conftest.py; a hang fails after PYTEST_TIMEOUT seconds).
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

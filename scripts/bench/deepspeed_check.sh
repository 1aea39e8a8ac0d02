#!/usr/bin/env bash
# DeepSpeed inference at tensor-parallel size 1 (llava.models.deepspeed_inference): A. every method on
# the tiny families (fp16 / bf16 on CUDA) gives the plain model's greedy tokens when wrapped; B. batch-1
# TTFT of shape:llava-1.5-7b (fp16) plain vs wrapped; C. scripts/eval/pope.sh on the POPE fixture with
# LAUNCHER=deepspeed (the real launcher) equals LAUNCHER=python. Writes
# docs/results/deepspeed-check-<device>-<date>.{json,md}; exit status 1 on a failed check. Without a
# CUDA device it says so and exits 0. Options: python -m bench.deepspeed_check --help
#   bash scripts/bench/deepspeed_check.sh                                    # everything (CUDA)
#   bash scripts/bench/deepspeed_check.sh --no-ttft --families llava
#   bash scripts/bench/deepspeed_check.sh --device cpu --families llava --ttft-model tiny:llava --out /tmp/dsc
# Under a wall-clock limit (a borrowed GPU machine) give it a little less, so that the report is written:
#   timeout 170 bash scripts/bench/deepspeed_check.sh --time-limit 160   # (or env DEEPSPEED_CHECK_TIME_LIMIT=160)
# it starts no task that would end past the limit and lists the rest as "not run (time limit)"; SIGTERM /
# SIGINT (timeout, Ctrl-C) also write the report of what finished. Such a report says PARTIAL, exit 3
# (0 PASS, 1 a failed check, 3 PARTIAL with no failure).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m bench.deepspeed_check "$@"

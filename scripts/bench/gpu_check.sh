#!/usr/bin/env bash
# Issue 19's GPU check: every method on the eight tiny families (llava, llava-next, video-llava,
# qwen2.5-vl, llava-onevision, qwen3-vl, internvl, qwen3.5; n/a where a method does not support one) in fp16 / bf16 (+ fp32 reference) on
# CUDA (batch == alone, cached == no-cache recompute, host-sync counts) and a TTFT table on
# shape:llava-1.5-7b, and the fast path (issue 34: per captured method, compiled == uncompiled == eager-engine
# tokens; fast TTFT / TPOT on the 7B shapes against the issue's targets; --no-fast / --fast-only); writes docs/results/gpu-check-<device>-<date>.{json,md}; exit status 1 on a
# failed check. Without a CUDA device it says so and exits 0. Options: python -m bench.gpu_check --help
#   bash scripts/bench/gpu_check.sh                    # the full check (CUDA)
#   bash scripts/bench/gpu_check.sh --no-ttft --methods fastv visionzip --families llava
#   bash scripts/bench/gpu_check.sh --device cpu --no-ttft --out /tmp/gc   # CPU run, fp32
# Under a wall-clock limit (a borrowed GPU machine) give it a little less, so that the report is written:
#   timeout 170 bash scripts/bench/gpu_check.sh --time-limit 160   # (or env GPU_CHECK_TIME_LIMIT=160)
# it starts no task that would end past the limit and lists the rest as "not run (time limit)"; SIGTERM /
# SIGINT (timeout, Ctrl-C) also write the report of what finished. Such a report says PARTIAL, exit 3
# (0 PASS, 1 a failed check, 3 PARTIAL with no failure).
# Finished tasks are also appended to docs/results/gpu-check-<device>-<date>.partial.jsonl as they end
# (kept beside a partial report, deleted with a complete one); --resume runs only the tasks not in it.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m bench.gpu_check "$@"

#!/usr/bin/env bash
# Issue 19's GPU check: every method on the five tiny families (llava, llava-next, video-llava,
# qwen2.5-vl, llava-onevision; n/a where a method does not support one) in fp16 / bf16 (+ fp32 reference) on
# CUDA (batch == alone, cached == no-cache recompute, host-sync counts) and a TTFT table on
# shape:llava-1.5-7b; writes docs/results/gpu-check-<device>-<date>.{json,md}; exit status 1 on a
# failed check. Without a CUDA device it says so and exits 0. Options: python -m eval.gpu_check --help
#   bash scripts/bench/gpu_check.sh                    # the full check (CUDA)
#   bash scripts/bench/gpu_check.sh --no-ttft --methods fastv visionzip --families llava
#   bash scripts/bench/gpu_check.sh --device cpu --no-ttft --out /tmp/gc   # CPU run, fp32
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m eval.gpu_check "$@"

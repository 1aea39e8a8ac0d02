#!/usr/bin/env bash
# Efficiency table (TTFT + breakdown, TPOT, KV bytes, peak memory, FLOPs) for the unpruned model and
# methods x budgets, in one run. Usage: bash scripts/bench/efficiency.sh [model] [out_dir]
#   model: shape:llava-1.5-7b (real architecture, random weights; default), shape:llava-next-7b,
#          shape:qwen2.5-vl-7b, shape:llava-onevision-7b, a hub id / local checkpoint, tiny:<family> for a
#          quick CPU smoke run, or a scaled-down *-cpu-small shape for CPU tables (docs/results/efficiency-cpu-*.md).
#   Synthetic image per family (bench/efficiency/inputs.py FAMILY_IMAGE_HW): LLaVA-1.5 336 px (576 tokens), NeXT 672 px
#   (2880), Qwen2.5-VL 672 px (48x48 patches -> 576 merged tokens), OneVision 384 px (anyres 729 + 729 + 27 = 1485).
#   FAST=1: every cell also runs with load(fast=True) (--fast): fast and eager rows side by side with their TTFT
#   ratio in efficiency.md; FAST_BACKEND=auto|inductor|eager|aot_eager|none picks the compile backend.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-shape:llava-1.5-7b}
OUT=${2:-docs/results/efficiency/$(echo "$MODEL" | tr ':/' '__')}
DTYPE=${DTYPE:-float16}
DEVICE=${DEVICE:-cuda}
METHODS=${METHODS:-"none consensusdrop visiondrop attnmix fastv pdrop sparsevlm visionzip fastervlm divprune dart random"}
BUDGETS=${BUDGETS:-"192 128 64"}
N=${N:-200}
WARMUP=${WARMUP:-10}
BATCH=${BATCH:-"1 8"}
DECODE_TOKENS=${DECODE_TOKENS:-128}
NEXT_LAYOUT=${NEXT_LAYOUT:-spatial}
FAST_ARGS=()
case "${FAST:-0}" in
  1) FAST_ARGS=(--fast); if [[ -n "${FAST_BACKEND:-}" ]]; then FAST_ARGS+=(--fast-backend "$FAST_BACKEND"); fi ;;
  0|"") if [[ -n "${FAST_BACKEND:-}" ]]; then echo "FAST_BACKEND=$FAST_BACKEND applies with FAST=1 only" >&2; exit 2; fi ;;
  *) echo "FAST=$FAST: use FAST=1 (fast and eager rows side by side) or FAST=0" >&2; exit 2 ;;
esac
# LLaVA-NeXT: a 672x672 image is the 2x2 grid + base crop, i.e. the papers' 2880 tokens in the spatial layout
case "$MODEL" in *next*) IMAGE_HW=${IMAGE_HW:-"672 672"} ;; esac
python -m bench.efficiency --model "$MODEL" --dtype "$DTYPE" --device "$DEVICE" --methods $METHODS \
  --budgets $BUDGETS --n "$N" --warmup "$WARMUP" --batch $BATCH --decode-tokens "$DECODE_TOKENS" \
  --next-layout "$NEXT_LAYOUT" ${IMAGE_HW:+--image-hw $IMAGE_HW} --out "$OUT" ${WANDB:+--wandb} \
  ${FAST_ARGS[@]+"${FAST_ARGS[@]}"}

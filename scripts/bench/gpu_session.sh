#!/usr/bin/env bash
# Everything a borrowed GPU session should measure, in parts that each fit one device command (10 min):
#   bash scripts/bench/gpu_session.sh one-call   OUT   # the whole question in ONE call (issue 80 item 5; LIMIT default 520 s,
#                                                       # for `bash scripts/bench/device_wheels.sh install && bash
#                                                       # scripts/bench/gpu_session.sh one-call $OUT` on a fresh H100), in order,
#                                                       # each step ending by its cumulative share of LIMIT (SHARES="25 72 86";
#                                                       # time a step leaves goes to the next; a failed or cut step keeps its
#                                                       # partial files and the next still runs), shape:llava-1.5-7b fp16 batch 1:
#                                                       #  1. bench.fast_profile on inductor: one prefill and one decode step,
#                                                       #     none + ConsensusDrop at 64, eager and fast (kernels by kind, gaps)
#                                                       #  2. bench.efficiency --fast on inductor: none, random, FastV,
#                                                       #     ConsensusDrop, AttnMix at 64, with each row's physical floor
#                                                       #     (the device's copy bandwidth and matmul peak measured first)
#                                                       #  3. a later process on the same cache (VTPRUNE_FAST_PRECOMPILE=1: the
#                                                       #     precompiled functions, or on torch 2.11 the regular compile on a
#                                                       #     warm Inductor cache; the summary says which): none + ConsensusDrop,
#                                                       #     fast rows first: warm-up (load) and first token from the process start
#                                                       #  4. bench.run_throughput ConsensusDrop 64 then none, fast then eager,
#                                                       #     4 loader workers, 200 questions, its --time-limit the time left, its default fast
#                                                       #     backend with VTPRUNE_FAST_PRECOMPILE unset (skipped, with a line,
#                                                       #     where the checkout lacks the module)
#                                                       # Steps 1-3 run with VTPRUNE_FAST_PRECOMPILE=1 (PRECOMPILE=0: off), so
#                                                       # that step 3 finds what steps 1-2 saved.
#                                                       # WORK defaults to runs/one-call (the compile cache WORK/compile-cache, the
#                                                       # run benchmark's photos: not in OUT); OUT gets the logs, the reports and
#                                                       # one-call.md (every step's status and headline numbers), packed into
#                                                       # OUT/one-call.tgz with one-call.md also beside it. DRYRUN=1: the same
#                                                       # steps on a CPU with tiny:llava fp32, the eager backend (DRY_BACKEND=
#                                                       # inductor to exercise the precompiled functions), 2 inputs, 4 questions
#   bash scripts/bench/gpu_session.sh checks     OUT   # gpu_check: every method x 8 tiny families x fp16/bf16/fp32,
#                                                       # TTFT on shape:llava-1.5-7b, the fast-path section (stops in
#                                                       # time: partial report, continued by gpu_check --resume)
#   bash scripts/bench/gpu_session.sh deepspeed  OUT   # deepspeed_check (needs the deepspeed wheel carried)
#   bash scripts/bench/gpu_session.sh eff-7b     OUT   # efficiency table, shape:llava-1.5-7b, batch 1 and 8
#   bash scripts/bench/gpu_session.sh eff-next   OUT   # efficiency table, shape:llava-next-7b (2880 tokens)
#   bash scripts/bench/gpu_session.sh selection  OUT   # the costly selections only (greedy / multi-stage methods), both shapes
#   bash scripts/bench/gpu_session.sh fast       OUT   # the fast path (load(fast=True)) next to the eager engine, batch 1,
#                                                       # fp16 (bench.efficiency --fast): fast-7b, then fast-next (LIMIT/2 each)
#   bash scripts/bench/gpu_session.sh fast-7b    OUT   #   shape:llava-1.5-7b, none + random + 9 methods at 64 tokens, 32 decode
#                                                       #   tokens (random: the floor of the "over random" selection column):
#                                                       #   TTFT fast vs eager, TPOT, warm-up (capture / compile), selection;
#                                                       #   device warm-up first, the unpruned row re-timed last
#   bash scripts/bench/gpu_session.sh fast-next  OUT   #   shape:llava-next-7b (2880 tokens) at 320 / 160 visual tokens in all:
#                                                       #   64 / 32 per crop (per-crop methods, PyramidDrop's 576 scale), FastV 320 / 160
#   The fast parts use FAST_BACKEND (default cudagraphs: CUDA graphs of the uncompiled functions, captured in seconds;
#   FAST_BACKEND=inductor for Inductor + CUDA graphs: 30-38 s of compile per method on a 7B shape, H200, 2026-11-27).
#   bench.efficiency runs write under WORK (default: OUT) and are copied to OUT: WORK=runs/gpu-session on a device
#   that keeps the tree between calls lets a cut run continue (--resume) in the next call.
#   bash scripts/bench/gpu_session.sh fast-inductor OUT  # shape:llava-1.5-7b on FAST_BACKEND=inductor (default here) with the
#                                                       #   regional compile: none, random, FastV, ConsensusDrop, AttnMix at 64,
#                                                       #   compile time in the warm-up column, Inductor's cache under WORK
#                                                       #   (TMPDIR when WORK is OUT);
#                                                       #   then none + ConsensusDrop in a second process on that cache
#   bash scripts/bench/gpu_session.sh fast-inductor2 OUT # the other methods of fast-7b on Inductor: none, VisionZip, PyramidDrop,
#                                                       #   SparseVLM, DART, CDPruner, VisionDrop at 64 (same cache folder)
#   bash scripts/bench/gpu_session.sh fast-attn  OUT   # the prompt's attention over its bucket, masked vs causal
#                                                       #   (--fast-attention; llava/fast/attention.py): the causal kernel's
#                                                       #   tokens on tiny LLaVA / NeXT / Video-LLaVA fp16 (gpu_check), then
#                                                       #   shape:llava-next-7b none + FastV 320 and shape:llava-1.5-7b
#                                                       #   none + ConsensusDrop 64, each masked then causal
#   bash scripts/bench/gpu_session.sh fast-plan  OUT   # the tower as a function of its own, the host planning beside it
#                                                       #   (2026-11-27): its tokens on tiny LLaVA / NeXT / Video-LLaVA /
#                                                       #   Qwen2.5-VL fp16 (a piecewise prefill among them), then
#                                                       #   shape:llava-1.5-7b none + ConsensusDrop, AttnMix, FastV at 64 and
#                                                       #   shape:llava-next-7b none + ConsensusDrop, DivPrune at 64 per crop:
#                                                       #   TTFT, t_plan / t_plan_exposed (FAST_BACKEND)
#   bash scripts/bench/gpu_session.sh fast-profile OUT # where a fast prefill's time goes on the device (bench.fast_profile):
#                                                       #   kernels by kind against the wall time (the gaps: launches, host
#                                                       #   work), shape:llava-1.5-7b none + ConsensusDrop, AttnMix, FastV at
#                                                       #   64 on cudagraphs, then none + ConsensusDrop on inductor
#   bash scripts/bench/gpu_session.sh fast-precompile OUT # Inductor's functions saved ahead of time and loaded by a later
#                                                       #   process without tracing (fast_precompile, 2026-11-27): tiny
#                                                       #   LLaVA / NeXT fp16 fast == eager twice on one cache folder (the
#                                                       #   second loads), then shape:llava-1.5-7b none + ConsensusDrop at
#                                                       #   64 cold, then a second process (its warm-up column: the load)
#   bash scripts/bench/gpu_session.sh fast-check OUT   # gpu_check --fast-only: fast == uncompiled == eager tokens, timing + targets
#   bash scripts/bench/gpu_session.sh fast-qwen  OUT   # the fast path on shape:qwen2.5-vl-7b / qwen3-vl-8b (576 merged tokens),
#                                                       # none + 4 methods at 64 tokens, batch 1, next to the eager engine
#   bash scripts/bench/gpu_session.sh recheck    OUT   # what the last GPU session left: the fast path of PyramidDrop, SparseVLM
#                                                       # and PruMerge on tiny LLaVA fp16 (fixed in 7fdb5e6), then the tiny
#                                                       # checks it did not reach (InternVL, Qwen3.5; no fast path, no TTFT)
#   bash scripts/bench/gpu_session.sh leaders    OUT   # the methods added since the last GPU check (MMTok, PriorTR, CLSE)
#                                                       # and the staged engine they changed: tiny checks on every family,
#                                                       # eager TTFT on shape:llava-1.5-7b, then the fast path on tiny LLaVA
#                                                       # fp16 with the three fixed in 7fdb5e6 (PyramidDrop, SparseVLM, PruMerge)
#   bash scripts/bench/gpu_session.sh testbed2   OUT   # train testbed v2 (issue 36; continues runs/testbed2-train on each
#                                                       # call until DONE), then OUT/weights2.tar (fp16) + the training log
#   bash scripts/bench/gpu_session.sh sweep2     OUT   # the v2 sweep (testbed.evaluate2, --resume) on runs/testbed2-weights
#                                                       # or testbed/weights2 -> OUT/testbed2/
# The device image has transformers 5.17: first `bash scripts/bench/device_wheels.sh` here, carry .device-wheels and
# begin every device command with `bash scripts/bench/device_wheels.sh install &&` (offline pip, a few seconds).
# OUT defaults to $OUT (the device tool's folder) or docs/results/gpu-session. Each part stops itself before
# LIMIT seconds (default 540) and writes what it has (a process still running 30 s after its SIGTERM is killed; its
# finished cells stay in cells.jsonl). The device tool brings back 8 files at most, none deeper than
# OUT/a/b/: when DEST is the tool's $OUT and holds more (or deeper), the part packs it into one OUT/<part>.tgz.
# bench.efficiency writes its tables at the end and each cell's headline numbers to cells.jsonl as it ends: the fast
# parts split their methods over several runs (each one re-times `none`), so a run cut by its share of LIMIT keeps
# its finished cells (cells.jsonl; its .log keeps the progress). A copied tree may carry a stale .git: pass the commit
# as VTPRUNE_GIT_COMMIT=$(git rev-parse --short HEAD) so the reports name the code that ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: gpu_session.sh one-call|checks|recheck|leaders|deepspeed|eff-7b|eff-next|selection|fast|fast-7b|fast-inductor|fast-inductor2|fast-attn|fast-plan|fast-profile|fast-precompile|fast-next|fast-check|fast-qwen|testbed2|sweep2 [OUT]}
DEST=${2:-${OUT:-docs/results/gpu-session}}
if [[ $PART == one-call ]]; then LIMIT=${LIMIT:-520} WORK=${WORK:-runs/one-call}; fi  # its compile cache: WORK, not OUT
LIMIT=${LIMIT:-540}
FAST_BACKEND=${FAST_BACKEND:-cudagraphs}
WORK=${WORK:-$DEST}
mkdir -p "$DEST" "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
first_failure() { for s in "$@"; do (( s == 0 )) || return "$s"; done; }  # the status of the first that failed
eff() {  # model, methods, budgets, n, batch, decode tokens, out subfolder[, time limit[, more flags]]
  # a SIGTERM at the time limit makes bench.efficiency write its report from the rows it has (status 124)
  timeout -k 30 --signal=TERM "${8:-$LIMIT}" python -m bench.efficiency --model "$1" --dtype float16 --device cuda --methods $2 \
    --budgets $3 --n "$4" --warmup 3 --batch $5 --decode-tokens "$6" --next-layout spatial \
    $( [[ $1 == *next* ]] && echo --image-hw 672 672 ) --out "$WORK/$7" "${@:9}" 2>&1 | tee "$WORK/$7.log" | tail -60
  local rc=$?
  if [[ "$(realpath "$WORK")" != "$(realpath "$DEST")" ]]; then cp -r "$WORK/$7" "$WORK/$7.log" "$DEST/" 2>/dev/null; fi
  return $rc
}
FAST_FLAGS=(--fast --fast-backend "$FAST_BACKEND" --device-warmup 3 --retime-none --resume)
# Inductor's compile cache (the Inductor parts): under WORK when WORK is not the folder that comes back (OUT), else
# in TMPDIR, so that hundreds of MB of compiled artefacts are never packed into OUT/<part>.tgz with the reports
if [[ "$(realpath "$WORK")" != "$(realpath "$DEST")" ]]; then CACHE_DEFAULT=$WORK/compile-cache
else CACHE_DEFAULT=${TMPDIR:-/tmp}/vtprune-compile-cache; fi
fast_7b() {  # seconds for the part: one run, the unpruned row first and again last
  eff shape:llava-1.5-7b "none random fastv visionzip pdrop sparsevlm dart cdpruner consensusdrop visiondrop attnmix" 64 16 1 32 \
    fast-7b "$1" "${FAST_FLAGS[@]}"
}
fast_next() {  # seconds for the part; 320 / 160 of 2880 visual tokens in each method's budget convention
  eff shape:llava-next-7b "none fastervlm random visionzip divprune consensusdrop visiondrop pdrop" "64 32" 12 1 16 \
    fast-next-crop $(($1 * 2 / 3)) "${FAST_FLAGS[@]}"; local a=$?
  eff shape:llava-next-7b "none fastv" "320 160" 12 1 16 fast-next-sample $(($1 / 3)) "${FAST_FLAGS[@]}"
  first_failure "$a" "$?"
}
one_call() {  # the whole device question in one call (header); DRYRUN=1: the same steps on this CPU, tiny models
  local t0=$SECONDS steps=$DEST/one-call-steps.tsv model dtype device backend budget n decode dsteps questions workers
  local -a extra=()
  if [[ ${DRYRUN:-0} == 1 ]]; then
    model=tiny:llava dtype=float32 device=cpu backend=${DRY_BACKEND:-eager} budget=4 n=2 decode=4 dsteps=2 questions=4
    workers=1 extra=(--image-hw 56 56 --sweep 8 16 32)
  else
    model=shape:llava-1.5-7b dtype=float16 device=cuda backend=inductor budget=64 n=8 decode=32 dsteps=8 questions=200
    workers=4 extra=(--device-warmup 3)
  fi
  # one compile cache for every step (Inductor's code, the precompiled functions): each later step finds the earlier
  # steps' work in it. Precompiled functions need Inductor (eager / aot_eager with the regions have none).
  export VTPRUNE_COMPILE_CACHE=${VTPRUNE_COMPILE_CACHE:-$WORK/compile-cache}
  local pre=${PRECOMPILE:-1}; [[ $backend == inductor ]] || pre=0
  export VTPRUNE_FAST_PRECOMPILE=$pre
  : > "$steps"
  # each step ends by its cumulative share of LIMIT (SHARES, default 25 / 72 / 86 %, the last step 100 %): a step that
  # ends early leaves its time to the next, a step cut at its limit keeps its partial files, a failed step does not
  # stop the next
  local -a share; read -r -a share <<< "${SHARES:-25 72 86}"
  left() { echo $(( LIMIT * $1 / 100 - (SECONDS - t0) )); }
  step() {  # name, seconds, command...: run it under its limit, its output in DEST/one-call-<name>.log
    local name=$1 secs=$2 s=$SECONDS rc; shift 2
    if (( secs < 20 )); then
      printf '%s\tskipped\t0\t%s\tno time left\n' "$name" "$secs" >> "$steps"; echo "one-call: $name skipped (no time left)"
      return 0
    fi
    echo "one-call: $name ($secs s): $*"
    timeout -k 15 --signal=TERM "$secs" "$@" > "$DEST/one-call-$name.log" 2>&1; rc=$?
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - s))" "$secs" >> "$steps"
    tail -n 12 "$DEST/one-call-$name.log"
    return $rc
  }
  keep() {  # a bench.efficiency folder written under WORK: copied to DEST (the folder that comes back)
    if [[ -d $WORK/$1 && "$(realpath "$WORK")" != "$(realpath "$DEST")" ]]; then
      rm -rf "${DEST:?}/$1"; cp -r "$WORK/$1" "$DEST/"
    fi
  }
  local -a bench=(python -m bench.efficiency --model "$model" --dtype "$dtype" --device "$device" --budgets "$budget"
                  --n "$n" --warmup 3 --batch 1 --decode-tokens "$decode" --fast --fast-backend "$backend" --resume
                  "${extra[@]}")
  local -a st=()
  step profile "$(left "${share[0]}")" python -m bench.fast_profile --model "$model" --dtype "$dtype" --device "$device" \
    --methods none consensusdrop --budget "$budget" --fast-backend "$backend" --decode-steps "$dsteps" \
    --fast-max-new-tokens "$decode" --out "$DEST/one-call-profile.md"; st+=($?)
  step table "$(left "${share[1]}")" "${bench[@]}" --methods none random fastv consensusdrop attnmix --out "$WORK/one-call-table"
  st+=($?); keep one-call-table
  # a later process on the same cache: its fast rows first, so that its first fast-path token follows the model's load
  step load "$(left "${share[2]}")" "${bench[@]}" --methods none consensusdrop --fast-first --out "$WORK/one-call-load"
  st+=($?); keep one-call-load
  if python -c "import bench.run_throughput" 2>/dev/null; then
    local secs; secs=$(left 100)
    # its fast path's default backend (cudagraphs on a GPU) has no precompiled functions: =1 would refuse it, while the
    # default (the variable unset) quietly compiles the regular way;
    # ConsensusDrop's fast run first (the main job the issue sizes), then its eager run, then the unpruned model's
    step throughput "$secs" env -u VTPRUNE_FAST_PRECOMPILE python -m bench.run_throughput --model "$model" \
      --dtype "$dtype" --device "$device" --methods consensusdrop,none --budget "$budget" --fast on,off --loader-workers "$workers" --questions "$questions" \
      --time-limit "$(( secs > 60 ? secs - 30 : secs / 2 ))" --out "$WORK/one-call-throughput"; st+=($?)
    # its reports and each run's results.json come back; its generated photos and the runs' answers stay in WORK
    if [[ -d $WORK/one-call-throughput && "$(realpath "$WORK")" != "$(realpath "$DEST")" ]]; then
      local to; to=$(realpath "$DEST")/one-call-throughput; mkdir -p "$to"
      (cd "$WORK/one-call-throughput" && cp run_throughput.* "$to/" 2>/dev/null
       find runs -name results.json -exec cp --parents {} "$to/" \; 2>/dev/null)
    fi
  else
    printf 'throughput\tskipped\t0\t0\tbench.run_throughput is not in this checkout\n' >> "$steps"
    echo "one-call: throughput skipped (bench.run_throughput is not in this checkout)"
  fi
  local name; name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  [[ ${DRYRUN:-0} == 1 ]] && name="CPU (DRYRUN)"
  python -m bench.efficiency.one_call --dest "$DEST" --steps "$steps" --out "$DEST/one-call.md" --limit "$LIMIT" \
    --device "${name:-unknown}" $( [[ ${DRYRUN:-0} == 1 ]] && echo --dry ) 2>&1 | sed -n '1,/^## 1\./p'
  first_failure "${st[@]}"
}
case "$PART" in
  one-call) one_call ;;
  checks) python -m bench.gpu_check --out "$DEST" --time-limit "$((LIMIT - 20))" 2>&1 | tee "$DEST/gpu_check.log" | tail -60 ;;
  deepspeed) timeout -k 30 --signal=TERM "$LIMIT" python -m bench.deepspeed_check --ttft-runs 10 --out "$DEST" 2>&1 \
               | tee "$DEST/deepspeed_check.log" | tail -40 ;;
  eff-7b) eff shape:llava-1.5-7b "none consensusdrop visiondrop attnmix fastv pdrop sparsevlm visionzip fastervlm divprune dart random" \
            "192 128 64" 32 "1 8" 32 eff-7b ;;
  eff-next) eff shape:llava-next-7b "none consensusdrop visiondrop attnmix fastv visionzip fastervlm divprune random" \
              "128 64 32" 16 "1 8" 16 eff-next ;;
  selection) eff shape:llava-1.5-7b "none consensusdrop consensusdrop:select=nms divprune visiondrop sparsevlm cdpruner fastervlm" \
               "192 64" 24 "1 8" 2 sel-7b $((LIMIT / 2)); first=$?
             eff shape:llava-next-7b "none consensusdrop divprune visiondrop fastervlm" "128 32" 12 "1 8" 2 sel-next \
               $((LIMIT / 2))
             first_failure "$first" "$?" ;;
  fast) fast_7b $((LIMIT / 2)); first=$?; fast_next $((LIMIT / 2)); first_failure "$first" "$?" ;;
  fast-qwen) eff shape:qwen2.5-vl-7b "none fastervlm visionzip consensusdrop fastv" 64 12 1 32 fast-qwen25 $((LIMIT / 2)) \
               "${FAST_FLAGS[@]}"; first=$?
             eff shape:qwen3-vl-8b "none fastervlm visionzip consensusdrop fastv" 64 12 1 32 fast-qwen3 $((LIMIT / 2)) \
               "${FAST_FLAGS[@]}"
             first_failure "$first" "$?" ;;
  fast-7b) fast_7b "$LIMIT" ;;
  fast-attn) # first the causal kernel's tokens on the tiny LLaVA families in fp16 (their buckets are under auto's 1024)
             python -m bench.gpu_check --fast-only --fast-backend "$FAST_BACKEND" --fast-attention causal --dtypes float16 \
               --fast-dtypes float16 --families llava llava-next video-llava --methods none fastv visionzip consensusdrop \
               --no-fast-ttft --out "$DEST/fast-attn-tiny" --time-limit $((LIMIT / 5 - 10)) 2>&1 \
               | tee "$DEST/fast-attn-tiny.log" | tail -20; st=($?)
             for a in masked causal; do
               eff shape:llava-next-7b "none fastv" 320 8 1 16 "fast-attn-next-$a" $((LIMIT / 4)) "${FAST_FLAGS[@]}" \
                 --fast-attention "$a"; st+=($?)
               eff shape:llava-1.5-7b "none consensusdrop" 64 8 1 16 "fast-attn-7b-$a" $((LIMIT * 3 / 20)) "${FAST_FLAGS[@]}" \
                 --fast-attention "$a"; st+=($?)
             done
             first_failure "${st[@]}" ;;
  fast-plan) # the tower's own function first on tiny models (tokens == eager, no host sync), then the 7B shapes' TTFT
             python -m bench.gpu_check --fast-only --fast-backend "$FAST_BACKEND" --dtypes float16 --fast-dtypes float16 \
               --families llava llava-next video-llava qwen2.5-vl --methods none fastv visionzip consensusdrop prumerge \
               --no-fast-ttft --out "$DEST/fast-plan-tiny" --time-limit $((LIMIT / 4 - 10)) 2>&1 \
               | tee "$DEST/fast-plan-tiny.log" | tail -20; st=($?)
             eff shape:llava-1.5-7b "none consensusdrop attnmix fastv" 64 8 1 16 fast-plan-7b $((LIMIT * 3 / 8)) \
               "${FAST_FLAGS[@]}"; st+=($?)
             eff shape:llava-next-7b "none consensusdrop divprune" 64 8 1 16 fast-plan-next $((LIMIT * 3 / 8 - 10)) \
               "${FAST_FLAGS[@]}"; st+=($?)
             first_failure "${st[@]}" ;;
  fast-profile) export VTPRUNE_COMPILE_CACHE=${VTPRUNE_COMPILE_CACHE:-$CACHE_DEFAULT}
                timeout -k 30 --signal=TERM $((LIMIT / 2)) python -m bench.fast_profile --methods none consensusdrop \
                  attnmix fastv --fast-backend cudagraphs --out "$DEST/fast-profile-cudagraphs.md" 2>&1 \
                  | tee "$DEST/fast-profile-cudagraphs.log" | tail -30; st=($?)
                timeout -k 30 --signal=TERM $((LIMIT / 2 - 10)) python -m bench.fast_profile --methods none consensusdrop \
                  --fast-backend inductor --out "$DEST/fast-profile-inductor.md" 2>&1 \
                  | tee "$DEST/fast-profile-inductor.log" | tail -30; st+=($?)
                first_failure "${st[@]}" ;;
  fast-inductor) export VTPRUNE_COMPILE_CACHE=${VTPRUNE_COMPILE_CACHE:-$CACHE_DEFAULT}
                 ind=(--fast --fast-backend "${FAST_BACKEND/cudagraphs/inductor}" --device-warmup 3 --resume)
                 eff shape:llava-1.5-7b "none random fastv consensusdrop attnmix" 64 8 1 32 fast-7b-inductor $((LIMIT * 3 / 4)) \
                   "${ind[@]}" --retime-none; first=$?
                 # a second process on the same Inductor cache: its warm-up column is the warm-cache compile
                 eff shape:llava-1.5-7b "none consensusdrop" 64 8 1 32 fast-7b-inductor-warm $((LIMIT / 4)) "${ind[@]}"
                 first_failure "$first" "$?" ;;
  fast-inductor2) export VTPRUNE_COMPILE_CACHE=${VTPRUNE_COMPILE_CACHE:-$CACHE_DEFAULT}
                  eff shape:llava-1.5-7b "none visionzip pdrop sparsevlm dart cdpruner visiondrop" 64 8 1 32 \
                    fast-7b-inductor2 "$LIMIT" --fast --fast-backend "${FAST_BACKEND/cudagraphs/inductor}" \
                    --device-warmup 3 --resume --retime-none ;;
  fast-precompile) export VTPRUNE_COMPILE_CACHE=${VTPRUNE_COMPILE_CACHE:-$CACHE_DEFAULT} VTPRUNE_FAST_PRECOMPILE=1
                   st=()
                   for run in save load; do  # the second run loads what the first saved: fast == eager both times
                     python -m bench.gpu_check --fast-only --fast-backend inductor --dtypes float16 --fast-dtypes float16 \
                       --families llava llava-next --methods none consensusdrop --no-fast-ttft \
                       --out "$DEST/fast-precompile-tiny-$run" --time-limit $((LIMIT / 6 - 10)) 2>&1 \
                       | tee "$DEST/fast-precompile-tiny-$run.log" | tail -12; st+=($?)
                   done
                   ind=(--fast --fast-backend inductor --device-warmup 3 --resume)
                   eff shape:llava-1.5-7b "none consensusdrop" 64 8 1 32 fast-precompile-7b $((LIMIT * 3 / 8)) \
                     "${ind[@]}" --retime-none; st+=($?)
                   eff shape:llava-1.5-7b "none consensusdrop" 64 8 1 32 fast-precompile-7b-load $((LIMIT / 4 - 10)) \
                     "${ind[@]}"; st+=($?)
                   first_failure "${st[@]}" ;;
  fast-next) fast_next "$LIMIT" ;;
  recheck) python -m bench.gpu_check --fast-only --families llava --methods pdrop sparsevlm prumerge --dtypes float16 \
             --fast-dtypes float16 --no-fast-ttft --out "$DEST/recheck-fast" --time-limit "$((LIMIT * 2 / 5))" 2>&1 \
             | tee "$DEST/recheck_fast.log" | tail -30; first=$?
           python -m bench.gpu_check --families internvl qwen3.5 --no-fast --no-ttft --out "$DEST/recheck-tiny" \
             --time-limit "$((LIMIT * 3 / 5 - 20))" 2>&1 | tee "$DEST/recheck_tiny.log" | tail -30
           first_failure "$first" "$?" ;;
  leaders) python -m bench.gpu_check --no-fast --no-ttft --methods none mmtok priortr clse pdrop fastv \
             --out "$DEST/tiny" --time-limit "$((LIMIT * 7 / 20))" 2>&1 | tee "$DEST/tiny.log" | tail -25; first=$?
           python -m bench.gpu_check --no-fast --methods none --families llava --dtypes float16 \
             --ttft-methods none fastv pdrop cdpruner consensusdrop mmtok priortr clse --out "$DEST/ttft" \
             --time-limit "$((LIMIT * 3 / 20))" 2>&1 | tee "$DEST/ttft.log" | tail -25; second=$?
           python -m bench.gpu_check --fast-only --families llava --methods pdrop sparsevlm prumerge mmtok priortr clse \
             --dtypes float16 --fast-dtypes float16 --no-fast-ttft --out "$DEST/fast" \
             --time-limit "$((LIMIT * 9 / 20 - 20))" 2>&1 | tee "$DEST/fast.log" | tail -25
           first_failure "$first" "$second" "$?" ;;
  fast-check) python -m bench.gpu_check --fast-only --fast-backend "$FAST_BACKEND" --out "$DEST" --time-limit "$((LIMIT - 20))" 2>&1 \
                | tee "$DEST/gpu_check_fast.log" | tail -60 ;;
  testbed2) LIMIT=$LIMIT bash scripts/train_testbed2.sh runs/testbed2-weights 2>&1 | tail -40  # the device tool returns
            cp runs/testbed2-train/log.json "$DEST/train2_log.json" 2>/dev/null         # 8 files at most: one tar
            [[ -f runs/testbed2-weights/config.json ]] && tar -cf "$DEST/weights2.tar" -C runs testbed2-weights ;;
  sweep2) W=runs/testbed2-weights; [[ -f "$W/config.json" ]] || W=testbed/weights2
          timeout -k 30 --signal=TERM "$LIMIT" python -m testbed.evaluate2 sweep --weights "$W" --device cuda --out "$DEST/testbed2" \
            --workers "$(( $(nproc) - 1 ))" --resume 2>&1 | tee -a "$DEST/sweep2.log" | tail -40 ;;
  *) echo "unknown part: $PART" >&2; exit 2 ;;
esac
rc=$?  # the part's status (its last pipeline's, with pipefail): the packing below must not hide a failed check
if [[ -n "${OUT:-}" && -d "$OUT" && "$(realpath "$DEST")" == "$(realpath "$OUT")" ]]; then
    files=$(find "$DEST" -type f | wc -l)
    if (( files > 8 )) || [[ -n "$(find "$DEST" -mindepth 4 -type f -print -quit)" ]]; then
        pack=$(mktemp -d)
        tar -czf "$pack/$PART.tgz" -C "$DEST" . && find "$DEST" -mindepth 1 -delete && mv "$pack/$PART.tgz" "$DEST/"
        tar -xzf "$DEST/$PART.tgz" -C "$pack" "./$PART.md" 2>/dev/null && mv "$pack/$PART.md" "$DEST/"  # a part's
        # summary page (one-call.md) also stays beside its archive, readable as it comes back
        rmdir "$pack"
        echo "packed $files files into OUT/$PART.tgz (the device tool returns 8 at most)"
    fi
fi
exit $rc

#!/usr/bin/env bash
# The fast path's CPU checks (issue 34): for every method declared capturable ("full" / "piecewise"),
# on the three tiny LLaVA families (and the other families' own files: Qwen2.5-VL / Qwen3-VL, OneVision,
# InternVL, Qwen3.5),
# the prefill compiles with torch.compile(fullgraph=True) (dynamo; FAST_BACKEND=inductor for code
# generation, much slower), reads nothing from the device inside the captured function, gives the eager
# engine's greedy tokens (3 prompts alone + a batch of 3), and runs prompts of other lengths in one bucket and
# 16 decode steps with recompilation set to raise. Prints one summary line.
set -uo pipefail
export FAST_FULL=1  # LLaVA-1.5: also three prompts one at a time per method (the suite: the batch of 3)
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log=$(mktemp)
python -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_fastpath_seed.py \
    tests/test_fastpath_baselines.py tests/test_fastpath_llm.py tests/test_fastpath_piecewise.py \
    tests/test_fastpath_sparsevlm.py tests/test_fastpath_probe.py tests/test_fastpath_flowcut.py \
    tests/test_fastpath_qwen.py tests/test_fastpath_onevision.py tests/test_fastpath_internvl.py \
    tests/test_fastpath_qwen3_5.py \
    tests/test_compiled_decode.py "$@" >"$log" 2>&1
rc=$?
summary=$(tail -n 1 "$log")
if [ $rc -eq 0 ]; then
    echo "fast path check PASS: $summary"
else
    cat "$log"
    echo "fast path check FAIL: $summary"
fi
rm -f "$log"
exit $rc

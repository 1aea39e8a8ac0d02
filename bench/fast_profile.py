"""Where a fast-path prefill spends its time on a GPU: the device kernels of one warm batch-1 prefill per method
(``torch.profiler``), grouped by kind, with the wall time of the prefill and of the same prefill on the eager engine.

    python -m bench.fast_profile --model shape:llava-1.5-7b --methods none fastv --budget 64 --out prof.md

Kinds: GEMMs (cuBLAS / cuBLASLt / CUTLASS kernels), attention (flash / memory-efficient / math SDPA, softmax),
copies (memcpy, index / gather / scatter / cat), elementwise and reductions (the rest). The sum of the kernel
times against the wall time says how much of the prefill is launch gaps: the part a CUDA graph can still not
remove is the kernels themselves (unfused elementwise ops on the eager kernels of ``fast_backend="cudagraphs"``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

KINDS = (("gemm", ("gemm", "cublas", "cutlass", "sm90_xmma", "sm80_xmma", "nvjet", "matmul")),
         ("attention", ("flash", "fmha", "attention", "softmax", "efficient")),
         ("copies", ("memcpy", "memset", "index", "gather", "scatter", "cat", "copy")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise / reductions"


def profile(rt, batch, device, runs: int = 3):
    """(wall ms median, {kind: device ms per prefill}, top kernels [(name, ms, calls)])."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    def once():
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = rt.model(**batch, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).cpu()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up: the fast path's recording happens here
        once()
    walls = [once() for _ in range(5)]
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            once()
    kinds, kernels = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if not t or ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
            continue
        kinds[kind_of(ev.key)] += t / 1e3 / runs
        kernels[ev.key][0] += t / 1e3 / runs
        kernels[ev.key][1] += ev.count // runs
    top = sorted(((k, v[0], v[1]) for k, v in kernels.items()), key=lambda x: -x[1])[:12]
    return statistics.median(walls) * 1e3, dict(kinds), top


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fast_profile", description=__doc__)
    ap.add_argument("--model", default="shape:llava-1.5-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--methods", nargs="+", default=["none", "fastv"])
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--fast-backend", default="cudagraphs")
    ap.add_argument("--out", default=None, help="markdown file (default: print only)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.fast_profile needs a CUDA device (it reads the device kernels)", file=sys.stderr)
        return 2
    from bench.efficiency.inputs import build_batch, default_image_hw, make_inputs
    from bench.efficiency.timing import attach
    from llava.models import load

    rt = load(a.model, dtype=a.dtype, device="cuda", fast=True, fast_backend=a.fast_backend, fast_max_new_tokens=8)
    device = next(rt.model.parameters()).device
    batch = build_batch(rt, make_inputs(rt, 1, 12, 0, default_image_hw(rt)), device)
    lines = [f"# Fast-path prefill profile: {a.model}, {a.dtype}, batch 1, {torch.cuda.get_device_name(device)}", "",
             "Device time per prefill by kernel kind (ms); wall = the synchronised prefill's median; gaps = wall "
             "minus the kernels' sum (launches, host work, idle device).", "",
             "| Method | Path | Wall (ms) | Kernels (ms) | Gaps (ms) | GEMM | Attention | Copies | Elementwise / reductions |",
             "|---|---|---|---|---|---|---|---|---|"]
    tops = []
    for m in a.methods:
        budget = None if m == "none" else a.budget
        for path in ("eager", "fast"):
            eng = attach(rt, m, budget, {}, path)
            wall, kinds, top = profile(rt, batch, device)
            took = eng.stats.path if eng.stats is not None else path
            total = sum(kinds.values())
            lines.append(f"| {m} | {path} ({took}) | {wall:.2f} | {total:.2f} | {wall - total:.2f} | "
                         + " | ".join(f"{kinds.get(k, 0.0):.2f}" for k in ("gemm", "attention", "copies",
                                                                          "elementwise / reductions")) + " |")
            tops.append((m, path, top))
            rt.unprune()
            print(lines[-1], flush=True)
    for m, path, top in tops:
        lines += ["", f"Top kernels, {m} ({path}): " + "; ".join(f"{name[:70]} {ms:.2f} ms x{n}" for name, ms, n in top)]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

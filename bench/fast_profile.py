"""Where a fast-path prefill and decode step spend their time on a GPU: the device kernels of one warm batch-1
prefill and of one decode step per method (``torch.profiler``), grouped by kind, against their wall time, on the
eager engine and on the fast path.

    python -m bench.fast_profile --model shape:llava-1.5-7b --methods none fastv --budget 64 --out prof.md

Kinds: GEMMs (cuBLAS / cuBLASLt / CUTLASS kernels), attention (flash / memory-efficient / math SDPA, softmax),
copies (memcpy, index / gather / scatter / cat), elementwise and reductions (the rest). The sum of the kernel
times against the wall time says how much is launch gaps: the part a CUDA graph can still not remove is the kernels
themselves (unfused elementwise ops on the eager kernels of ``fast_backend="cudagraphs"``).

A decode step: ``generate`` of 1 + S forced tokens less ``generate`` of 1 (the prefill and its first token), over S
(``--decode-steps``): its kernels by kind per step and its wall time per step (both medians of the difference's
parts), so the gaps are the step's launches and host work (generate's own included: the logits processing, the
stopping check).

``--device cpu`` runs the same on a CPU with the aten ops' own CPU time standing in for the kernels (the dry run of
``gpu_session.sh one-call``; the numbers say nothing about a GPU). The file (``--out``) is rewritten after every
row: a run stopped by SIGTERM (a time limit) keeps the rows it has, says so and exits with 124.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from collections import defaultdict

import torch

KINDS = (("gemm", ("gemm", "cublas", "cutlass", "sm90_xmma", "sm80_xmma", "nvjet", "matmul")),
         ("attention", ("flash", "fmha", "attention", "softmax", "efficient")),
         ("copies", ("memcpy", "memset", "index", "gather", "scatter", "cat", "copy")))
#: a CPU's aten ops by kind (``--device cpu``: their self time stands in for kernels)
CPU_KINDS = (("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                       "convolution", "mkldnn")),
             ("attention", ("attention", "softmax")),
             ("copies", ("copy", "index", "gather", "scatter", "cat", "clone", "fill", "zero")))
COLUMNS = ("gemm", "attention", "copies", "elementwise / reductions")


def kind_of(name: str, kinds=KINDS) -> str:
    low = name.lower()
    for kind, keys in kinds:
        if any(k in low for k in keys):
            return kind
    return "elementwise / reductions"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernels(prof, device, runs: int):
    """{kind: ms per run}, {kernel: [ms per run, calls per run]} of a profile of ``runs`` runs."""
    kinds, kernels = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        if device.type == "cuda":
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = getattr(ev, "cuda_time_total", 0.0)
            if not t or ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
                continue
            kind = kind_of(ev.key)
        else:  # the aten ops' own time (self: no double count of an op and the ops it calls)
            t = getattr(ev, "self_cpu_time_total", 0.0)
            if not t or not ev.key.startswith("aten::"):
                continue
            kind = kind_of(ev.key, CPU_KINDS)
        kinds[kind] += t / 1e3 / runs
        kernels[ev.key][0] += t / 1e3 / runs
        kernels[ev.key][1] += ev.count / runs
    return kinds, kernels


def profile(fn, device, runs: int = 3, warm: int = 3, timed: int = 5):
    """(wall ms median, {kind: device ms per call}, {kernel: [ms, calls] per call}) of ``fn`` (one synchronised call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    def once():
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(warm):  # warm-up: the fast path's compile / recording happens here
        once()
    walls = [once() for _ in range(timed)]
    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with tprof(activities=acts) as prof:
        for _ in range(runs):
            once()
    kinds, kernels = _kernels(prof, device, runs)
    return statistics.median(walls) * 1e3, dict(kinds), dict(kernels)


def _top(kernels: dict, n: int = 12):
    return sorted(((k, v[0], v[1]) for k, v in kernels.items()), key=lambda x: -x[1])[:n]


def prefill_profile(rt, batch, device):
    """One prefill (the TTFT's work: the last position's logits, the greedy pick on the host)."""
    def fn():
        out = rt.model(**batch, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).cpu()

    wall, kinds, kernels = profile(fn, device)
    return wall, kinds, _top(kernels)


def decode_profile(rt, batch, device, steps: int):
    """One decode step: generate(1 + steps) less generate(1), over ``steps`` (module docstring)."""
    def gen(n):
        return lambda: rt.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    w1, k1, r1 = profile(gen(1), device)
    wn, kn, rn = profile(gen(1 + steps), device)
    kinds = {k: max(kn.get(k, 0.0) - k1.get(k, 0.0), 0.0) / steps for k in set(k1) | set(kn)}
    per = {name: [(rn.get(name, [0.0, 0])[0] - r1.get(name, [0.0, 0])[0]) / steps,
                  (rn.get(name, [0.0, 0])[1] - r1.get(name, [0.0, 0])[1]) / steps] for name in set(rn) | set(r1)}
    return (wn - w1) / steps, kinds, _top({k: v for k, v in per.items() if v[0] > 0})


class _Stopped(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stopped()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fast_profile", description=__doc__)
    ap.add_argument("--model", default="shape:llava-1.5-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cuda", help="cuda (the device kernels) or cpu (a dry run: aten ops' time)")
    ap.add_argument("--methods", nargs="+", default=["none", "fastv"])
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--fast-backend", default="cudagraphs")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps per profiled generate (0: no decode)")
    ap.add_argument("--fast-max-new-tokens", type=int, default=32,
                    help="the fast path's static cache slots (> --decode-steps; the same as a bench.efficiency run's "
                         "--decode-tokens shares its compiled functions through the compile cache)")
    ap.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=["eager", "fast"])
    ap.add_argument("--out", default=None, help="markdown file (default: print only)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: bench.fast_profile needs a CUDA device (it reads the device kernels; --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    if a.decode_steps and a.decode_steps + 1 > a.fast_max_new_tokens:
        print(f"error: --decode-steps {a.decode_steps} needs --fast-max-new-tokens >= {a.decode_steps + 1}",
              file=sys.stderr)
        return 2
    from bench.efficiency.inputs import build_batch, default_image_hw, make_inputs
    from bench.efficiency.timing import attach
    from llava.models import load

    rt = load(a.model, dtype=a.dtype, device=a.device, fast=True, fast_backend=a.fast_backend,
              fast_max_new_tokens=a.fast_max_new_tokens)
    device = next(rt.model.parameters()).device
    batch = build_batch(rt, make_inputs(rt, 1, 12, 0, default_image_hw(rt)), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (aten ops' self time, a dry run)"
    lines = [f"# Fast-path profile: {a.model}, {a.dtype}, batch 1, {name}, backend {a.fast_backend}", "",
             "Device time per prefill / per decode step by kernel kind (ms); wall = the synchronised call's median; "
             "gaps = wall minus the kernels' sum (launches, host work, idle device). A decode step = generate of "
             f"1 + {a.decode_steps} tokens less generate of 1, over {a.decode_steps}.", "",
             "| Method | Path | Phase | Wall (ms) | Kernels (ms) | Gaps (ms) | GEMM | Attention | Copies "
             "| Elementwise / reductions |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    tops = []

    def write(note: str = ""):
        text = "\n".join(lines + [""] + [f"Top kernels, {m} ({path}, {phase}): " + "; ".join(
            f"{k[:70]} {ms:.3f} ms x{n:g}" for k, ms, n in top) for m, path, phase, top in tops]
            + ([note] if note else [])) + "\n"
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        return text

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    with tprof(activities=[ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]):
        torch.ones(8, device=device).sum().item()  # the profiler's own start-up, outside the first row's numbers
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for m in a.methods:
            budget = None if m == "none" else a.budget
            for path in a.paths:
                eng = attach(rt, m, budget, {}, path)
                phases = [("prefill", lambda: prefill_profile(rt, batch, device))]
                if a.decode_steps:
                    phases.append(("decode step", lambda: decode_profile(rt, batch, device, a.decode_steps)))
                for phase, run in phases:
                    wall, kinds, top = run()
                    took = eng.stats.path if eng.stats is not None else path
                    total = sum(kinds.values())
                    lines.append(f"| {m} | {path} ({took}) | {phase} | {wall:.2f} | {total:.2f} | {wall - total:.2f} | "
                                 + " | ".join(f"{kinds.get(k, 0.0):.2f}" for k in COLUMNS) + " |")
                    tops.append((m, path, phase, top))
                    write()
                    print(lines[-1], flush=True)
                rt.unprune()
                if path == "fast" and hasattr(torch, "_dynamo"):  # this engine's graphs are not reused
                    torch._dynamo.reset()
    except _Stopped:
        text = write(f"**Stopped by SIGTERM (the time limit) after {len(tops)} row(s)**: the rows above are those "
                     "it finished.")
        print(text)
        return 124
    finally:
        signal.signal(signal.SIGTERM, old)
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())

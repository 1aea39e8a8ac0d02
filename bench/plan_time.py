"""The fast path's host plan per prefill, at a real model's shapes, on the CPU alone: the model built on the ``meta``
device (no weights, nothing runs), one prompt with one image, the plan of its prefill timed per method - the part
before the tower starts on the device (``plan_tower``: the ids read, the family's visual layout) and the rest
(``plan_visual`` + ``plan_rows``), which a GPU runs beside the tower. The GPU's own figure is ``t_plan`` /
``t_plan_exposed`` of ``bench.efficiency --fast``; this is its proxy where no GPU is at hand.

    python -m bench.plan_time --model shape:llava-next-7b --image-hw 672 672 --methods none fastv consensusdrop

Prints a markdown table (medians over ``--n`` plans after ``--warmup``; the first plan of a method also pays its
one-off dry run, reported apart). A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

DEFAULT_METHODS = ["none", "fastv", "visionzip", "pdrop", "sparsevlm", "dart", "cdpruner", "consensusdrop",
                   "visiondrop", "attnmix"]
QUESTION = "what is the man on the left side of the picture holding in his right hand today"


def measure(rt, batch, method: str, budget: int | None, n: int, warmup: int) -> dict:
    """One method's plan times (seconds): ``first`` (the first plan, its dry run included), ``tower`` and
    ``rest`` medians; or ``refused`` (why the fast path runs it eagerly)."""
    eng = rt.prune(method, budget if method != "none" else None)
    if eng.fast.refusal:
        return {"method": method, "refused": eng.fast.refusal}
    fp = eng.fast.planner
    ids, am = batch["input_ids"], batch["attention_mask"]
    visual = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    tower, rest, first = [], [], None
    for i in range(warmup + n):
        t0 = time.perf_counter()
        tp = fp.plan_tower(ids, am, visual)
        t1 = time.perf_counter()
        fp.plan_rows(fp.plan_visual(ids, am, visual, tp))
        t2 = time.perf_counter()
        if first is None:
            first = t2 - t0
        if i >= warmup:
            tower.append(t1 - t0)
            rest.append(t2 - t1)
    return {"method": method, "first": first, "tower": statistics.median(tower), "rest": statistics.median(rest)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plan_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shape:llava-1.5-7b")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--image-hw", nargs=2, type=int, metavar=("H", "W"), help="the image's size (default: the "
                    "demo image's)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args(argv)
    from llava.demo_image import demo_image
    from llava.models import load

    rt = load(a.model, device="meta", dtype="float16", fast=True, fast_backend="none")
    img = demo_image() if a.image_hw is None else demo_image().resize((a.image_hw[1], a.image_hw[0]))
    batch = rt.processor([QUESTION], [img])
    print(f"{a.model}, one prompt of {batch['input_ids'].shape[1]} rows, budget {a.budget}: host plan per prefill "
          f"(ms, median of {a.n})\n")
    print("| Method | before the tower (exposed) | beside the tower | all | first plan (dry run incl.) |")
    print("|---|---|---|---|---|")
    for m in a.methods:
        try:
            r = measure(rt, batch, m, a.budget, a.n, a.warmup)
        except ValueError as e:  # a budget the method does not take, ...: its row says so, the others run
            print(f"| {m} | error: {e} | | | |", flush=True)
            continue
        if "refused" in r:
            print(f"| {m} | eager: {r['refused']} | | | |", flush=True)
            continue
        ms = lambda x: f"{x * 1e3:.2f}"  # noqa: E731
        print(f"| {m} | {ms(r['tower'])} | {ms(r['rest'])} | {ms(r['tower'] + r['rest'])} | {ms(r['first'])} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

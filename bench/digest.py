"""What every method answers on every tiny family, as digests: the pin a structural change of the engine is held to.

    python -m bench.digest --out before.json                  # every method x tiny family, fp32 and bf16
    python -m bench.digest --out after.json
    python -m bench.digest --compare before.json after.json   # exit 1 and the differing cells when they differ

Per cell (method x family x dtype, the method at its check budget, ``llava.check.budgets.tiny_budget``) and per
batch (``llava.check.inputs``: three left-padded prompts of different lengths; different questions and images, on
Video-LLaVA a video beside two images): sha256 of the greedy tokens, of the first step's scores (their bytes) and of
every recorded selection (``keep`` / ``targets`` / ``order`` / ``assign`` bytes per stage), and the per-sample
visual-token counts (candidates, entering the LLM, per layer) and sequence lengths per layer. A method that does not
attach records its one-line reason instead; :data:`VARIANTS` adds the reference modes (option variants) the defaults
do not reach; ``fast_refusal``: why the fast path would not capture the method on that
family (None: it would). ``--fast`` adds the fast path (the captured prefill and one-graph decode on this
machine's backend) on the first batch for every method it captures; ``--only`` / ``--families`` limit the
grid. Cells are independent: a digest file made on one tree compares with one made on another, on the same machine
and torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch

from llava.check.budgets import tiny_budget
from llava.check.fast import generate
from llava.check.inputs import key, make_batch, unequal_batch
from llava.families import registry
from llava.method import available_methods, method_class
from llava.models import load

TOKENS = 3
#: option variants beside each method's defaults: the engine's reference modes (pruned earlier caches, eager score
#: layers, sub-block states, an LLaVA-NeXT llm stage, the official numerics)
VARIANTS = [
    ("priortr", {"caches": "pruned"}), ("priortr", {"numerics": "official"}),
    ("clse", {"caches": "pruned"}), ("clse", {"numerics": "official"}),
    ("ivcprune", {"caches": "pruned"}), ("flowcut", {"next_half": True, "next_llm_stage": True}),
    ("sparsevlm", {"numerics": "official"}), ("fastv", {"numerics": "official"}),
    ("pdrop", {"numerics": "official"}), ("visiondrop", {"numerics": "official"}),
    ("consensusdrop", {"preset": "probe"}), ("dart", {"numerics": "official"}),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = {"make": make_batch, "unequal": unequal_batch}


def _sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _selections(eng) -> dict:
    out = {}
    for where, sel in sorted(eng.selections.items(), key=lambda kv: str(kv[0])):
        parts = []
        for field in ("keep", "targets", "order", "assign"):
            v = getattr(sel, field, None)
            if isinstance(v, torch.Tensor):
                parts.append(f"{field}:{_sha(v)}")
        out[str(where)] = " ".join(parts)
    return out


def _answer(rt, batch) -> dict:
    tokens, scores = generate(rt, batch, TOKENS)
    eng = rt.engine
    stats = eng.stats
    return {
        "tokens": tokens.tolist(),
        "scores": _sha(scores.float()),
        "samples": [{"candidates": s.visual_candidates, "entering": s.visual_entering_llm,
                     "per_layer": list(s.visual_per_layer)} for s in stats.samples],
        "seq_len_per_layer": list(stats.seq_len_per_layer),
        "selections": _selections(eng),
        "path": stats.path,
    }


def _cell(rt, name, family, fast_rt, fast: bool, options=None) -> dict:
    """One method's answers on ``rt`` and, on ``fast_rt`` (the same model loaded with ``fast=True``), why the fast
    path would refuse it and, with ``fast``, its answers there."""
    cls = method_class(name)
    options = options or {}
    if not cls.supports(key(family)):
        return {"na": f"{name} does not support {key(family)}"}
    budget = tiny_budget(name, family, cls)
    try:
        rt.prune(name, budget, **options)
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        return {"refused": f"{type(e).__name__}: {e}".splitlines()[0]}
    out = {"budget": budget}
    eng = fast_rt.prune(name, budget, **options)
    refusal = eng.fast.refusal if eng.fast is not None else "no fast path"
    out["fast_refusal"] = refusal
    for bname, make in BATCHES.items():
        try:
            out[bname] = _answer(rt, make(rt))
        except Exception as e:  # noqa: BLE001
            out[bname] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    rt.unprune()
    if fast and refusal:
        out["fast"] = {"refused": refusal}
    elif fast:
        torch._dynamo.reset()  # each cell compiles afresh, as a new process would: one process compiling every method
        # for the same functions hits dynamo's recompile limit (under fullgraph=True, an error, not an answer)
        try:
            out["fast"] = _answer(fast_rt, make_batch(fast_rt))
            out["fast"]["reason"] = eng.stats.path_reason
        except Exception as e:  # noqa: BLE001
            out["fast"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    fast_rt.unprune()
    return out


def build(methods, families, dtypes, fast: bool, variants: bool = True, log=sys.stderr) -> dict:
    cells = {}
    for dname in dtypes:
        for family in families:
            t0 = time.perf_counter()
            rt = load(f"tiny:{family}", seed=1, dtype=DTYPES[dname])
            fast_rt = load(f"tiny:{family}", seed=1, dtype=DTYPES[dname], fast=True, fast_precompile=False)
            answer_fast = fast and registry.get(family).fast
            for name in methods:
                torch.manual_seed(0)
                cells[f"{name}|{family}|{dname}"] = _cell(rt, name, family, fast_rt, answer_fast)
            for name, options in VARIANTS if variants else ():
                if name in methods:
                    torch.manual_seed(0)
                    label = ",".join(f"{k}={v}" for k, v in options.items())
                    cells[f"{name}[{label}]|{family}|{dname}"] = _cell(rt, name, family, fast_rt, answer_fast, options)
            print(f"[digest] {family} {dname}: {time.perf_counter() - t0:.1f} s", file=log, flush=True)
    return cells


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            diffs.append(f"{k}: only in {'the first' if k in a else 'the second'}")
        elif a[k] != b[k]:
            parts = [p for p in sorted(set(a[k]) | set(b[k])) if a[k].get(p) != b[k].get(p)]
            diffs.append(f"{k}: {', '.join(parts)} differ")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.digest", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the digests (JSON) here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two digest files")
    p.add_argument("--only", nargs="*", help="methods (default: every registered one)")
    p.add_argument("--families", nargs="*", help="tiny family names (default: every registered family)")
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--fast", action="store_true", help="add the fast path's answers on the first batch")
    p.add_argument("--no-variants", action="store_true", help="each method's defaults only (no VARIANTS)")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.load(open(f))["cells"] for f in args.compare)
        diffs = compare(a, b)
        for d in diffs:
            print(d)
        print(f"{len(set(a) | set(b)) - len(diffs)} cells equal, {len(diffs)} differ")
        for name, cells in zip(args.compare, (a, b)):  # a pin whose fast cells did not run pins nothing there
            ran = [c["fast"] for c in cells.values() if "fast" in c]
            errors = sum("error" in f for f in ran)
            if ran:
                print(f"{name}: {len(ran)} fast cells, {sum('tokens' in f for f in ran)} answered, "
                      f"{sum('refused' in f for f in ran)} refused, {errors} errors")
        return 1 if diffs else 0
    if not args.out:
        p.error("--out or --compare")
    methods = args.only or sorted(available_methods())
    families = args.families or list(registry.tiny_names())
    torch.set_num_threads(1)
    cells = build(methods, families, args.dtypes, args.fast, variants=not args.no_variants)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cells": cells}, f, indent=1, sort_keys=True)
    print(f"{len(cells)} cells -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate pruning methods on testbed v2 (336 px, 576 visual tokens, cluttered scenes; docs/testbed.md).

    python -m testbed.evaluate2 run --method consensusdrop --budget 64          # one method, the report seeds
    python -m testbed.evaluate2 sweep                 # every method x 64 / 128 / 192 -> docs/results/testbed2.{md,json,png}
    python -m testbed.evaluate2 sweep --device cuda --resume     # continue a cut sweep (one row per finished config)
    python -m testbed.evaluate2 sweep --seeds 1 2 --n-per-seed 350 --out runs/dev   # design seeds, never the report's

Protocol as v1's (:mod:`testbed.evaluate`: LLaVA's ``vicuna_v1`` prompt with the short-answer suffix, greedy,
``max_new_tokens`` 3, exact match), on the v2 checkpoint (``testbed/weights2``) and v2's questions
(:func:`testbed.data2.test_set`, seven types balanced). Budgets are visual tokens of LLaVA-1.5's 576, each
method's own convention (as v1's docstring lists), so no 576-scale table is needed; downsample runs at the
count its equal windows reach on the 24 x 24 grid nearest each budget (64, 144).

Seeds: the report uses :data:`REPORT_SEEDS` (five test streams of 800 questions: 4,000), which no design
decision (recipe, options, budgets) used; decisions are made on :data:`DESIGN_SEEDS`. Each row holds the
per-seed accuracy, its mean and sample sd over seeds, and every question's correctness, from which the
comparisons take **paired** differences (the same questions under two configs): mean difference and its
standard error sd(d) / sqrt(n) over all questions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import data2 as D
from . import evaluate as E

REPO = E.REPO
RESULTS_DIR = E.RESULTS_DIR
BUDGETS = (64, 128, 192)
REPORT_SEEDS = (101, 102, 103, 104, 105)
DESIGN_SEEDS = (1, 2, 3)
N_PER_SEED = 800
#: budgets downsample's equal windows reach on the 24 x 24 grid (576 / s^2, s dividing 24)
DOWNSAMPLE_REACH = (1, 4, 9, 16, 36, 64, 144, 576)


def overrides(budgets: Sequence[int]) -> dict:
    """Per-method budgets: downsample at the reachable count nearest each budget (64 -> 64, 128 and 192 -> 144)."""
    near = sorted({min(DOWNSAMPLE_REACH, key=lambda r: (abs(r - b), r)) for b in budgets})
    return {"downsample": tuple(near)}
#: the comparisons the issue asks for: ConsensusDrop against its single-signal ablations and the controls
REFERENCES = (("consensusdrop", {"fusion": "cross_only"}), ("consensusdrop", {"fusion": "encoder_only"}),
              ("random", {}), ("downsample", {}))
NAME = "results"


def questions(n: int = N_PER_SEED, seed: int = REPORT_SEEDS[0]) -> list[D.Question]:
    return D.test_set(n, seed)


def load_runtime(path=None, device: str = "cpu", threads: int | None = 2):
    if threads:
        torch.set_num_threads(threads)
    from .model2 import WEIGHTS2_DIR, load

    path = Path(path or WEIGHTS2_DIR)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no v2 checkpoint in {path}: train one with `bash scripts/train_testbed2.sh` (a GPU; "
                                "docs/testbed.md) or pass --weights")
    return load(path, device=device)


def _render(scene):
    return D.render(scene)


def prompt_batches(rt, qs: list, workers: int = 0, batch_size: int = E.BATCH_SIZE):
    """The prompt batches of ``qs`` (built once, reused by every config), the images rendered by ``workers``
    processes (0: here): rendering is most of the cost of 4,000 questions."""
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            images = list(ex.map(_render, [q.scene for q in qs], chunksize=16))
    else:
        images = [q.image() for q in qs]
    out = object.__new__(E._Batches)
    out.qs = list(qs)
    out.batches = [(out.qs[s:s + batch_size], rt.processor([q.prompt for q in qs[s:s + batch_size]], images[s:s + batch_size]))
                   for s in range(0, len(qs), batch_size)]
    return out


def config_key(method: str, budget, options: dict) -> str:
    return json.dumps([method, budget, options], sort_keys=True)


def evaluate(rt, method: str, budget, options: dict | None, batches: dict) -> dict:
    """One config on every seed's questions (``batches``: seed -> prompt batches built once)."""
    per_seed, correct, tok_in, tok_avg, secs = {}, {}, [], [], 0.0
    for seed, b in batches.items():
        answers, stats = E.predict(rt, b, method, budget, options)
        res = E.summarize(b.qs, answers, D.QTYPES, D.SALIENCE)
        per_seed[str(seed)] = res["accuracy"]
        correct[str(seed)] = "".join("1" if E.is_correct(a, q.answer) else "0" for q, a in zip(b.qs, answers))
        tok_in.append(stats["visual_entering_llm"])
        tok_avg.append(stats["visual_layer_avg"])
        secs += stats["time_s"]
    keys = list(next(iter(per_seed.values())))
    mean = {k: round(sum(a[k] for a in per_seed.values()) / len(per_seed), 2) for k in keys
            if all(k in a for a in per_seed.values())}
    sd = {k: round(_sd([a[k] for a in per_seed.values()]), 2) for k in mean}
    return {"method": method, "budget": budget, "options": options or {}, "accuracy": mean, "seed_sd": sd,
            "per_seed": per_seed, "correct": correct,
            "tokens": {"visual_entering_llm": round(sum(tok_in) / len(tok_in), 2),
                       "visual_layer_avg": round(sum(tok_avg) / len(tok_avg), 2), "time_s": round(secs, 2)}}


def _sd(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired(a: dict, b: dict) -> dict:
    """Paired accuracy difference a - b (points) over the questions both rows answered, with its standard
    error sd(d) / sqrt(n) (d_i in {-1, 0, 1} per question)."""
    seeds = sorted(set(a["correct"]) & set(b["correct"]))
    d = [int(x) - int(y) for s in seeds for x, y in zip(a["correct"][s], b["correct"][s], strict=True)]
    if not d:
        raise ValueError("no common questions")
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"diff": round(100 * mean, 2), "se": round(100 * se, 2), "n": n}


def comparisons(rows: list[dict], budgets: Sequence[int]) -> list[dict]:
    """Per budget: the best and the worst method (mean overall accuracy; not the unpruned model or no visual
    tokens) with their paired difference, and ConsensusDrop against each of :data:`REFERENCES`."""
    out = []
    for b in budgets:
        at = [r for r in rows if r["budget"] == b]
        if not at:
            continue
        best = max(at, key=lambda r: r["accuracy"]["overall"])
        worst = min(at, key=lambda r: r["accuracy"]["overall"])
        out.append({"budget": b, "what": "best - worst", "a": E.label(best["method"], best["options"]),
                    "b": E.label(worst["method"], worst["options"]), **paired(best, worst)})
        cd = next((r for r in at if r["method"] == "consensusdrop" and not r["options"]), None)
        for m, opt in REFERENCES:
            ref = next((r for r in at if r["method"] == m and r["options"] == opt), None)
            if cd is not None and ref is not None:
                out.append({"budget": b, "what": "consensusdrop - reference", "a": "consensusdrop",
                            "b": E.label(m, opt), **paired(cd, ref)})
    return out


def run_sweep(rt, budgets=BUDGETS, seeds=REPORT_SEEDS, n: int = N_PER_SEED, out_dir=RESULTS_DIR,
              only: Sequence[str] | None = None, resume: bool = False, verbose: bool = True, workers: int = 0) -> dict:
    """Every config of :func:`testbed.evaluate.sweep_configs` (v2's budgets, no 576-scale table) on every seed.
    Each finished config is written to ``OUT/testbed2.jsonl`` at once; ``resume`` skips the configs already
    there (refused if they were measured with other seeds / n / budgets / model); ``only`` runs just those
    methods, and without ``resume`` re-measures them in an existing folder (the other rows kept). The table,
    plot and JSON are rebuilt from the JSONL at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = E.sweep_configs(budgets, budgets_576={}, overrides=overrides(budgets))
    meta = {"model": rt.name, "weights": getattr(rt, "path", None), "seeds": list(seeds), "n_per_seed": n,
            "budgets": list(budgets)}
    rows_path = out / "testbed2.jsonl"
    done: dict[str, dict] = {}
    if rows_path.exists():
        if not (resume or only):
            raise FileExistsError(f"{rows_path} exists: pass --resume to continue it (or --only to re-measure methods), "
                                  "or another --out")
        lines = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
        head, body = lines[0], lines[1:]
        if {k: head.get(k) for k in meta} != meta:
            raise ValueError(f"{rows_path} was measured with {{{', '.join(f'{k}={head.get(k)}' for k in meta)}}}, "
                             f"not {meta}: use another --out")
        done = {config_key(r["method"], r["budget"], r["options"]): r for r in body
                if resume or not (only and r["method"] in only)}  # --only without --resume: re-measure them
    else:
        head = {**meta, "kind": "header"}
    batches = {s: prompt_batches(rt, questions(n, s), workers) for s in seeds}
    t0 = time.perf_counter()
    errors = []
    for method, budget, opt in cfgs:
        key = config_key(method, budget, opt)
        if key in done or (only and method not in only):
            continue
        try:
            r = evaluate(rt, method, budget, opt, batches)
        except Exception as e:  # a method that cannot run at this budget is reported, not fatal
            r = {"method": method, "budget": budget, "options": opt, "error": f"{type(e).__name__}: {e}"}
            errors.append(r)
        done[key] = r
        if verbose:
            a = r.get("accuracy")
            print(f"  {E.label(method, opt):34} {str(budget):>5}  " + (
                f"overall {a['overall']:5.1f} +- {r['seed_sd']['overall']:.1f} (seeds)  tokens "
                f"{r['tokens']['visual_entering_llm']:6.1f}/{r['tokens']['visual_layer_avg']:6.1f}  {r['tokens']['time_s']:.0f}s"
                if a else f"ERROR {r['error']}"), flush=True)
        _write_rows(rows_path, head, done, cfgs)
    _write_rows(rows_path, head, done, cfgs)
    return assemble(out, time.perf_counter() - t0)


def _write_rows(path: Path, head: dict, done: dict, cfgs) -> None:
    order = {config_key(m, b, o): i for i, (m, b, o) in enumerate(cfgs)}
    body = sorted(done.values(), key=lambda r: order.get(config_key(r["method"], r["budget"], r["options"]), len(order)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(x) for x in [head, *body]) + "\n")
    os.replace(tmp, path)


def assemble(out: Path, wall_s: float = 0.0) -> dict:
    """testbed2.json / .md / .png from testbed2.jsonl (what a resumed or partial sweep holds)."""
    lines = [json.loads(x) for x in (out / "testbed2.jsonl").read_text().splitlines() if x.strip()]
    head, body = lines[0], lines[1:]
    rows = [r for r in body if "error" not in r]
    meta = {k: v for k, v in head.items() if k != "kind"}
    meta.update({"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
                 "torch": torch.__version__, "wall_s_last_call": round(wall_s, 1),
                 "command": "python -m testbed.evaluate2 sweep"})
    res = {"meta": meta, "results": [{k: v for k, v in r.items() if k != "correct"} for r in rows],
           "comparisons": comparisons(rows, meta["budgets"]),
           "errors": [r for r in body if "error" in r]}
    (out / "testbed2.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "testbed2.md").write_text(markdown(res))
    E.plot({"meta": meta, "results": res["results"]}, out / "testbed2.png", tokens=D.N_TOKENS,
           title="Testbed v2 (cluttered scenes, 576 tokens, trained small LLaVA): accuracy vs budget")
    return res


COLS = [("overall", "overall"), *((t, t.replace("_", " ")) for t in D.QTYPES),
        *((f"salience:{s}", f"{s} obj" if s != "absent" else "absent") for s in D.SALIENCE)]


def markdown(res: dict) -> str:
    m = res["meta"]
    n_total = m["n_per_seed"] * len(m["seeds"])
    lines = [
        "# Testbed v2 (cluttered scenes, 576 visual tokens): accuracy vs visual-token budget", "",
        f"Generated by `{m['command']}` on {m['date']} ({m['device']}, torch {m['torch']}). Model: `{m['model']}` "
        f"({m.get('weights') or 'testbed/weights2'}; [../testbed.md](../testbed.md)). {n_total} test questions: seeds "
        f"{', '.join(map(str, m['seeds']))} x {m['n_per_seed']} (types balanced), greedy, exact match (%): the mean over "
        "seeds, `sd` its sample sd over seeds. Budget: visual tokens of LLaVA-1.5's 576 in the method's own "
        "convention; `in LLM` / `avg` = measured visual tokens entering the LLM / averaged over its layers.", "",
        "| method | budget | " + " | ".join(c for _, c in COLS) + " | sd | in LLM | avg |",
        "|---|---:|" + "---:|" * (len(COLS) + 3),
    ]
    for r in res["results"]:
        a = r["accuracy"]
        cells = [f"{a[k]:.1f}" if k in a else "-" for k, _ in COLS]
        name = {"none": "unpruned (576 tokens)", "novisual": "no visual tokens"}.get(r["method"],
                                                                                     E.label(r["method"], r["options"]))
        lines.append(f"| {name} | {'-' if r['budget'] is None else r['budget']} | " + " | ".join(cells)
                     + f" | {r['seed_sd']['overall']:.1f} | {r['tokens']['visual_entering_llm']:.1f} | "
                       f"{r['tokens']['visual_layer_avg']:.1f} |")
    if res["comparisons"]:
        lines += ["", "Paired differences (points; the same questions under both configs; SE = sd(d) / sqrt(n)):", "",
                  "| budget | comparison | a | b | a - b | SE | n |", "|---:|---|---|---|---:|---:|---:|"]
        lines += [f"| {c['budget']} | {c['what']} | {c['a']} | {c['b']} | {c['diff']:+.2f} | {c['se']:.2f} | {c['n']} |"
                  for c in res["comparisons"]]
    if res.get("errors"):
        lines += ["", "Not run (the method refused the setting):", ""]
        lines += [f"- {E.label(e['method'], e['options'])} at {e['budget']}: {e['error']}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.evaluate2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one method at one budget, on every seed")
    r.add_argument("--method", default="none")
    r.add_argument("--budget", default=None)
    r.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    s = sub.add_parser("sweep", help="every method x budget -> OUT/testbed2.{jsonl,json,md,png}")
    s.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    s.add_argument("--out", default=str(RESULTS_DIR))
    s.add_argument("--only", nargs="+", default=None, metavar="METHOD")
    s.add_argument("--resume", action="store_true", help="continue OUT/testbed2.jsonl (skip finished configs)")
    for p in (r, s):
        p.add_argument("--weights", default=None, help="checkpoint directory (default: testbed/weights2)")
        p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
        p.add_argument("--n-per-seed", type=int, default=N_PER_SEED)
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--workers", type=int, default=0, help="processes rendering the questions' images")
    args = ap.parse_args(argv)
    from llava.cli import parse_options

    rt = load_runtime(args.weights, args.device, args.threads)
    rt.path = str(args.weights or "testbed/weights2")
    if args.cmd == "run":
        budget = None if args.budget in (None, "none") else int(args.budget)
        batches = {sd: prompt_batches(rt, questions(args.n_per_seed, sd), args.workers) for sd in args.seeds}
        res = evaluate(rt, args.method, budget, parse_options(args.opt), batches)
        print(json.dumps({k: v for k, v in res.items() if k != "correct"}, indent=1))
        return 0
    res = run_sweep(rt, args.budgets, args.seeds, args.n_per_seed, args.out, only=args.only, resume=args.resume,
                    workers=args.workers)
    print(f"wrote {args.out}/testbed2.md, .json, .jsonl, .png ({len(res['results'])} rows, {len(res['errors'])} refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m eval compare``: is one run better than another on the same questions?

    python -m eval compare RUN_A RUN_B [RUN ...] [--reference RUN] [--control RUN|auto] [--metric M|all]
                           [--format md|latex|json] [--resamples 1000] [--seed 0] [--out FILE]

Every run must be on the same benchmark and the same questions (their fingerprints: the question list the run
loaded, and the units it scored); otherwise one ``error:`` line names the difference and the exit status is 2,
never a comparison over a partial overlap. Per pair (each run against the reference: by default the unpruned run
where one is given, else the first) and per metric: both scores, the difference with a 95 % paired bootstrap
interval over the benchmark's unit, McNemar's exact test for accuracy-type metrics (the discordant counts and p)
and n. With ``--control`` (a run, or ``auto``: the ``downsample`` run among those given at the reference's
budget) each run's score on the questions the control gets wrong (group A, VTC-Bench's "difficult") and on the
rest (group B), each with its n and standard error. What each statistic assumes: :mod:`eval.stats`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import stats as st
from .pairing import CompareError, Run, benchmark_of, check_same_questions, find_runs, load_run, results_path, stat_for
from .table import display_name, short_model


def set_labels(runs: list[Run]) -> None:
    """Each run's label: the method as its paper prints it, the options that differ between the runs of that
    method (as ``eval table`` labels its rows), and the budget."""
    by_method: dict = {}
    for r in runs:
        by_method.setdefault(r.method.get("method"), []).append(r)
    for rs in by_method.values():
        keys = sorted({k for r in rs for k in r.options
                       if len({json.dumps(x.options.get(k), sort_keys=True, default=str) for x in rs}) > 1})
        for r in rs:
            name = display_name(r.method.get("method"))
            if keys:
                name += " (" + ", ".join(f"{k}={r.options.get(k)}" for k in keys) + ")"
            r.label = name + ("" if r.method.get("budget") is None else f" @{r.method.get('budget')}")


def pick_control(runs: list[Run], control: str | None, reference: Run) -> Run | None:
    """The control run: named (a path), or ``auto``: the ``downsample`` run of the reference's model at its budget."""
    if control is None:
        return None
    if control != "auto":
        path = results_path(Path(control)).parent.resolve()
        for r in runs:
            if r.path.resolve() == path:
                return r
        return load_run(path)
    model = (reference.results.get("model") or {}).get("id")
    budget = reference.method.get("budget")
    cands = [r for r in runs if r.method.get("method") == "downsample" and r.method.get("budget") == budget
             and (r.results.get("model") or {}).get("id") == model]
    if not cands:
        raise CompareError(f"--control auto: no downsample run of {short_model(model)} at budget {budget} among the "
                           "runs given; add one, or name the control run with --control RUN")
    return cands[0]


def compare(paths, reference: str | None = None, control: str | None = None, metrics: list[str] | None = None,
            resamples: int = st.RESAMPLES, seed: int = st.SEED) -> dict:
    """The comparison as a JSON-able dict (runs, pairs, groups)."""
    runs = find_runs(paths)
    if reference is not None:
        ref_path = results_path(Path(reference)).parent.resolve()
        ref = next((r for r in runs if r.path.resolve() == ref_path), None)
        if ref is None:
            ref = load_run(ref_path)
            runs.insert(0, ref)
    else:
        ref = next((r for r in runs if r.method.get("method") == "none"), runs[0] if runs else None)
    if len(runs) < 2:
        raise CompareError("compare needs two or more runs")
    ctrl = pick_control(runs, control, ref)
    set_labels(runs + ([ctrl] if ctrl is not None and ctrl not in runs else []))
    check_same_questions(runs + ([ctrl] if ctrl is not None and ctrl not in runs else []))
    bench_name = ref.results["benchmark"]
    bench = benchmark_of(ref)
    if not metrics:
        metrics = [ref.results.get("primary_metric")]
    elif metrics == ["all"]:
        metrics = [m for m in ref.results.get("metrics", {}) if m in bench.stats]
    stats = {m: stat_for(ref, m, bench) for m in metrics}
    out = {"benchmark": bench_name, "unit": ref.units.unit, "units": len(ref.units), "reference": ref.label,
           "reference_path": str(ref.path), "bootstrap": {"resamples": resamples, "seed": seed, "level": st.LEVEL},
           "metrics": metrics, "runs": [], "pairs": []}
    for r in runs:
        row = {"label": r.label, "path": str(r.path), "tok_in": (r.results.get("tokens") or {}).get("tok_in"),
               "tok_eq": (r.results.get("tokens") or {}).get("tok_eq"), "scores": {}}
        for m, stat in stats.items():
            row["scores"][m] = st.estimate(r.units, stat, resamples, seed).as_dict()
        out["runs"].append(row)
    for r in runs:
        if r is ref:
            continue
        pair = {"a": ref.label, "b": r.label, "b_path": str(r.path), "metrics": {}}
        for m, stat in stats.items():
            pair["metrics"][m] = st.paired(ref.units, r.units, stat, resamples, seed).as_dict()
        out["pairs"].append(pair)
    if ctrl is not None:
        a_ids, b_ids = st.difficult_groups(ctrl.units)
        key, full = ctrl.units.difficulty
        out["control"] = {"label": ctrl.label, "path": str(ctrl.path), "group_a": len(a_ids), "group_b": len(b_ids),
                          "rule": f"group A: the {ctrl.units.unit}s where the control's {key} is below {full:g}"}
        for row, r in zip(out["runs"], runs):
            row["groups"] = {m: {g: e.as_dict() for g, e in st.on_groups(r.units, ctrl.units, stat, resamples, seed).items()}
                             for m, stat in stats.items()}
    return out


# -- rendering ---------------------------------------------------------------------------------------------------


def _f(v, d=2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _p(p) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def render(res: dict, fmt: str = "md", decimals: int = 2) -> str:
    if fmt == "json":
        return json.dumps(res, indent=1, default=str)
    d = decimals
    pm = " $\\pm$ " if fmt == "latex" else " ± "
    lines_out = []
    for m in res["metrics"]:
        head = ["Run", m, "n", "tok-in", "tok-eq", "Δ vs reference", "95% CI", "McNemar b / c", "p"]
        if "control" in res:
            head += ["group A", "group B"]
        rows = []
        pairs = {p["b_path"]: p["metrics"][m] for p in res["pairs"]}
        for r in res["runs"]:
            s = r["scores"][m]
            cells = [r["label"], _f(s["value"], d) + ("" if s["se"] is None else pm + _f(s["se"], d)), str(s["n"]),
                     _f(r["tok_in"], 1), _f(r["tok_eq"], 1)]
            pr = pairs.get(r["path"])
            if pr is None:
                cells += ["(reference)", "", "", ""]
            else:
                lo, hi = pr["ci95"]
                sig = lo is not None and (lo > 0 or hi < 0)
                cells += [f"{pr['diff']:+.{d}f}" + ("*" if sig else ""), f"[{_f(lo, d)}, {_f(hi, d)}]"]
                mc = pr.get("mcnemar")
                cells += [f"{mc['a_only']} / {mc['b_only']}", _p(mc["p"])] if mc else ["–", "–"]
            if "control" in res:
                g = r["groups"][m]
                for k in ("A", "B"):
                    cells.append(_f(g[k]["value"], d) + ("" if g[k]["se"] is None else pm + _f(g[k]["se"], d))
                                 + f" (n={g[k]['n']})")
            rows.append(cells)
        if fmt == "md":
            lines_out.append("| " + " | ".join(head) + " |")
            lines_out.append("|" + "---|" * len(head))
            lines_out += ["| " + " | ".join(c) + " |" for c in rows]
        else:
            esc = lambda s: s.replace("%", "\\%").replace("_", "\\_").replace("&", "\\&").replace("#", "\\#")  # noqa: E731
            lines_out.append("\\begin{tabular}{l" + "c" * (len(head) - 1) + "}")
            lines_out.append("\\toprule")
            lines_out.append(" & ".join(esc(h).replace("Δ", "$\\Delta$") for h in head) + " \\\\")
            lines_out.append("\\midrule")
            lines_out += [" & ".join([esc(c[0])] + [x.replace("–", "--").replace("<", "$<$") for x in c[1:]]) + " \\\\"
                          for c in rows]
            lines_out.append("\\bottomrule")
            lines_out.append("\\end{tabular}")
        lines_out.append("")
    b = res["bootstrap"]
    notes = [f"Benchmark {res['benchmark']}: {res['units']} {res['unit']}s, the same in every run (checked by their "
             "fingerprints). ± = standard error (accuracy-type metrics: sqrt(p (1 - p) / (n - 1)); the others: "
             f"bootstrap over the {res['unit']}s, {b['resamples']} resamples, seed {b['seed']}).",
             f"Δ = run minus {res['reference']}; 95% CI: paired percentile bootstrap over the same {res['unit']}s "
             f"({b['resamples']} resamples, seed {b['seed']}); * = the interval excludes 0. McNemar: the exact "
             f"two-sided test on the discordant {res['unit']}s (b = right only in the reference, c = right only in "
             "the run); – where the metric is not one 0/1 score per unit."]
    if "control" in res:
        c = res["control"]
        notes.append(f"Groups (VTC-Bench's protocol), defined by the control run {c['label']} ({c['path']}): "
                     f"{c['rule']}: A = {c['group_a']} (difficult), B = {c['group_b']}; each run's score on each group "
                     "alone, ± its standard error.")
    prefix = "% " if fmt == "latex" else ""
    return "\n".join(lines_out + [prefix + n for n in notes]) + "\n"


def main(args) -> int:
    import sys

    try:
        metrics = None if not args.metric else (["all"] if args.metric == ["all"] else args.metric)
        res = compare(args.runs, reference=args.reference, control=args.control, metrics=metrics,
                      resamples=args.resamples, seed=args.seed)
    except (CompareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(res, args.format, args.decimals)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="paired comparison of runs on the same questions: differences with bootstrap "
                       "intervals, McNemar's test, groups A / B of a control run")
    p.add_argument("runs", nargs="+", help="run folders, results.json files, or folders searched for them")
    p.add_argument("--reference", default=None, help="the run every other is compared against (default: the unpruned "
                   "run among them, else the first)")
    p.add_argument("--control", default=None, help="a run whose wrong answers define the difficult questions (group A; "
                   "VTC-Bench), or 'auto': the downsample run at the reference's budget among those given")
    p.add_argument("--metric", action="append", default=[], help="a metric to compare (repeatable; 'all': every "
                   "metric with per-unit scores; default: the benchmark's primary metric)")
    p.add_argument("--format", default="md", choices=["md", "latex", "json"])
    p.add_argument("--decimals", type=int, default=2)
    p.add_argument("--resamples", type=int, default=st.RESAMPLES, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=st.SEED, help="bootstrap seed")
    p.add_argument("--out", default=None, help="write here instead of stdout")

"""ConsensusDrop against every other method and both controls on the trained testbed, with paired tests.

    python -m testbed.compare run   [--out runs/compare] [--n 1200] [--budgets 16 8]   # the grid (resumable)
    python -m testbed.compare report [--out runs/compare] [--budgets 16 8] [--md FILE]  # eval compare per budget

The grid runs through the evaluation harness (``eval run-many``: one process, the model loaded once): the
unpruned model, then at each budget ConsensusDrop, its two single-signal ablations, every other registered
method and the two controls (``random``, ``downsample``), each on the same ``n`` Shapes questions (seed 0).
The report is ``eval compare`` with ConsensusDrop as the reference and ``downsample`` at the same budget as the
control that defines the difficult questions (VTC-Bench's groups A and B).

Budgets follow the testbed sweep's conventions (``testbed.evaluate``): a budget is the method's own, so
the methods whose papers state budgets for LLaVA-1.5's 576 tokens get it scaled by 576 / 64 = 9; where a
method cannot reach a budget on the 8 x 8 grid of this model the nearest setting it reaches is used and named
in :data:`SETTINGS` (every row also shows the visual tokens it measured, tok-in and tok-eq).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "testbed/weights"
REFERENCE = "consensusdrop"
#: the single-signal ablations of ConsensusDrop (docs/methods/consensusdrop.md)
ABLATIONS = ({"fusion": "encoder_only"}, {"fusion": "cross_only"})
#: budgets stated for LLaVA-1.5's 576 visual tokens (testbed.evaluate.BUDGETS_576): x 9 here
SCALE_576 = ("pdrop", "sparsevlm", "trio", "clse", "transprune")
#: per (method, budget): the setting used where the budget itself is not reachable on this model
#: (downsample: 8 pooled tokens as 2 x 4 windows on the 8 x 8 grid; V2Drop: its layer average cannot go below
#: 11.5 of 64, so 12; IVC-Prune prunes once before layer 3 of 6 and its budget is the layer average: 40 / 36
#: keep 16 / 8 tokens after it; TransPrune's schedule reaches 126..252 of 576, so its lowest, 126, at 8; PyramidDrop's
#: first stage comes before layer 2 of 6, so its layer average cannot go below 1 / 3: 192 of 576 at both; SparseVLM
#: runs its official v1 schedules only (64, 96, 128, 192 of 576): 128 and 64)
SETTINGS = {("downsample", 8): (None, {"stride": [2, 4]}), ("v2drop", 8): (12, {}),
            ("pdrop", 16): (192, {}), ("pdrop", 8): (192, {}), ("sparsevlm", 16): (128, {}), ("sparsevlm", 8): (64, {}),
            ("ivcprune", 16): (40, {}), ("ivcprune", 8): (36, {}), ("transprune", 8): (126, {})}
#: PruMerge's own mode chooses its count (IQR outliers): at a budget it runs its fixed-count mode
OPTIONS = {"prumerge": {"budget_mode": "fixed"}}


def methods() -> list[str]:
    """Every registered method that runs on the testbed's model (LLaVA's architecture; PixelPrune does not)."""
    from llava import available_methods
    from llava.method import method_supports

    return [m for m in available_methods() if not m.startswith("test_") and m not in ("none", "novisual")
            and method_supports(m, "llava")]


def configs(budgets=(16, 8)) -> list[tuple[str, int | None, dict]]:
    """(method, budget, options): the unpruned model, then per budget ConsensusDrop, its ablations and the rest."""
    out: list[tuple[str, int | None, dict]] = [("none", None, {})]
    for b in budgets:
        out.append((REFERENCE, b, {}))
        out.extend((REFERENCE, b, dict(o)) for o in ABLATIONS)
        for m in methods():
            if m == REFERENCE:
                continue
            budget, opts = b * 9 if m in SCALE_576 else b, dict(OPTIONS.get(m, {}))
            if (m, b) in SETTINGS:
                budget, extra = SETTINGS[(m, b)]
                opts.update(extra)
            out.append((m, budget, opts))
    return out


def run_dir_name(method: str, budget, options: dict, nominal: int | None) -> str:
    opt = "".join(f"_{k}-{'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(options.items()))
    b = "none" if budget is None else budget
    return f"{method}_b{b}{opt}" if nominal is None else f"at{nominal}/{method}_b{b}{opt}"


def lines(out: str, n: int, budgets=(16, 8)) -> list[str]:
    """``eval run-many``'s input: one config a line (label, then the arguments of ``python -m eval``)."""
    rows = []
    seen = set()
    grid = [(c, None) for c in configs(budgets)[:1]] + [(c, b) for b in budgets for c in configs((b,))[1:]]
    for (m, budget, opts), nominal in grid:
        name = run_dir_name(m, budget, opts, nominal)
        if name in seen:
            continue
        seen.add(name)
        args = ["run", "shapes", "--model", MODEL, "--method", m, "--budget", "none" if budget is None else str(budget),
                "--bench-opt", f"n={n}", "--out", out, "--run-name", name, "--batch-size", "50", "--no-wandb",
                "--launcher", "python"]
        for k, v in opts.items():
            args += ["--opt", f"{k}={v if not isinstance(v, list) else '[' + ','.join(map(str, v)) + ']'}"]
        rows.append(shlex.quote(f"{name}") + " " + " ".join(shlex.quote(a) for a in args))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the grid through `eval run-many` (resumable: a finished run is kept)")
    r.add_argument("--out", default="runs/compare")
    r.add_argument("--n", type=int, default=1200, help="Shapes questions (seed 0); the default test set is 400")
    r.add_argument("--budgets", type=int, nargs="+", default=[16, 8])
    r.add_argument("--print", action="store_true", help="print the run-many lines instead of running them")
    s = sub.add_parser("report", help="eval compare per budget: ConsensusDrop against every run, downsample the control")
    s.add_argument("--out", default="runs/compare")
    s.add_argument("--budgets", type=int, nargs="+", default=[16, 8])
    s.add_argument("--format", default="md", choices=["md", "latex", "json"])
    a = p.parse_args(argv)
    if a.cmd == "run":
        text = "\n".join(lines(a.out, a.n, a.budgets)) + "\n"
        if a.print:
            sys.stdout.write(text)
            return 0
        return subprocess.run([sys.executable, "-m", "eval", "run-many", "--name", "testbed-compare"], input=text,
                              text=True, cwd=REPO).returncode
    rc = 0
    for b in a.budgets:
        folder = Path(a.out) / "shapes"
        runs = [str(folder / n_) for n_ in ["none_bnone"]] + sorted(str(d) for d in (folder / f"at{b}").iterdir())
        ref = next(r_ for r_ in runs if Path(r_).name == f"{REFERENCE}_b{b}")
        control = next(r_ for r_ in runs if Path(r_).name.startswith("downsample_"))
        cmd = [sys.executable, "-m", "eval", "compare", *runs, "--reference", ref, "--control", control,
               "--format", a.format]
        print(f"## {b} of 64 visual tokens\n", flush=True)
        rc = max(rc, subprocess.run(cmd, cwd=REPO).returncode)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluate pruning methods on the trained testbed (synthetic shapes QA), standalone.

    python -m testbed.evaluate run --method consensusdrop --budget 8            # one method, one budget
    python -m testbed.evaluate run --method consensusdrop --budget 8 --opt fusion=cross_only
    python -m testbed.evaluate sweep                                             # docs/results/testbed.{md,json,png}

Protocol: the shipped checkpoint (``testbed/weights``) loaded with ``llava.models.load`` (fp32, CPU,
SDPA); the fixed test set (:func:`testbed.data.test_set`, 400 questions at seed 0, 100 per type);
LLaVA's ``vicuna_v1`` prompt with the benchmark suffix "Answer the question using a single word or
phrase."; greedy ``generate`` (``max_new_tokens`` 3) at batch size 50 with the method attached by
``rt.prune(method, budget)``; exact match of the lower-cased output, stripped of a trailing period,
against the one-word answer.

Budgets are each method's own (its paper's) convention: tokens per image entering the LLM for the
pre-LLM methods (random, VisionZip, FasterVLM, DivPrune, ConsensusDrop), the total for AttnMix (AdaV),
the average over the LLM's layers for FastV and VisionDrop, the tokens kept after the pruning layer
for DART, and budgets stated for LLaVA-1.5's 576 tokens for PyramidDrop, SparseVLM, TRIO and CLSE (see
``BUDGETS_576``). On one single-crop image (64 candidate tokens here, 576 on LLaVA-1.5) per-image
and total coincide; every result also records the visual tokens that actually entered the LLM and
their average over the LLM's layers (the plot's x axis).

The functions are the interface an eval-harness adapter uses: :func:`questions`, :func:`build_batch`,
:func:`normalize` / :func:`is_correct`, :func:`summarize`, :func:`predict`, :func:`evaluate`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import data as D

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "docs" / "results"
DEFAULT_N = 400
DEFAULT_BUDGETS = (4, 8, 16, 32)
BATCH_SIZE = 50
MAX_NEW_TOKENS = 3

# -- the benchmark ---------------------------------------------------------------------------------


def questions(n: int = DEFAULT_N, seed: int = 0) -> list[D.Question]:
    """The fixed test questions (types cycle attribute / existence / counting / spatial)."""
    return D.test_set(n, seed)


def load_runtime(path: str | os.PathLike | None = None, threads: int | None = 2):
    """The testbed checkpoint through the same loader as real checkpoints (fp32, CPU)."""
    if threads:
        torch.set_num_threads(threads)
    from .model import load

    return load(path)


def build_batch(rt, qs: Sequence[D.Question]) -> dict:
    """LLaVA's prompt (runtime template) + the image for each question, left-padded (host tensors)."""
    return rt.processor([q.prompt for q in qs], [q.image() for q in qs])


def _on_model(rt, batch: dict) -> dict:
    device = next(rt.model.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def normalize(text: str) -> str:
    t = text.strip().lower()
    while t.endswith("."):
        t = t[:-1].rstrip()
    return t


def is_correct(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def summarize(qs: Sequence[D.Question], predictions: Sequence[str], qtypes: Sequence[str] = D.QTYPES,
              salience: Sequence[str] = D.SALIENCE) -> dict:
    """Accuracy (%) overall, per question type, per salience (small / large / absent), and per
    type x salience, with the question counts (``qtypes`` / ``salience``: the order of the keys; v2
    passes its own)."""
    groups: dict[str, list[int]] = {}
    for q, p in zip(qs, predictions, strict=True):
        ok = int(is_correct(p, q.answer))
        for key in ("overall", q.qtype, f"salience:{q.salience}", f"{q.qtype}:{q.salience}"):
            groups.setdefault(key, []).append(ok)
    acc = {k: round(100.0 * sum(v) / len(v), 2) for k, v in groups.items()}
    count = {k: len(v) for k, v in groups.items()}
    order = ["overall", *qtypes, *(f"salience:{s}" for s in salience)]
    out = {k: acc[k] for k in order if k in acc}
    out.update({k: acc[k] for k in sorted(acc) if k not in out})
    return {"accuracy": out, "n": {k: count[k] for k in out}}


# -- running ----------------------------------------------------------------------------------------


class _Batches:
    """Prompt batches built once and reused across methods (they do not depend on the method)."""

    def __init__(self, rt, qs, batch_size=BATCH_SIZE):
        self.qs = list(qs)
        self.batches = [(self.qs[s:s + batch_size], build_batch(rt, self.qs[s:s + batch_size]))
                        for s in range(0, len(self.qs), batch_size)]


def predict(rt, qs: Sequence[D.Question] | _Batches, method: str = "none", budget: int | None = None,
            options: dict | None = None, batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS):
    """Greedy answers of the model with ``method`` at ``budget`` attached. Returns (answers, token
    stats: mean visual tokens entering the LLM and mean over the LLM's layers, seconds)."""
    batches = qs if isinstance(qs, _Batches) else _Batches(rt, qs, batch_size)
    eng = rt.prune(method, budget, **(options or {}))
    answers, entering, layer_avg = [], [], []
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for qs_, batch in batches.batches:
                # per-sample keys = the harness's question uids, so seeded methods (random) draw the same
                # tokens here as through `scripts/eval/shapes.sh`
                eng.sample_keys = [str(q.index) for q in qs_]
                n_in = batch["input_ids"].shape[1]
                out = rt.model.generate(**_on_model(rt, batch), max_new_tokens=max_new_tokens, do_sample=False,
                                        num_beams=1)
                answers.extend(rt.processor.decode(out[:, n_in:].cpu()))
                for s in eng.stats.samples:
                    entering.append(s.visual_entering_llm)
                    layer_avg.append(s.visual_layer_avg)
    finally:
        rt.unprune()
    stats = {"visual_entering_llm": round(sum(entering) / len(entering), 2),
             "visual_layer_avg": round(sum(layer_avg) / len(layer_avg), 2),
             "time_s": round(time.perf_counter() - t0, 2)}
    return answers, stats


def evaluate(rt, method: str = "none", budget: int | None = None, options: dict | None = None,
             qs: Sequence[D.Question] | _Batches | None = None, n: int = DEFAULT_N, seed: int = 0,
             keep_predictions: bool = False) -> dict:
    """One method at one budget on the test set: a JSON-ready result."""
    if qs is None:
        qs = questions(n, seed)
    plain = qs.qs if isinstance(qs, _Batches) else list(qs)
    answers, stats = predict(rt, qs, method, budget, options)
    res = {"benchmark": "testbed-shapes", "model": rt.name, "method": method, "budget": budget,
           "options": options or {}, **summarize(plain, answers), "tokens": stats, "n_questions": len(plain)}
    if keep_predictions:
        res["predictions"] = [{**q.as_dict(), "prediction": a, "correct": is_correct(a, q.answer)}
                              for q, a in zip(plain, answers)]
    return res


# -- the sweep --------------------------------------------------------------------------------------

SEED_METHODS = ("consensusdrop", "visiondrop", "attnmix")
#: PyramidDrop and SparseVLM state their budgets for LLaVA-1.5's 576 visual tokens (kept counts scale
#: with the sample's N, 64 here); they run at these 576-scale budgets (SparseVLM: its four official
#: schedules). With the testbed's 6-layer LLM their first stage comes after layer 1 or 2, so their
#: layer averages cannot go below ~11 (PDrop geometric: ~21) of 64 tokens; the results record the
#: measured averages and the plot uses them as x.
BUDGETS_576 = {"pdrop": (64, 128, 192, 288), "sparsevlm": (64, 96, 128, 192),
               "trio": (128, 192, 288, 400),  # TRIO at 64/576 keeps no token after layer 1 of the 6 here
               "clse": (64, 128, 192, 288),  # the official RETAIN_TOKEN (192 / 128 / 64 its schedules)
               # TransPrune: PyramidDrop's table at 64 / 128 / 192, the official ratio shape scaled at 236 (the
               # official lists' E); the shape reaches only 126..252 of 576, so none lower
               "transprune": (64, 128, 192, 236)}
#: methods that cannot reach the default budgets: downsample's equal windows on the 8x8 grid reach 64 / 16 / 9 / 4 / 1
#: V2Drop keeps at least one token from its first stage on (layer 1 of the 6 here): its layer average cannot go below
#: (64 + 5) / 6 = 11.5 of 64 tokens
#: IVC-Prune prunes once before layer 16 of 32 (3 of the 6 here): a layer average below 32 of 64 keeps nothing after it
#: (k = 2B - 64); 36 / 40 / 48 / 56 keep 8 / 16 / 32 / 48
BUDGETS_OVERRIDE = {"downsample": (1, 4, 9, 16), "v2drop": (12, 16, 24, 32), "ivcprune": (36, 40, 48, 56)}
#: methods whose official mode chooses its own count (PruMerge's IQR outliers): run once without a budget,
#: and at the budgets with these options
ADAPTIVE = {"prumerge": {"budget_mode": "fixed"}}
#: the default, its single-signal ablations, the earlier default (preset=probe: a 2-layer LLM probe) and
#: s_x from the LLM's own attention at layer 0 / 1 instead of the embedding similarity
CONSENSUS_VARIANTS = (("consensusdrop", {}), ("consensusdrop", {"fusion": "encoder_only"}),
                      ("consensusdrop", {"fusion": "cross_only"}), ("consensusdrop", {"preset": "probe"}),
                      ("consensusdrop", {"probe_layer": 0}), ("consensusdrop", {"probe_layer": 1}))


def sweep_configs(budgets: Sequence[int] = DEFAULT_BUDGETS, budgets_576: dict | None = None,
                  overrides: dict | None = None) -> list[tuple[str, int | None, dict]]:
    """(method, budget, options): the unpruned model, novisual, every seed method (ConsensusDrop
    with its variants) and every registered baseline (``test_*`` names skipped) at each budget
    (``budgets_576`` / ``overrides``: per-method budgets, v1's tables by default)."""
    budgets_576 = BUDGETS_576 if budgets_576 is None else budgets_576
    overrides = BUDGETS_OVERRIDE if overrides is None else overrides
    from llava import available_methods
    from llava.method import method_supports

    # the testbed's model is transformers' LLaVA: a method that does not run on it (PixelPrune: a pre-tower stage of the
    # Qwen towers) has no row
    names = [m for m in available_methods() if not m.startswith("test_") and m not in ("none", "novisual")
             and method_supports(m, "llava")]
    cfgs: list[tuple[str, int | None, dict]] = [("none", None, {}), ("novisual", None, {})]
    methods: list[tuple[str, dict]] = []
    for m in SEED_METHODS:
        if m in names:
            methods.extend(CONSENSUS_VARIANTS if m == "consensusdrop" else [(m, {})])
    methods.extend((m, {}) for m in names if m not in SEED_METHODS)
    for m, opt in methods:
        if m in ADAPTIVE:
            cfgs.append((m, None, dict(opt)))
            opt = {**opt, **ADAPTIVE[m]}
        for b in budgets_576.get(m, overrides.get(m, budgets)):
            cfgs.append((m, b, dict(opt)))
    return cfgs


def label(method: str, options: dict) -> str:
    from llava.method import method_label

    return method_label(method, options)


def run_sweep(rt, budgets=DEFAULT_BUDGETS, n: int = DEFAULT_N, seed: int = 0, out_dir: str | os.PathLike = RESULTS_DIR,
              verbose: bool = True, only: Sequence[str] | None = None, wandb: bool = False) -> dict:
    """Every config of :func:`sweep_configs`; with ``only`` (method names), re-measure just those methods'
    configs and keep every other row of the ``testbed.json`` already in ``out_dir`` (which must have been
    measured with the same n, seed and budgets: refused otherwise)."""
    cfgs = sweep_configs(budgets)
    kept_rows, kept_errors, prev_meta = [], [], None
    if only:
        prev_path = Path(out_dir) / "testbed.json"
        if not prev_path.exists():
            raise FileNotFoundError(f"--only needs the previous sweep's {prev_path}")
        prev = json.loads(prev_path.read_text())
        prev_meta = prev["meta"]
        if (prev_meta["n_questions"], prev_meta["seed"], list(prev_meta["budgets"])) != (n, seed, list(budgets)):
            raise ValueError(f"--only: {prev_path} was measured with n={prev_meta['n_questions']}, "
                             f"seed={prev_meta['seed']}, budgets={prev_meta['budgets']}; this run has n={n}, "
                             f"seed={seed}, budgets={list(budgets)}")
        unknown = set(only) - {m for m, _, _ in cfgs}
        if unknown:
            raise ValueError(f"--only: not in the sweep: {sorted(unknown)}")
        kept_rows = [r for r in prev["results"] if r["method"] not in only]
        kept_errors = [e for e in prev["errors"] if e["method"] not in only]
    qs = _Batches(rt, questions(n, seed))
    rows, errors = [], []
    t0 = time.perf_counter()
    for method, budget, opt in cfgs:
        if only and method not in only:
            continue
        try:
            r = evaluate(rt, method, budget, opt, qs=qs)
        except Exception as e:  # a method that cannot run at this budget is reported, not fatal
            errors.append({"method": method, "budget": budget, "options": opt, "error": f"{type(e).__name__}: {e}"})
            if verbose:
                print(f"  {label(method, opt):34} {str(budget):>5}  ERROR {type(e).__name__}: {e}", flush=True)
            continue
        rows.append(r)
        if verbose:
            a = r["accuracy"]
            print(f"  {label(method, opt):34} {str(budget):>5}  overall {a['overall']:5.1f}  small "
                  f"{a.get('salience:small', float('nan')):5.1f}  large {a.get('salience:large', float('nan')):5.1f}  "
                  f"tokens {r['tokens']['visual_entering_llm']:5.1f}/{r['tokens']['visual_layer_avg']:5.1f}  "
                  f"{r['tokens']['time_s']:.1f}s", flush=True)
    meta = {"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "model": rt.name,
            "n_questions": n, "seed": seed, "budgets": list(budgets), "wall_s": round(time.perf_counter() - t0, 1),
            "command": "python -m testbed.evaluate sweep"}
    if only:  # the rows kept from the previous sweep: its date and wall time, this run's for the re-measured ones
        meta["partial"] = {"methods": sorted(only), "date": meta["date"], "wall_s": meta["wall_s"]}
        meta.update(date=prev_meta["date"], wall_s=prev_meta["wall_s"])
        order = {(m, b, json.dumps(o, sort_keys=True)): i for i, (m, b, o) in enumerate(cfgs)}
        key = lambda r: order.get((r["method"], r["budget"], json.dumps(r["options"], sort_keys=True)), len(order))
        rows = sorted(kept_rows + rows, key=key)
        errors = kept_errors + errors
    res = {"meta": meta, "results": rows, "errors": errors}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "testbed.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "testbed.md").write_text(markdown(res))
    plot(res, out / "testbed.png")
    if wandb:  # one W&B run (job_type sweep): the table, accuracy-vs-tokens plots, the figure; never fails the sweep
        log_sweep(out)
    return res


def log_sweep(out: Path) -> bool:
    """The sweep in ``out`` logged to W&B by the harness's ``python -m eval log-sweep OUT``, in a subprocess (the
    testbed imports nothing from eval/: the harness may use the testbed, not the reverse). A failure is said on
    stderr, never raised: the sweep's files are written. True when the command succeeded."""
    cmd = [sys.executable, "-m", "eval", "log-sweep", str(Path(out).resolve())]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    except OSError as e:
        print(f"W&B sweep logging failed (the sweep is kept): {e}", file=sys.stderr)
        return False
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        print(f"W&B sweep logging failed (the sweep is kept): `{' '.join(cmd[1:])}` exited {done.returncode}"
              + (f": {tail[0]}" if tail else ""), file=sys.stderr)
        return False
    if done.stdout.strip():
        print(f"W&B sweep run: {done.stdout.strip().splitlines()[-1]}")  # the logger's info (mode, url, ...)
    return True


COLS = [("overall", "overall"), ("attribute", "attr"), ("existence", "exist"), ("counting", "count"),
        ("spatial", "spatial"), ("salience:small", "small obj"), ("salience:large", "large obj"),
        ("salience:absent", "absent")]


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        "# Testbed (synthetic shapes QA): accuracy vs visual-token budget",
        "",
        f"Generated by `{m['command']}` on {m['date']} ({m['machine']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads, {m['wall_s']:.0f} s). Model: the trained testbed checkpoint "
        "(`testbed/weights`, see [../testbed.md](../testbed.md)); "
        f"{m['n_questions']} test questions (seed {m['seed']}, 100 per type), greedy, exact match (%).",
        "",
        "Budget: the method's own convention - tokens per image entering the LLM (pre-LLM methods), total "
        "(AttnMix), the average over LLM layers (FastV, VisionDrop), tokens kept after the pruning layer (DART), "
        "or stated for LLaVA-1.5's 576 tokens (`b/576`: PyramidDrop, SparseVLM; counts scale to 64); PruMerge "
        "`-` = its own adaptive count (official), its fixed mode at the budgets; downsample at the counts its "
        "equal windows reach on the 8x8 grid (1 / 4 / 9 / 16). On one "
        "64-token image the first two are the same number of tokens. `in LLM` / `avg` = measured visual "
        "tokens entering the LLM / averaged over its 6 layers (multi-stage methods keep all 64 in their first "
        "layer(s), so their average cannot reach the smallest budgets); the plot's x is `avg`. Salience: `small obj` = the question is about a small "
        "(non-salient) object, `large obj` = only large ones, `absent` = the object asked about does not exist "
        "(existence negatives, a count of 0).",
        "",
        "| method | budget | " + " | ".join(c for _, c in COLS) + " | in LLM | avg |",
        "|---|---:|" + "---:|" * (len(COLS) + 2),
    ]
    for r in res["results"]:
        a = r["accuracy"]
        cells = [f"{a[k]:.1f}" if k in a else "-" for k, _ in COLS]
        b = "-" if r["budget"] is None else (f"{r['budget']}/576" if r["method"] in BUDGETS_576 else str(r["budget"]))
        name = {"none": "unpruned (64 tokens)", "novisual": "no visual tokens"}.get(r["method"], label(r["method"], r["options"]))
        lines.append(f"| {name} | {b} | " + " | ".join(cells)
                     + f" | {r['tokens']['visual_entering_llm']:.1f} | {r['tokens']['visual_layer_avg']:.1f} |")
    if res.get("errors"):
        lines += ["", "Not run (the method refused the setting):", ""]
        lines += [f"- {label(e['method'], e['options'])} at {e['budget']}: {e['error']}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str | os.PathLike, tokens: int = 64,
         title: str = "Testbed (synthetic shapes QA, trained tiny LLaVA): accuracy vs budget") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 5.4), sharey=True)
    series: dict[str, list[tuple[int, dict]]] = {}
    refs = {}
    for r in res["results"]:
        if r["budget"] is None and r["method"] in ("none", "novisual"):
            refs[r["method"]] = r["accuracy"]
        else:
            series.setdefault(label(r["method"], r["options"]), []).append((r["tokens"]["visual_layer_avg"], r["accuracy"]))
    cmap = plt.get_cmap("tab20")
    for ax, key, title in ((axes[0], "overall", "all questions"), (axes[1], "salience:small", "questions about small objects")):
        for i, (name, pts) in enumerate(series.items()):
            pts = sorted(pts)
            style = "-" if name.startswith(SEED_METHODS) else "--"
            ax.plot([b for b, _ in pts], [a.get(key, float("nan")) for _, a in pts], style, marker="o", ms=3.5,
                    color=cmap(i % 20), label=name)
        for m, st, lab in (("none", "k-", "unpruned"), ("novisual", "k:", "no visual tokens")):
            if m in refs and key in refs[m]:
                ax.axhline(refs[m][key], color="k", ls=st[1:], lw=1.2, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["meta"]["budgets"], [str(b) for b in res["meta"]["budgets"]])
        ax.set_xlabel(f"visual tokens, averaged over the LLM's layers (of {tokens})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[1].get_legend_handles_labels()  # beside the plots, so it hides no curve
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one method at one budget")
    r.add_argument("--method", default="none")
    r.add_argument("--budget", default=None, help="visual-token budget (the method's convention); 'none' for none")
    r.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    r.add_argument("--json", default=None, help="write the result (with per-question predictions) here")
    s = sub.add_parser("sweep", help="every method x budget -> docs/results/testbed.{md,json,png}")
    s.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS))
    s.add_argument("--out", default=str(RESULTS_DIR))
    s.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                   help="re-measure only these methods' configs; keep the other rows of OUT/testbed.json")
    s.add_argument("--wandb", action="store_true", help="also log the sweep to one W&B run (honours WANDB_MODE)")
    for p in (r, s):
        p.add_argument("--weights", default=None, help="checkpoint directory (default: testbed/weights)")
        p.add_argument("--n", type=int, default=DEFAULT_N, help="test questions")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from llava.cli import parse_options

    rt = load_runtime(args.weights, args.threads)
    if args.cmd == "run":
        budget = None if args.budget in (None, "none") else int(args.budget)
        res = evaluate(rt, args.method, budget, parse_options(args.opt), n=args.n, seed=args.seed,
                       keep_predictions=bool(args.json))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
            res = {k: v for k, v in res.items() if k != "predictions"}
        print(json.dumps(res, indent=1))
        return 0
    res = run_sweep(rt, args.budgets, args.n, args.seed, args.out, only=args.only, wandb=args.wandb)
    print(f"wrote {args.out}/testbed.md, testbed.json, testbed.png ({res['meta']['wall_s']:.0f} s, "
          f"{len(res['results'])} runs, {len(res['errors'])} refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

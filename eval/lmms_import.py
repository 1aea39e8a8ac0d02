"""A paper column run through lmms-eval (``lmms_task`` in its spec): where its run lives and how its scores come back.

``scripts/eval/lmms.sh <task> METHOD BUDGET MODEL [--opt k=v ...]`` (what ``scripts/papers/<paper>.sh`` calls for such
a column) asks :func:`run_dir` for the folder, runs ``python -m lmms_eval --model vtprune`` in the lmms-eval
environment (``scripts/lmms_eval_env.sh``) with ``--output_path <run dir>/lmms``, then :func:`import_results` reads
lmms-eval's newest ``*_results.json`` there and writes ``<run dir>/lmms_results.json``: the task's metrics (the
names without lmms-eval's ``,none`` filter suffix, the values as lmms-eval printed them) with the run's config, which
``python -m eval paper`` matches like a harness run (the spec's ``lmms_scale`` turns a fraction into the paper's
percentage). ``python -m eval lmms-import`` is the command line of both steps."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

from .papers import LMMS_PREFIX
from .run_config import RunConfig, default_run_name

SCHEMA = "vtprune.eval.lmms/1"
RESULTS = "lmms_results.json"


def run_config(task: str, model: str, method: str, budget: int | None, options: dict | None = None,
               out: str = "runs") -> RunConfig:
    return RunConfig(benchmark=LMMS_PREFIX + task, model=model, method=method, budget=budget,
                     options=dict(options or {}), out=str(out))


def run_dir(task: str, model: str, method: str, budget: int | None, options: dict | None = None,
            out: str = "runs") -> Path:
    """``OUT/lmms/<task>/<run-name>`` (the run name as the harness names its runs: model, method, budget, options)."""
    return Path(out) / "lmms" / task / default_run_name(run_config(task, model, method, budget, options, out))


def lmms_args(model: str, method: str, budget: int | None, options: dict | None = None) -> str:
    """The plugin's ``--model_args``: ``pretrained=...,method=...,budget=...,opts=k1:v1;k2:v2``."""
    args = [f"pretrained={model}", f"method={method}"]
    if budget is not None:
        args.append(f"budget={budget}")
    if options:
        args.append("opts=" + ";".join(f"{k}:{v}" for k, v in options.items()))
    return ",".join(args)


def newest_results(lmms_out: Path) -> Path:
    files = sorted(Path(lmms_out).rglob("*_results.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {lmms_out}")
    return files[-1]


def import_results(task: str, model: str, method: str, budget: int | None, options: dict | None = None,
                   out: str = "runs", lmms_out: str | None = None) -> Path:
    """Read lmms-eval's newest results under ``lmms_out`` (default ``<run dir>/lmms``) and write
    ``<run dir>/lmms_results.json``; returns its path. Raises with the file when the task or a number is absent."""
    rd = run_dir(task, model, method, budget, options, out)
    src = newest_results(Path(lmms_out) if lmms_out else rd / "lmms")
    data = json.loads(src.read_text())
    res = (data.get("results") or {}).get(task)
    if not isinstance(res, dict):
        raise ValueError(f"{src}: no results for task {task!r} (tasks: {', '.join(data.get('results') or {})})")
    metrics = {}
    for k, v in res.items():
        name, _, filt = k.partition(",")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not name.endswith("_stderr") \
                and filt in ("", "none"):
            metrics[name] = float(v)
    if not metrics:
        raise ValueError(f"{src}: task {task!r} has no numeric metric: {sorted(res)}")
    record = {
        "schema": SCHEMA, "benchmark": LMMS_PREFIX + task, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "config": {"benchmark": LMMS_PREFIX + task, "model": model, "method": method, "budget": budget,
                   "options": dict(options or {})},
        "model": {"id": model}, "method": {"method": method, "budget": budget, **dict(options or {})},
        "metrics": metrics,
        "lmms": {"results_file": str(src), "model_args": lmms_args(model, method, budget, options),
                 "version": (data.get("config") or {}).get("lmms_eval_version") or data.get("lmms_eval_version"),
                 "n_samples": (data.get("n-samples") or {}).get(task)},
    }
    rd.mkdir(parents=True, exist_ok=True)
    path = rd / RESULTS
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def load_imported(runs) -> list[dict]:
    """Every ``lmms_results.json`` under ``runs`` (files or folders), with ``_path``."""
    out = []
    for root in [runs] if isinstance(runs, (str, Path)) else runs:
        root = Path(root)
        files = [root] if root.is_file() and root.name == RESULTS else sorted(root.rglob(RESULTS)) if root.is_dir() else []
        for f in files:
            r = json.loads(f.read_text())
            if r.get("schema") == SCHEMA:
                out.append({**r, "_path": str(f)})
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("lmms-import", help="a paper column run through lmms-eval: its run folder, its scores back "
                       "(scripts/eval/lmms.sh)")
    p.add_argument("task")
    p.add_argument("method")
    p.add_argument("budget", help="tokens, or 'none'")
    p.add_argument("model")
    p.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    p.add_argument("--out", default="runs")
    p.add_argument("--lmms-output", default=None, help="lmms-eval's --output_path (default: <run dir>/lmms)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run-dir", action="store_true", help="print the run folder and exit")
    mode.add_argument("--model-args", action="store_true", help="print the plugin's --model_args and exit")


def main(args) -> int:
    from llava.cli import parse_options

    budget = None if args.budget in ("none", "None", "") else int(args.budget)
    opts = parse_options(args.opt)
    if args.run_dir:
        print(run_dir(args.task, args.model, args.method, budget, opts, args.out))
        return 0
    if args.model_args:
        print(lmms_args(args.model, args.method, budget, opts))
        return 0
    try:
        path = import_results(args.task, args.model, args.method, budget, opts, args.out, args.lmms_output)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0

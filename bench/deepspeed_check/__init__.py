"""DeepSpeed check: prove and measure DeepSpeed inference at tensor-parallel size 1 on a real device.

    bash scripts/bench/deepspeed_check.sh                 # = python -m bench.deepspeed_check (CUDA, all parts)
    python -m bench.deepspeed_check --device cpu --families llava --ttft-model tiny:llava --out /tmp/dsc

Three parts, each optional (``--no-equivalence``, ``--no-ttft``, ``--no-launcher-check``):

* **A. Equivalence**: every tiny family (``--families``) in every dtype (``--dtypes``; fp16 and bf16 on
  CUDA, fp32 on CPU) is loaded twice with the same seed; the second copy goes through
  ``llava.tp.deepspeed_inference`` (``deepspeed.init_inference``, tp_size 1, kernel injection off).
  Every registered method (and ``none``) is attached to both after it (``rt.prune``; ``random`` with
  seed 3), and greedy generation of ``--new-tokens`` tokens on bench.gpu_check's ``mixed`` batch of 3
  must give identical tokens (the wrapped model runs the same kernels, so equality is exact even in
  half precision); the first step's max |delta logit| is reported. A method a family does not support
  (``llava.method.method_supports``) is ``n/a``.
* **B. TTFT**: batch-1 prefill time (bench.gpu_check's ``ttft_task``, bench.efficiency's timers) of
  ``--ttft-model`` (default ``shape:llava-1.5-7b``, fp16: about 14 GB) per method at ``--ttft-budget``,
  first plain, then the same runtime wrapped with ``deepspeed_inference``; medians and their ratio. On
  CPU it runs only for a small model (``tiny:*`` or a ``*cpu-small`` shape).
* **C. Launcher**: ``bash scripts/eval/pope.sh fastv 8`` on the POPE fixture (eval.fixtures) with
  ``MODEL=tiny:llava NPROC=1``, once ``LAUNCHER=python`` and once ``LAUNCHER=deepspeed`` (the real
  ``deepspeed`` launcher): the merged answers must be equal and nonempty, the DeepSpeed run must record
  ``deepspeed`` in its run_config.json, and on CUDA both runs must have used the GPU (the runner takes
  ``cuda:<local_rank>``). Wall time of each run and the launcher's command lines are reported.

Writes ``deepspeed-check-<device>-<date>.{json,md}`` under ``--out`` (default docs/results); exit
status 1 when a check fails (a crash is recorded with its traceback tail and the run goes on). Without
a CUDA device and without ``--device cpu`` it says so and exits 0.

Results are never lost (a borrowed machine's wall-clock limit, e.g. ``timeout 170``): with
``--time-limit SECONDS`` (or env ``DEEPSPEED_CHECK_TIME_LIMIT``) no step (a model build / method pair of
A, a method of B, part C) is started once the elapsed time plus the longest step so far would pass the
limit less ``--time-reserve`` (default 5 s), and a step still running there is stopped (SIGALRM); on
SIGTERM / SIGINT the run stops at once. Either way the report is written from what finished, the rest
listed as ``not run (time limit)`` / ``not run (interrupted by SIGTERM)``, the overall verdict PARTIAL.
Exit status (as bench.gpu_check): 0 PASS, 1 FAIL (a failed check among what ran), 3 PARTIAL (steps not
run, no failure), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench import gpu_check as G

# By purpose; every name is re-exported here (``from bench import deepspeed_check as D; D.run``):
#   config: DSCheckConfig, the time limit (Budget), the families, the budgets
#   equivalence: part A (plain vs DeepSpeed-wrapped greedy tokens)
#   ttft: part B (batch-1 TTFT plain vs wrapped)
#   launcher: part C (scripts/eval/pope.sh with LAUNCHER=python and deepspeed)
#   report: the verdicts and the markdown
# This module: run (the parts in order under the time limit, the files) and the command line.
from bench.deepspeed_check.config import (DIST_VARS, FAMILIES, ROOT, TTFT_METHODS, Budget,
                                          DSCheckConfig, budget_for)
from bench.deepspeed_check.equivalence import equivalence_pair, part_equivalence
from bench.deepspeed_check.launcher import find_deepspeed_exe, launcher_run, part_launcher
from bench.deepspeed_check.report import _overall, markdown, summarize
from bench.deepspeed_check.ttft import part_ttft, small_model, ttft_base, ttft_rows

__all__ = ["ROOT", "FAMILIES", "TTFT_METHODS", "DIST_VARS", "DSCheckConfig", "Budget", "budget_for",
           "equivalence_pair", "part_equivalence", "small_model", "ttft_base", "part_ttft", "ttft_rows",
           "find_deepspeed_exe", "launcher_run", "part_launcher", "summarize", "markdown", "run", "mark_not_run",
           "parse_args", "config_from_args", "main"]


def run(cfg: DSCheckConfig, command: str = "", log=print) -> dict:
    """Parts A, B, C; writes the report files and returns the report. ``cfg.time_limit``, SIGTERM /
    SIGINT: the report of what finished, the rest listed as not run (``report["stopped"]``)."""
    t_start = time.perf_counter()
    t_wall0 = time.time()
    device = torch.device(cfg.device)
    G._precision(device)
    env = G.environment(device)
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    known = G.registered_methods()
    methods = ["none"] + [m for m in (cfg.methods or known) if m != "none"]
    log(f"deepspeed_check on {env['device_name']} ({device}); deepspeed {ds_version}; parts: "
        + ", ".join(p for p, on in (("A equivalence", cfg.equivalence), ("B TTFT", cfg.ttft),
                                     ("C launcher", cfg.launcher_check)) if on))
    report = {"tool": "bench.deepspeed_check", "command": command, "environment": env, "deepspeed_version": ds_version,
              "config": {**asdict(cfg), "device": str(device)}, "methods": methods,
              "equivalence": None, "ttft": None, "launcher": None, "stopped": None}
    if ds_version is None:
        report["error"] = "the deepspeed package is not installed: pip install -e '.[deepspeed]'"
        report["summary"] = {"checks": {"deepspeed installed": "FAIL"}, "pass": False}
    else:
        deadline = None if not cfg.time_limit else t_wall0 + cfg.time_limit - cfg.time_reserve
        budget = Budget(deadline)
        sig = G._Signals(deadline)
        with sig:
            try:
                if cfg.equivalence:
                    report["equivalence"] = {"results": [], "models": []}
                    part_equivalence(cfg, methods, log, res=report["equivalence"], budget=budget)
                if cfg.ttft:
                    report["ttft"] = ttft_base(cfg)
                    try:
                        part_ttft(cfg, log, res=report["ttft"], budget=budget)
                    except Exception as e:  # noqa: BLE001
                        report["ttft"].update(error=G._tail(e), table=[])
                if cfg.launcher_check:
                    t0 = budget.check()
                    try:
                        report["launcher"] = part_launcher(cfg, log)
                    except Exception as e:  # noqa: BLE001
                        report["launcher"] = {"verdict": "FAIL", "reasons": ["crash: " + G._short(G._tail(e))],
                                              "error": G._tail(e), "runs": {}, "n_answers": 0, "model": cfg.launcher_model,
                                              "max_new_tokens": cfg.launcher_new_tokens}
                    budget.took(t0)
            except G.Stopped as e:
                report["stopped"] = e.reason
                log(f"  stopped: {e.reason}; writing the report of what finished")
            finally:
                sig.disarm()
            if report.get("stopped"):
                mark_not_run(report, cfg, methods, report["stopped"])
            report["summary"] = summarize(report)
            _write(report, cfg, env, ds_version, t_start)
        return report
    _write(report, cfg, env, ds_version, t_start)
    return report


def mark_not_run(report: dict, cfg: DSCheckConfig, methods: list[str], reason: str) -> None:
    """After a stop: every part / case that did not finish is listed as not run (``reason``)."""
    if cfg.equivalence:
        eq = report["equivalence"] = report["equivalence"] or {"results": [], "models": []}
        got = {(r["method"], r["family"], r["dtype"]) for r in eq["results"]}
        eq["results"] += [{"method": m, "family": f, "dtype": d, "verdict": "not run", "not_run": reason}
                          for f in cfg.families for d in cfg.dtypes for m in methods if (m, f, d) not in got]
    if cfg.ttft:
        t = report["ttft"] = report["ttft"] or ttft_base(cfg)
        if not t.get("skipped") and not t.get("error") and not t.get("table"):
            t["not_run"] = reason
            t["table"] = ttft_rows(t, cfg)
    if cfg.launcher_check and report.get("launcher") is None:
        report["launcher"] = {"verdict": f"not run ({reason})", "not_run": reason, "reasons": [], "runs": {},
                              "n_answers": 0, "model": cfg.launcher_model, "max_new_tokens": cfg.launcher_new_tokens}


def _write(report: dict, cfg: DSCheckConfig, env: dict, ds_version, t_start: float) -> None:
    report["seconds"] = time.perf_counter() - t_start
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"deepspeed-check-{G.slug(env['device_name'])}-{env['date']}"
    report["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    (out / f"{stem}.json").write_text(json.dumps(G._sanitize(G._jsonable_loose(report)), indent=1, allow_nan=False))
    (out / f"{stem}.md").write_text(markdown(report) if ds_version else f"# DeepSpeed check\n\n{report['error']}\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.deepspeed_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DSCheckConfig()
    B = argparse.BooleanOptionalAction
    ap.add_argument("--device", default=None, help="default: cuda when available, else say so and exit 0; "
                    "'cpu' forces a CPU run")
    ap.add_argument("--equivalence", action=B, default=True, help="part A (default on)")
    ap.add_argument("--families", nargs="+", default=d.families, choices=FAMILIES)
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: float16 bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--methods", nargs="+", default=None, help="part A; default: every registered method (+ none)")
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--ttft", action=B, default=True, help="part B (default on)")
    ap.add_argument("--ttft-model", default=d.ttft_model)
    ap.add_argument("--ttft-dtype", default=None,
                    help=f"dtype of the TTFT model (default {d.ttft_dtype} on a GPU, float32 on the CPU: DeepSpeed's "
                         "CPU accelerator refuses float16)")
    ap.add_argument("--ttft-methods", nargs="+", default=d.ttft_methods)
    ap.add_argument("--ttft-budget", type=int, default=d.ttft_budget)
    ap.add_argument("--ttft-runs", type=int, default=d.ttft_runs)
    ap.add_argument("--ttft-warmup", type=int, default=d.ttft_warmup)
    ap.add_argument("--launcher-check", action=B, default=True, help="part C (default on)")
    ap.add_argument("--launcher-new-tokens", type=int, default=d.launcher_new_tokens)
    ap.add_argument("--launcher-timeout", type=int, default=d.launcher_timeout)
    ap.add_argument("--out", default=d.out, help="folder of the report (default docs/results)")
    ap.add_argument("--time-limit", type=float, default=G._env_float("DEEPSPEED_CHECK_TIME_LIMIT"), metavar="SECONDS",
                    help="start no step that would end past this many seconds (less --time-reserve), stop one "
                    "still running there; the report lists the rest as 'not run (time limit)', verdict PARTIAL, "
                    "exit 3 (default: env DEEPSPEED_CHECK_TIME_LIMIT, else none)")
    ap.add_argument("--time-reserve", type=float, default=d.time_reserve, metavar="SECONDS",
                    help=f"seconds kept back from --time-limit for writing the report (default {d.time_reserve:g})")
    return ap.parse_args(argv)


def config_from_args(a) -> DSCheckConfig | None:
    device = a.device
    if device is None or device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        device = device or "cuda"
    is_cpu = torch.device(device).type == "cpu"
    dtypes = [G.ALIASES.get(x, x) for x in (a.dtypes or (["float32"] if is_cpu else ["float16", "bfloat16"]))]
    bad = [x for x in dtypes if x not in G.DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; choose from {sorted(G.DTYPES)} or {sorted(G.ALIASES)}")
    ttft_dtype = a.ttft_dtype or ("float32" if is_cpu else DSCheckConfig.ttft_dtype)
    known = G.registered_methods()
    unknown = [m for m in (a.methods or []) + list(a.ttft_methods) if m not in known and m != "none"]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(known)}")
    return DSCheckConfig(device=device, equivalence=a.equivalence, families=list(dict.fromkeys(a.families)),
                         dtypes=dtypes, methods=list(a.methods or []), new_tokens=a.new_tokens, seed=a.seed,
                         ttft=a.ttft, ttft_model=a.ttft_model, ttft_dtype=G.ALIASES.get(ttft_dtype, ttft_dtype),
                         ttft_methods=list(a.ttft_methods), ttft_budget=a.ttft_budget, ttft_runs=a.ttft_runs,
                         ttft_warmup=a.ttft_warmup, launcher_check=a.launcher_check,
                         launcher_new_tokens=a.launcher_new_tokens, launcher_timeout=a.launcher_timeout, out=a.out,
                         time_limit=a.time_limit or None, time_reserve=a.time_reserve)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"deepspeed_check: {e}", file=sys.stderr)
        return 2
    if cfg is None:
        print("deepspeed_check: no CUDA device is available; nothing was run "
              "(use --device cpu for a CPU run of the same checks).")
        return 0
    command = "python -m bench.deepspeed_check " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(cfg, command.strip())
    summ = report["summary"]
    print()
    print(f"deepspeed_check: {_overall(summ)}" + (f" (stopped: {report['stopped']})" if report.get("stopped") else ""))
    for k, v in summ["checks"].items():
        print(f"  {k:16s} {v}")
    t = report.get("ttft") or {}
    for r in t.get("table", []):
        print(f"  TTFT {r['method']:14s} plain {G._fmt(r['plain_ms'], '.2f')} ms  "
              f"deepspeed {G._fmt(r['deepspeed_ms'], '.2f')} ms  ratio {G._fmt(r['ratio'], '.3f')}")
    print("report: " + ", ".join(report["files"]))
    return G.exit_status(summ)

"""GPU check: prove on a real CUDA device that the pruning engine gives correct answers.

    bash scripts/bench/gpu_check.sh                      # = python -m bench.gpu_check (CUDA, all checks)
    python -m bench.gpu_check --device cpu --no-ttft      # CPU run (fp32): what CI can check
    python -m bench.gpu_check --methods none fastv --families llava --dtypes float16 --no-ttft
    python -m bench.gpu_check --fast-only --fast-dtypes float16       # the fast-path section only

Every registered method (test doubles excluded) and ``none`` (the unpruned model) on the seven tiny
random-weight families (``tiny:llava``, ``tiny:llava-next``, ``tiny:video-llava``, ``tiny:qwen2.5-vl``,
``tiny:llava-onevision``, ``tiny:qwen3-vl``, ``tiny:internvl``, ``tiny:qwen3.5``, ``tiny:qwen2-vl``), in fp16 and bf16 on the device plus an fp32 reference row, at a small budget
that really prunes (each method's own budget convention, see ``TINY_BUDGETS``); a method whose
``families`` exclude a family (``llava.method.method_supports``), or that a hybrid model (Qwen3.5) refuses at attach
because it reads a linear-attention layer (``llava.engine.HybridRefusal``), is not run there and reported ``n/a``.
Checks, per method x family x dtype:

* **batch == alone**: batches of 3 (``mixed``: unequal prompts and unequal images / crops / videos;
  ``same-question``: one question, unequal images, so the prompts are equally long when the images are;
  Qwen2.5-VL and OneVision are image families like LLaVA, their unequal images giving unequal dynamic
  grids / anyres crops; Video-LLaVA also ``video+images``: a video sample next to two image samples)
  generate greedy tokens (forced length) that must equal each sample run alone; the max |delta logit| of the first generated
  token is reported. fp32: the tokens must be equal and the logits of every generated step within
  ``FP32_LOGIT_TOL`` (a decode step that attends to padding shows here even when greedy agrees).
  fp16 / bf16: the unpruned model itself may differ between batch and alone (other kernels for other
  shapes), so a method fails only on a sample where it differs and the unpruned model does not, unless
  its logits up to the first differing token stayed within the noise band (4x the unpruned model's own
  largest logit delta there, at least 2 ulp(1) of the dtype): then a near tie flipped. Each verdict
  says which rule passed it.
* **cached == no-cache**: the batch's cached generation equals a greedy no-cache full recompute of the
  same tokens with ``engine.replay = True`` (the recorded selections reused; Qwen2.5-VL's M-RoPE
  positions computed by the model from the grown prompt); half precision judged against the unpruned
  model in the same way.
* **host syncs**: ``llava.syncs.SyncCounter`` around one pruned prefill (``model(**batch)``) of the
  ``mixed`` batch, total and per sample; informational unless ``--max-syncs-per-sample`` is given.
* **TTFT** (skip with ``--no-ttft``): ``shape:llava-1.5-7b`` (real shapes, random weights) in fp16,
  unpruned and every method at budget 64, batch 1, median TTFT with the engine's vision / selection /
  LLM breakdown (timed with bench.efficiency's helpers).
* **Fast path** (``load(..., fast=True)``; bench/gpu_check/fast.py; skip with ``--no-fast``, only it with
  ``--fast-only``): on tiny LLaVA / NeXT / Video-LLaVA in the dtypes above, every method's batch-1 greedy
  tokens (``--fast-prompts`` prompts x ``--fast-tokens`` tokens) on the fast path with the device's backend
  (CUDA graphs through Inductor on CUDA) == the same path uncompiled == the eager engine, every prefill of
  a captured method on the fast path (an uncaptured one is listed as eager with its reason); and its
  batch-1 TTFT / TPOT on ``shape:llava-1.5-7b`` and ``shape:llava-next-7b`` with the issue's targets
  reported as met / missed (``--no-fast-ttft``; ``--no-ttft`` skips every timing table).

Writes ``gpu-check-<device>-<date>.json`` and ``.md`` under ``--out`` (default docs/results), with a
PASS / FAIL summary per check and per method; the exit status is 1 when any check fails (a crash is
recorded with the last lines of its traceback and the run goes on; see below for PARTIAL, exit 3). Without a CUDA device and without
``--device`` it says so and exits 0 without running.

On CUDA the checks run in a worker process (``--isolate``, the default there): a device-side assert
leaves a CUDA context unusable, so the worker stops after the task that caused it (every task ends
with a synchronize, so an asynchronous error is charged to its own task) and a fresh worker takes the
remaining tasks; a worker that dies outright charges the task it was on.

Results are never lost (the per-command wall-clock limit of a borrowed GPU machine):

* ``--time-limit SECONDS`` (or env ``GPU_CHECK_TIME_LIMIT``): no task is started once the elapsed time
  plus the longest task so far (its model load included) would pass the limit less ``--time-reserve``
  (default 5 s, for judging and writing the report); at the limit less the reserve a task still running
  is stopped (the worker is killed; in-process a SIGALRM stops it). The report is then written with the
  tasks not run listed as ``not run (time limit)``. Give it a little less than the outer limit, e.g.
  ``timeout 170 python -m bench.gpu_check --time-limit 160``.
* SIGTERM / SIGINT (what ``timeout`` and Ctrl-C send): the parent stops its worker, judges the tasks
  finished so far and writes the report, the rest listed as ``not run (interrupted by SIGTERM)``.
* Every finished task's record is appended (flushed) to ``<report>.partial.jsonl`` (first line a header
  with the config and the task list) as it completes, so even a SIGKILL leaves the finished records. It
  is deleted when a complete report is written and kept beside a partial one; ``--resume`` (that file,
  or ``--resume FILE``) reuses its finished records (same config) and runs only the rest.

A report with tasks not run has ``summary.partial`` true and the overall verdict ``PARTIAL`` (or
``FAIL`` when a task that ran failed). Exit status: 0 PASS (every task ran and passed), 1 FAIL (a
check failed among the tasks that ran, complete or partial), 3 PARTIAL (tasks not run for the time
limit or a signal, no failure among those that ran), 2 bad arguments / a ``--resume`` file that does
not match.
"""


# The check's parts, by purpose (each imports only parts below it in this list, as bench.gpu_check.<part>; none
# imports this file, the package, so there is no import circle):
#   bench/gpu_check/cli.py          the flags, the configuration they give, the printed summary, the exit status
#   bench/gpu_check/report.py       the summary (PASS / FAIL / PARTIAL per check and method), the markdown report
#   bench/gpu_check/worker.py       worker processes, the time limit, SIGTERM / SIGINT, .partial.jsonl, --resume
#   bench/gpu_check/fast_report.py  the fast-path section: its markdown
#   bench/gpu_check/fast.py         the fast-path section: task list, equality checks, verdicts, summary
#   bench/gpu_check/fast_timing.py  the fast-path section: TTFT / TPOT on the 7B shapes, the targets
#   bench/gpu_check/ttft.py         the eager engine's TTFT table on the 7B shapes
#   bench/gpu_check/tiny.py         the tiny-model checks: inputs, generation, batch == alone, cached == no-cache,
#                                   host syncs, their verdicts
#   bench/gpu_check/device.py       device guards (a crash recorded, DeviceLost), the environment record
#   bench/gpu_check/config.py       families, dtypes, the tiny budgets, CheckConfig, the task key, JSON / text helpers
# This file (the package): the run (the task list, the tiny task, the task loop, the report assembled and written)
# and main (``python -m bench.gpu_check``: bench/gpu_check/__main__.py calls it);
# it re-exports the names other code takes from bench.gpu_check (bench.deepspeed_check, bench.tp_check, tests).
# Tests replace supported, tiny_task, _load_tiny, worker_command and run on this module, so the functions that
# use them (tiny_task, _report, _load_context, _run_task, run_isolated, main) are defined here.

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.gpu_check import fast
from bench.gpu_check.cli import build_parser, config_from_args, exit_status, print_summary  # noqa: F401
from bench.gpu_check.config import (ALIASES, DTYPES, FALLBACK_BUDGET, FAMILIES, FP32_LOGIT_TOL,  # noqa: F401
                                    IMAGE_SIZES, NO_BUDGET, QUESTIONS, SAME_LENGTH_NEXT, TINY_BUDGETS, CheckConfig,
                                    _env_float, _fmt, _jsonable, _jsonable_loose, _sanitize, _short, family_key,
                                    registered_methods, supported, task_key, tiny_budget)
from bench.gpu_check.device import (DeviceLost, _finish, _precision, _recorded, _tail, _unprune,  # noqa: F401
                                    device_alive, environment, slug)
from bench.gpu_check.report import markdown, summarize
from bench.gpu_check.tiny import (_has_error, _load_tiny, build, compare, count_syncs, generate,  # noqa: F401
                                  greedy_no_cache, hybrid_refusal, judge, noise_tolerance, rand_image, run_scenario,
                                  scenarios, sync_verdict)
from bench.gpu_check.ttft import _load_ttft, ttft_table, ttft_task  # noqa: F401
from bench.gpu_check.worker import (RESUME_FREE, TEST_SLEEP_ENV, TIME_LIMIT, WORKER_TIME_LIMIT,  # noqa: F401
                                    ResumeError, Stopped, _resume_config, _Signals, load_partial, may_start,
                                    run_workers)


# ------------------------------------------------------------------------------------------------
# the tasks
# ------------------------------------------------------------------------------------------------


def tiny_task(ctx: dict, family: str, dtype: str, method: str, cfg: CheckConfig) -> dict:
    """One method on one loaded tiny family in one dtype: every scenario and the sync count."""
    rt, scen, suppress, device = ctx["rt"], ctx["scenarios"], ctx["suppress"], cfg.device
    fam = family_key(family)
    if not supported(method, fam):  # the method refuses this family (its ``families``): n/a, not a failure
        return {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": None,
                "scenarios": {}, "error": None, "skipped": f"n/a: {method} does not support {fam}"}
    budget = tiny_budget(method, fam)
    refusal = hybrid_refusal(rt, method, budget)
    if refusal:  # a hybrid model (Qwen3.5): the method reads a linear-attention layer, refused at attach: n/a
        return {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": budget,
                "scenarios": {}, "error": None, "skipped": f"n/a: {refusal}"}
    rec = {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": budget,
           "scenarios": {}, "error": None}
    try:
        with _recorded(device, rec):
            try:
                eng = rt.prune(method, budget)
            except (ValueError, TypeError) as e:
                if budget is None or method in TINY_BUDGETS:
                    raise
                rec["budget_note"] = f"budget {budget} refused ({e}); ran without a budget"
                rec["budget"] = budget = None
                eng = rt.prune(method, None)
            rec["config"] = _jsonable(eng.method.config())
            for name, samples in scen.items():
                rec["scenarios"][name] = {}
                with _recorded(device, rec["scenarios"][name]):
                    rec["scenarios"][name] = run_scenario(rt, eng, samples, device, cfg.new_tokens, suppress)
            rec["syncs"] = {}
            with _recorded(device, rec["syncs"]):
                rec["syncs"] = count_syncs(rt, scen["mixed"], device)
    finally:
        _unprune(rt)
    return rec


def make_tasks(cfg: CheckConfig, methods: list[str]) -> list[dict]:
    tasks = [{"kind": "tiny", "family": f, "dtype": d, "method": m}
             for f in cfg.families for d in cfg.dtypes for m in methods] if cfg.tiny else []
    if cfg.ttft:
        tm = cfg.ttft_methods or methods
        tasks += [{"kind": "ttft", "method": m} for m in ["none"] + [x for x in tm if x != "none"]]
        if any(x != "none" for x in tm):  # the unpruned model again, last: the table's drift
            tasks.append({"kind": "ttft", "method": "none", "again": 1})
    return tasks + fast.tasks(cfg, methods)


def run_tasks(tasks: list[dict], cfg: CheckConfig, emit, log, deadline: float | None = None,
              margin: float = 0.0) -> bool:
    """Run ``tasks`` in order in this process (one model load per family x dtype, one for TTFT),
    handing each record to ``emit``. Raises DeviceLost when the device is gone (the record of the
    task that took it down has been emitted). Returns False when it stopped early because the next
    task would not end by ``deadline`` (time.time(); ``margin``: the longest task seen before), else True."""
    ctx, ctx_key, load_error = None, None, None
    sleep = float(os.environ.get(TEST_SLEEP_ENV) or 0)
    for t in tasks:
        if not may_start(time.time(), deadline, margin):
            log(f"  time limit: {len(tasks) - tasks.index(t)} task(s) not started")
            return False
        t_wall = time.perf_counter()
        key = _context_key(t)
        if key != ctx_key:
            ctx, ctx_key, load_error = None, key, None
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.empty_cache()
            try:
                ctx = _load_context(t, cfg)
            except Exception as e:  # noqa: BLE001 - every task of this model fails with the load error
                load_error = ["cannot build the model:"] + _tail(e)
                log(f"  {' '.join(map(str, key))}: cannot build the model: {load_error[-1]}")
        t0 = time.perf_counter()
        lost = None
        if load_error is not None:
            rec = {**t, "error": load_error, "scenarios": {}} if t["kind"] == "tiny" else {**t, "error": load_error}
        else:
            try:
                rec = _run_task(ctx, t, cfg)
            except DeviceLost as e:
                lost = e
                rec = {**t, "scenarios": {}, "error": ["the device was lost (CUDA context unusable):"] + _tail(e.__cause__ or e)}
        if sleep:
            time.sleep(sleep)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["wall_seconds"] = round(time.perf_counter() - t_wall, 3)  # with the model load, if this task did it
        margin = max(margin, rec["wall_seconds"])
        emit(rec)
        where = _where(t)
        extra = ""
        if t["kind"] in ("ttft", "fast_ttft") and rec.get("ttft"):
            extra = f"  median {rec['ttft']['median'] * 1e3:.2f} ms"
        elif t["kind"] == "fast" and rec.get("refusal"):
            extra = "  eager (not captured)"
        log(f"  {where} {t['method']:14s} {rec['seconds']:6.2f} s" + ("  CRASH" if _has_error(rec) else extra))
        if lost is not None or (load_error is None and not device_alive(cfg.device)):
            raise DeviceLost(str(lost or "device lost"))
    return True


def _context_key(t: dict) -> tuple:
    """The loaded model a task runs on: consecutive tasks with the same key share one load."""
    if t["kind"] == "tiny":
        return ("tiny", t["family"], t["dtype"])
    return ("ttft",) if t["kind"] == "ttft" else fast.context_key(t)


def _load_context(t: dict, cfg: CheckConfig) -> dict:
    if t["kind"] == "tiny":
        return _load_tiny(t["family"], t["dtype"], cfg)
    if t["kind"] == "ttft":
        return _load_ttft(cfg)
    if t["kind"] == "fast":
        return fast.load_equality(t["family"], t["dtype"], cfg)
    return fast.load_timing(t["model"], cfg)


def _run_task(ctx: dict, t: dict, cfg: CheckConfig) -> dict:
    if t["kind"] == "tiny":
        return tiny_task(ctx, t["family"], t["dtype"], t["method"], cfg)
    if t["kind"] == "ttft":
        return ttft_task(ctx, t["method"], cfg, again=t.get("again", 0))
    if t["kind"] == "fast":
        return fast.equality_task(ctx, t, cfg)
    return fast.timing_task(ctx, t, cfg)


def _where(t: dict) -> str:
    """A task's column in the progress log."""
    if t["kind"] == "tiny":
        return f"{t['family']:12s} {t['dtype']:9s}"
    return "TTFT" + " " * 18 if t["kind"] == "ttft" else fast.where(t)


# ------------------------------------------------------------------------------------------------
# isolation: a worker process per CUDA context
# ------------------------------------------------------------------------------------------------


def worker_command(task_file: Path, result_file: Path) -> list[str]:
    return [sys.executable, "-m", "bench.gpu_check", "--worker", str(task_file), str(result_file)]


def run_isolated(tasks: list[dict], cfg: CheckConfig, log, emit=None, deadline: float | None = None,
                 margin: float = 0.0) -> list[dict]:
    """The tasks in worker processes started by :func:`worker_command` (bench.gpu_check.worker.run_workers:
    a fresh worker after a lost device, a dead worker charged to its task, Stopped on the time limit or a signal)."""
    return run_workers(tasks, cfg, worker_command, log, emit=emit, deadline=deadline, margin=margin)


def worker_main(task_file: str, result_file: str) -> int:
    spec = json.loads(Path(task_file).read_text())
    cfg = CheckConfig(**spec["config"])
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops this worker and writes the report
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _precision(cfg.device)
    with open(result_file, "a") as out:
        def emit(rec):
            out.write(json.dumps(_sanitize(_jsonable_loose(rec)), allow_nan=False) + "\n")
            out.flush()

        try:
            if not run_tasks(spec["tasks"], cfg, emit, lambda s: print(s, flush=True),
                             deadline=spec.get("deadline"), margin=spec.get("margin") or 0.0):
                return WORKER_TIME_LIMIT
        except DeviceLost:
            return 3
    return 0


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def run(cfg: CheckConfig, command: str = "", log=print, isolate: bool | None = None, resume=None) -> dict:
    """All checks; writes the report files and returns the report. ``isolate`` (default: on CUDA) runs
    them in worker processes, so that a device-side assert cannot take the later methods down.
    ``cfg.time_limit``, SIGTERM / SIGINT: the report of the tasks finished so far, the rest not run.
    ``resume``: True (this report's ``.partial.jsonl``) or a path: reuse its finished records."""
    t_start = time.perf_counter()
    t_wall0 = time.time()
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _precision(device)
    methods = ["none"] + [m for m in cfg.methods if m != "none"]
    env = environment(device)
    isolate = device.type == "cuda" if isolate is None else isolate
    log(f"gpu_check on {env['device_name']} ({device}); dtypes {' '.join(cfg.dtypes)}; families "
        f"{' '.join(cfg.families)}; {len(methods)} methods" + ("" if cfg.tiny else " (fast-path section only)")
        + ("; TTFT on " + cfg.ttft_model if cfg.ttft else "")
        + (f"; fast path ({cfg.fast_prompts} prompts x {cfg.fast_tokens} tokens"
           + (f", timing on {cfg.fast_ttft_model}" if cfg.fast_ttft else "") + ")" if cfg.fast else "")
        + (f"; time limit {cfg.time_limit:g} s" if cfg.time_limit else ""))
    tasks = make_tasks(cfg, methods)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-check-{slug(env['device_name'])}-{env['date']}"
    partial = out / f"{stem}.partial.jsonl"
    done: dict[tuple, dict] = {}
    if resume:
        done = load_partial(partial if resume is True else Path(resume), cfg, tasks)
        for r in done.values():
            r["resumed"] = True
        log(f"  resumed {len(done)} finished task(s) from {partial if resume is True else resume}")
    deadline = None if not cfg.time_limit else t_wall0 + cfg.time_limit - cfg.time_reserve
    stop_reason = None
    with open(partial, "w") as pf:
        def emit(rec):
            done[task_key(rec)] = rec
            pf.write(json.dumps(_sanitize(_jsonable_loose(rec)), allow_nan=False) + "\n")
            pf.flush()

        pf.write(json.dumps({"header": {"tool": "bench.gpu_check", "command": command,
                                        "config": _jsonable_loose(_resume_config(cfg)), "tasks": tasks}}) + "\n")
        for r in list(done.values()):
            emit(r)
        todo = [t for t in tasks if task_key(t) not in done]
        sig = _Signals(deadline)
        with sig:
            try:
                if todo and isolate:
                    run_isolated(todo, cfg, log, emit=emit, deadline=deadline)
                elif todo:
                    try:
                        if not run_tasks(todo, cfg, emit, log, deadline=deadline):
                            stop_reason = TIME_LIMIT
                    except DeviceLost as e:  # in-process there is no way back: the rest is reported as not run
                        log(f"  device lost ({e}); the remaining tasks did not run (run with isolation)")
            except Stopped as e:
                stop_reason = e.reason
            finally:
                sig.disarm()
            if stop_reason:
                log(f"  stopped: {stop_reason}; writing the report of the {len(done)} finished task(s)")
            recs = []
            for t in tasks:
                if task_key(t) in done:
                    recs.append(done[task_key(t)])
                elif stop_reason:
                    recs.append({**t, "scenarios": {}, "seconds": None, "error": None, "not_run": stop_reason})
                else:
                    recs.append({**t, "scenarios": {}, "seconds": None,
                                 "error": ["not run: an earlier task took the device down"]})
            report = _report(cfg, command, env, device, isolate, methods, recs, t_start, out, stem)
            report["stopped"] = stop_reason
            if report["summary"].get("partial"):
                report["partial_file"] = str(partial)  # kept: --resume runs only the tasks not run
            (out / f"{stem}.json").write_text(json.dumps(_sanitize(_jsonable_loose(report)), indent=1, allow_nan=False))
            (out / f"{stem}.md").write_text(markdown(report))
    if not report["summary"].get("partial"):
        partial.unlink(missing_ok=True)  # the complete report holds every record
    return report


def _report(cfg, command, env, device, isolate, methods, recs, t_start, out, stem) -> dict:
    tiny = [r for r in recs if r["kind"] == "tiny"]
    for r in tiny:
        r.setdefault("budget", tiny_budget(r["method"], family_key(r["family"])))
    judge(tiny)
    report = {"tool": "bench.gpu_check", "command": command, "environment": env,
              "config": {**asdict(cfg), "device": str(device)}, "isolated": isolate, "methods": methods,
              "budgets": {m: {f: tiny_budget(m, family_key(f)) if supported(m, family_key(f)) else "n/a"
                              for f in cfg.families} for m in methods},
              "tiny": tiny, "ttft": ttft_table([r for r in recs if r["kind"] == "ttft"], cfg) if cfg.ttft else None,
              "fast": fast.section(cfg, [r for r in recs if r["kind"] in ("fast", "fast_ttft")], tiny)}
    report["summary"] = summarize(report, cfg)
    report["seconds"] = time.perf_counter() - t_start
    report["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    return report


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    return build_parser(__doc__).parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(*a.worker)
    device = a.device
    if device is None or device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is available; nothing was run "
                  "(use --device cpu for a CPU run of the same checks).")
            return 0
        device = device or "cuda"
    try:
        cfg = config_from_args(a, device)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    command = "python -m bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(cfg, command.strip(), isolate=a.isolate, resume=a.resume)
    except ResumeError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    print_summary(report)
    return exit_status(report["summary"])

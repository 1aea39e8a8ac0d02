"""DeepSpeed check: prove and measure DeepSpeed inference at tensor-parallel size 1 on a real device.

    bash scripts/bench/deepspeed_check.sh                 # = python -m bench.deepspeed_check (CUDA, all parts)
    python -m bench.deepspeed_check --device cpu --families llava --ttft-model tiny:llava --out /tmp/dsc

Three parts, each optional (``--no-equivalence``, ``--no-ttft``, ``--no-launcher-check``):

* **A. Equivalence**: every tiny family (``--families``) in every dtype (``--dtypes``; fp16 and bf16 on
  CUDA, fp32 on CPU) is loaded twice with the same seed; the second copy goes through
  ``llava.models.deepspeed_inference`` (``deepspeed.init_inference``, tp_size 1, kernel injection off).
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
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import gpu_check as G

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision")
TTFT_METHODS = ("none", "consensusdrop", "visiondrop", "attnmix", "fastv", "visionzip")
#: families without an entry in bench.gpu_check.TINY_BUDGETS borrow the budgets of a similar tiny model
#: (the check is plain vs DeepSpeed, so the exact amount of pruning does not matter)
BUDGET_FAMILY = {"qwen2_5_vl": "llava", "llava_onevision": "llava_next"}
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE")


@dataclass
class DSCheckConfig:
    device: str | None = None
    equivalence: bool = True
    families: list = field(default_factory=lambda: list(FAMILIES))
    dtypes: list = field(default_factory=list)
    methods: list = field(default_factory=list)  # default: every registered method
    new_tokens: int = 4
    seed: int = 1
    ttft: bool = True
    ttft_model: str = "shape:llava-1.5-7b"
    ttft_dtype: str = "float16"
    ttft_methods: list = field(default_factory=lambda: list(TTFT_METHODS))
    ttft_budget: int = 64
    ttft_runs: int = 20
    ttft_warmup: int = 3
    ttft_text_words: int = 12
    launcher_check: bool = True
    launcher_model: str = "tiny:llava"
    launcher_new_tokens: int = 8
    launcher_timeout: int = 600
    out: str = "docs/results"
    time_limit: float | None = None  # seconds for the whole run (None: no limit)
    time_reserve: float = 5.0  # seconds kept back from the limit for writing the report


class Budget:
    """The time limit of a run: ``check()`` before a step raises Stopped when the step, as long as the
    longest one so far, would end past the deadline (time.time()); ``took()`` records a step's wall time."""

    def __init__(self, deadline: float | None = None):
        self.deadline, self.longest = deadline, 0.0

    def check(self) -> float:
        if not G.may_start(time.time(), self.deadline, self.longest):
            raise G.Stopped(G.TIME_LIMIT)
        return time.perf_counter()

    def took(self, t0: float) -> None:
        self.longest = max(self.longest, time.perf_counter() - t0)


def _fam(family: str) -> str:
    return family.replace("-", "_").replace(".", "_")


def budget_for(method: str, family: str):
    fam = _fam(family)
    try:
        return G.tiny_budget(method, fam)
    except KeyError:
        return G.tiny_budget(method, BUDGET_FAMILY.get(fam, "llava"))


def _supports(method: str, fam: str) -> bool:
    from llava.method import method_supports

    try:
        return method_supports(method, fam)
    except KeyError:  # "none" may not be a registry entry
        return True


# ------------------------------------------------------------------------------------------------
# A. equivalence
# ------------------------------------------------------------------------------------------------


def _weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def equivalence_pair(rt_plain, rt_ds, method: str, family: str, cfg: DSCheckConfig, device) -> dict:
    """One method attached to the plain and the DeepSpeed-wrapped runtime: greedy tokens on ``mixed``."""
    fam = _fam(family)
    budget = budget_for(method, family)
    rec = {"method": method, "family": family, "budget": budget}
    if not _supports(method, fam):
        return {**rec, "verdict": "n/a", "reason": f"{method} does not support {fam}"}
    samples = G.scenarios(fam)["mixed"]
    opts = {"seed": 3} if method == "random" else {}
    outs = []
    try:
        for rt in (rt_plain, rt_ds):
            try:
                try:
                    rt.prune(method, budget, **opts)
                except (ValueError, TypeError) as e:  # an adaptive method refuses a budget (gpu_check's rule)
                    if budget is None or method in G.TINY_BUDGETS:
                        raise
                    rec["budget_note"] = f"budget {budget} refused ({e}); ran without a budget"
                    rec["budget"] = budget = None
                    rt.prune(method, None, **opts)
                batch = G.build(rt, samples, device)
                outs.append(G.generate(rt, batch, cfg.new_tokens))
                G._finish(device)
            finally:
                G._unprune(rt)
        (t0, l0), (t1, l1) = outs
        equal = bool(torch.equal(t0.cpu(), t1.cpu()))
        rec.update(tokens_equal=equal, tokens=t0.cpu().tolist(),
                   first_logit_delta=float((l0[:, 0] - l1[:, 0]).abs().max()),
                   max_logit_delta=float((l0 - l1).abs().max()) if equal else None,
                   verdict="PASS" if equal else "FAIL")
        if not equal:
            rec["ds_tokens"] = t1.cpu().tolist()
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rec.update(verdict="FAIL", error=G._tail(e))
    return rec


def part_equivalence(cfg: DSCheckConfig, methods: list[str], log=print, res: dict | None = None,
                     budget: Budget | None = None) -> dict:
    """Part A, filling ``res`` (given: what finished survives a Stopped raised by ``budget`` or a signal)."""
    from llava.models import load
    from llava.tp import deepspeed_inference

    device = torch.device(cfg.device)
    budget = budget or Budget()
    res = {"results": [], "models": []} if res is None else res
    res.setdefault("results", [])
    res.setdefault("models", [])
    for family in cfg.families:
        for dtype in cfg.dtypes:
            t0 = budget.check()
            mrec = {"family": family, "dtype": dtype}
            try:
                plain = load(f"tiny:{family}", seed=cfg.seed, dtype=dtype, device=device)
                wrapped = deepspeed_inference(load(f"tiny:{family}", seed=cfg.seed, dtype=dtype, device=device), tp_size=1)
                mrec.update(deepspeed=wrapped.info.get("deepspeed"), weights_equal=_weights_equal(plain.model, wrapped.model),
                            ds_param_dtype=str(next(wrapped.model.parameters()).dtype).replace("torch.", ""),
                            ds_param_device=str(next(wrapped.model.parameters()).device))
            except Exception as e:  # noqa: BLE001 - every method of this model fails with the load error
                mrec["error"] = ["cannot build / wrap the model:"] + G._tail(e)
                res["models"].append(mrec)
                for m in methods:
                    res["results"].append({"method": m, "family": family, "dtype": dtype, "verdict": "FAIL",
                                           "error": mrec["error"]})
                log(f"  A {family:15s} {dtype:9s} cannot build the model: {mrec['error'][-1]}")
                if not G.device_alive(device):
                    res["device_lost"] = True
                    return res
                continue
            res["models"].append(mrec)
            budget.took(t0)
            for m in methods:
                t1 = budget.check()
                r = equivalence_pair(plain, wrapped, m, family, cfg, device)
                if os.environ.get(G.TEST_SLEEP_ENV):  # test hook (tests/test_deepspeed_check.py): a slow step
                    time.sleep(float(os.environ[G.TEST_SLEEP_ENV]))
                r = {**r, "dtype": dtype, "seconds": round(time.perf_counter() - t1, 3)}
                budget.took(t1)
                res["results"].append(r)
                extra = f"  first |dlogit| {r['first_logit_delta']:.3g}" if "first_logit_delta" in r else ""
                log(f"  A {family:15s} {dtype:9s} {m:14s} {r['verdict']}{extra}" + ("  CRASH" if r.get("error") else ""))
                if r.get("error") and not G.device_alive(device):
                    res["device_lost"] = True
                    return res
            mrec["seconds"] = round(time.perf_counter() - t0, 2)
            del plain, wrapped
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------------
# B. TTFT with and without DeepSpeed
# ------------------------------------------------------------------------------------------------


def small_model(name: str) -> bool:
    return name.startswith("tiny:") or (name.startswith("shape:") and "cpu-small" in name)


def ttft_base(cfg: DSCheckConfig) -> dict:
    return {"model": cfg.ttft_model, "dtype": cfg.ttft_dtype, "budget": cfg.ttft_budget, "runs": cfg.ttft_runs,
            "warmup": cfg.ttft_warmup, "methods": list(cfg.ttft_methods), "plain": [], "deepspeed": []}


def part_ttft(cfg: DSCheckConfig, log=print, res: dict | None = None, budget: Budget | None = None) -> dict:
    """gpu_check's batch-1 TTFT task on the plain runtime, then on the same runtime wrapped (filling
    ``res`` when given, so that what finished survives a Stopped)."""
    from llava.tp import deepspeed_inference

    device = torch.device(cfg.device)
    budget = budget or Budget()
    res = ttft_base(cfg) if res is None else res
    if device.type != "cuda" and not small_model(cfg.ttft_model):
        res["skipped"] = f"{cfg.ttft_model} is too large for a CPU run (use --ttft-model tiny:llava)"
        return res
    t0 = budget.check()
    gcfg = G.CheckConfig(device=str(device), ttft_model=cfg.ttft_model, ttft_dtype=cfg.ttft_dtype,
                         ttft_budget=cfg.ttft_budget, ttft_warmup=cfg.ttft_warmup, ttft_runs=cfg.ttft_runs,
                         ttft_text_words=cfg.ttft_text_words)
    try:
        ctx = G._load_ttft(gcfg)
    except Exception as e:  # noqa: BLE001
        res["error"] = ["cannot build the model:"] + G._tail(e)
        return res
    budget.took(t0)
    res.update(build_seconds=ctx["build_seconds"], image_px=ctx["image_px"])
    for phase in ("plain", "deepspeed"):
        if phase == "deepspeed":
            try:
                ctx["rt"] = deepspeed_inference(ctx["rt"], tp_size=1)
                res["deepspeed_info"] = ctx["rt"].info.get("deepspeed")
            except Exception as e:  # noqa: BLE001
                res["error"] = ["deepspeed_inference failed:"] + G._tail(e)
                break
        for m in cfg.ttft_methods:
            t1 = budget.check()
            rec = G.ttft_task(ctx, m, gcfg)
            budget.took(t1)
            res[phase].append(rec)
            med = (rec.get("ttft") or {}).get("median")
            log(f"  B {phase:9s} {m:14s} " + (f"median {med * 1e3:.2f} ms" if med is not None else "CRASH"))
            if rec.get("error") and not G.device_alive(device):
                res["device_lost"] = True
                break
        if res.get("device_lost"):
            break
    if device.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    res["table"] = ttft_rows(res, cfg)
    return res


def ttft_rows(res: dict, cfg: DSCheckConfig) -> list[dict]:
    rows = []
    for m in cfg.ttft_methods:
        p = next((r for r in res["plain"] if r["method"] == m), {})
        d = next((r for r in res["deepspeed"] if r["method"] == m), {})
        pm, dm = (p.get("ttft") or {}).get("median"), (d.get("ttft") or {}).get("median")
        rows.append({"method": m, "budget": p.get("budget", d.get("budget")), "plain_ms": pm and pm * 1e3,
                     "deepspeed_ms": dm and dm * 1e3, "ratio": (dm / pm) if pm and dm else None,
                     "plain_p90_ms": (p.get("ttft") or {}).get("p90", 0) * 1e3 or None,
                     "deepspeed_p90_ms": (d.get("ttft") or {}).get("p90", 0) * 1e3 or None,
                     "error": p.get("error") or d.get("error"),
                     **({"not_run": res["not_run"]} if res.get("not_run") and not (p and d) else {})})
    return rows


# ------------------------------------------------------------------------------------------------
# C. the real launcher
# ------------------------------------------------------------------------------------------------


def find_deepspeed_exe() -> tuple[str | None, str | None]:
    """(the ``deepspeed`` executable, a directory to prepend to PATH or None). Next to the package when
    pip installed it with --target (<site>/bin/deepspeed) or in the interpreter's bin directory."""
    exe = shutil.which("deepspeed")
    if exe:
        return exe, None
    cands = [Path(sys.executable).parent]
    try:
        import deepspeed

        site = Path(deepspeed.__file__).resolve().parent.parent
        cands = [site / "bin", site.parent / "bin", site.parent.parent / "bin", site.parent.parent.parent / "bin"] + cands
    except ImportError:
        pass
    for d in cands:
        if (d / "deepspeed").is_file() and os.access(d / "deepspeed", os.X_OK):
            return str(d / "deepspeed"), str(d)
    return None, None


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(WANDB_MODE="disabled", **extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_run(launcher: str, data: Path, out: Path, cfg: DSCheckConfig, path_dir: str | None) -> dict:
    cmd = ["bash", "scripts/eval/pope.sh", "fastv", "8"]
    extra = {"MODEL": cfg.launcher_model, "DATA_ROOT": str(data), "OUT": str(out), "NPROC": "1", "LAUNCHER": launcher,
             "EXTRA_ARGS": f"--no-wandb --max-new-tokens {cfg.launcher_new_tokens}"}
    env = _clean_env(extra)
    if launcher == "deepspeed":
        env["MASTER_PORT"] = str(_free_port())
        if path_dir:
            env["PATH"] = path_dir + os.pathsep + env.get("PATH", "")
            site = None
            try:
                import deepspeed

                site = str(Path(deepspeed.__file__).resolve().parent.parent)
            except ImportError:
                pass
            if site:  # a --target install: the launcher's children must import deepspeed too
                env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rec = {"launcher": launcher, "command": " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}"
                                                     for k, v in extra.items() if k != "OUT") + " " + " ".join(cmd)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cfg.launcher_timeout)
    except subprocess.TimeoutExpired:
        return {**rec, "rc": None, "seconds": round(time.perf_counter() - t0, 2),
                "error": [f"timed out after {cfg.launcher_timeout} s"]}
    rec.update(rc=p.returncode, seconds=round(time.perf_counter() - t0, 2))
    text = (p.stdout or "") + "\n" + (p.stderr or "")
    if launcher == "deepspeed":
        rec["deepspeed_cmd"] = [m.group(1).strip() for m in re.finditer(r"cmd = (.*)", text)][:1]
        rec["spawned"] = [m.group(1).strip() for m in re.finditer(r"spawned with command: (.*)", text)][:2]
    if p.returncode != 0:
        rec["error"] = [f"exit status {p.returncode}"] + text.strip().splitlines()[-15:]
        return rec
    runs = sorted(out.glob("pope/*/merge.jsonl"))
    if not runs:
        rec["error"] = ["no merge.jsonl under " + str(out)] + text.strip().splitlines()[-10:]
        return rec
    rd = runs[0].parent
    rec["run_dir"] = str(rd)
    rec["answers"] = {str(r["question_id"]): r["text"] for r in
                      (json.loads(x) for x in runs[0].read_text().splitlines() if x.strip())}
    try:
        rc = json.loads((rd / "run_config.json").read_text())["resolved"]
        rec.update(device=(rc.get("env") or {}).get("device"), resolved_launcher=rc.get("launcher"),
                   world_size=rc.get("world_size"), deepspeed=(rc.get("model") or {}).get("deepspeed"),
                   dtype=(rc.get("model") or {}).get("dtype"))
    except Exception as e:  # noqa: BLE001
        rec["run_config_error"] = G._tail(e, 2)
    return rec


def part_launcher(cfg: DSCheckConfig, log=print) -> dict:
    from eval.fixtures import write_fixtures

    device = torch.device(cfg.device)
    res = {"model": cfg.launcher_model, "method": "fastv", "budget": 8, "max_new_tokens": cfg.launcher_new_tokens,
           "runs": {}}
    exe, path_dir = find_deepspeed_exe()
    res["deepspeed_exe"] = exe
    with tempfile.TemporaryDirectory(prefix="ds_launcher_") as tmp:
        tmp = Path(tmp)
        data = write_fixtures(tmp / "data", ["pope"])
        for launcher in ("python", "deepspeed"):
            if launcher == "deepspeed" and exe is None:
                res["runs"][launcher] = {"launcher": launcher, "error": [
                    "the `deepspeed` executable was not found on PATH nor next to the deepspeed package "
                    "(install it: pip install -e '.[deepspeed]')"]}
                continue
            r = launcher_run(launcher, data, tmp / f"out_{launcher}", cfg, path_dir)
            res["runs"][launcher] = r
            log(f"  C LAUNCHER={launcher:9s} rc {r.get('rc')} {r.get('seconds')} s, "
                f"{len(r.get('answers') or {})} answers on {r.get('device')}" + ("  FAIL" if r.get("error") else ""))
    py, ds = res["runs"].get("python", {}), res["runs"].get("deepspeed", {})
    reasons = [f"LAUNCHER={k}: {v['error'][0]}" for k, v in res["runs"].items() if v.get("error")]
    if not reasons:
        if not py.get("answers"):
            reasons.append("no answers")
        elif py["answers"] != ds.get("answers"):
            diff = [q for q in py["answers"] if py["answers"][q] != ds["answers"].get(q)]
            reasons.append(f"answers differ on {len(diff)} of {len(py['answers'])} questions (e.g. {diff[:3]})")
        if not ds.get("deepspeed"):
            reasons.append("the deepspeed run's run_config.json records no deepspeed wrapping")
        if device.type == "cuda":
            for k, v in res["runs"].items():
                if not str(v.get("device", "")).startswith("cuda"):
                    reasons.append(f"LAUNCHER={k} ran on {v.get('device')}, not on the GPU")
    res["answers_equal"] = bool(py.get("answers")) and py.get("answers") == ds.get("answers")
    res["n_answers"] = len(py.get("answers") or {})
    res["verdict"] = "FAIL" if reasons else "PASS"
    res["reasons"] = reasons
    return res


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def summarize(report: dict) -> dict:
    checks = {}
    eq = report.get("equivalence")
    if eq is not None:
        rs = eq["results"]
        fails = [r for r in rs if r["verdict"] == "FAIL"]
        nr = sum(r["verdict"] == "not run" for r in rs)
        checks["A equivalence"] = "FAIL" if fails or eq.get("device_lost") else \
            f"not run ({report.get('stopped')})" if nr == len(rs) else "PASS (partial)" if nr else "PASS"
        checks["A counts"] = (f"{sum(r['verdict'] == 'PASS' for r in rs)} PASS, {len(fails)} FAIL, "
                              f"{sum(r['verdict'] == 'n/a' for r in rs)} n/a")
        if nr:
            checks["A counts"] += f", {nr} not run"
    t = report.get("ttft")
    if t is not None:
        if t.get("skipped"):
            checks["B TTFT"] = "skipped"
        else:
            ran = [r for r in t.get("table", []) if not r.get("not_run")]
            bad = t.get("error") or t.get("device_lost") or any(r.get("error") or r.get("ratio") is None for r in ran)
            checks["B TTFT"] = "FAIL" if bad else f"not run ({t['not_run']})" if t.get("not_run") and not ran \
                else f"PASS ({len(t['table']) - len(ran)} not run: {t['not_run']})" if t.get("not_run") else "PASS"
    la = report.get("launcher")
    if la is not None:
        checks["C launcher"] = la["verdict"]
    ok = not any(v == "FAIL" for v in checks.values())
    stopped = report.get("stopped")
    return {"checks": checks, "pass": ok and not stopped, "partial": bool(stopped),
            "verdict": "FAIL" if not ok else "PARTIAL" if stopped else "PASS"}


def _overall(summ: dict) -> str:
    v = summ.get("verdict") or ("PASS" if summ["pass"] else "FAIL")
    return v + (" (PARTIAL)" if summ.get("partial") and v != "PARTIAL" else "")


def markdown(report: dict) -> str:
    env, cfg, summ = report["environment"], report["config"], report["summary"]
    out = [f"# DeepSpeed check: {env['device_name']}, {env['date']}", "",
           f"`{report['command']}` — **{_overall(summ)}** in {report['seconds']:.0f} s"
           + (f" (stopped: {report['stopped']}; what did not run is listed as `not run`)" if report.get("stopped") else ""), "",
           f"torch {env['torch']}, transformers {env['transformers']}, deepspeed {report.get('deepspeed_version')}, "
           f"python {env['python']}" + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if env.get("cuda") else "")
           + (f", commit {env.get('git_commit')}" if env.get("git_commit") else "") + ".", "",
           "`llava.models.deepspeed_inference`: `deepspeed.init_inference` with tensor-parallel size 1 and kernel "
           "injection off; methods attached after it.", "", "## Summary", "", "| Check | Result |", "|---|---|"]
    for k, v in summ["checks"].items():
        out.append(f"| {k} | {'**FAIL**' if v == 'FAIL' else v} |")
    eq = report.get("equivalence")
    if eq is not None:
        cols = [(f, d) for f in cfg["families"] for d in cfg["dtypes"]]
        by = {(r["method"], r["family"], r["dtype"]): r for r in eq["results"]}
        out += ["", "## A. Plain vs DeepSpeed-wrapped: greedy tokens", "",
                f"Tiny random-weight models, seed {cfg['seed']}, loaded twice; the `mixed` batch of 3 (bench.gpu_check), "
                f"{cfg['new_tokens']} forced greedy tokens; each method attached to both after wrapping. Cell: verdict "
                "and the first step's max |delta logit|; n/a: the method does not support the family.", "",
                "| Method | " + " | ".join(f"{f} {d}" for f, d in cols) + " |", "|---|" + "---|" * len(cols)]
        for m in report["methods"]:
            cells = []
            for f, d in cols:
                r = by.get((m, f, d))
                if r is None:
                    cells.append("-")
                elif r["verdict"] == "n/a":
                    cells.append("n/a")
                elif r["verdict"] == "not run":
                    cells.append(f"not run ({r['not_run']})")
                elif r.get("error"):
                    cells.append("**crash**")
                else:
                    cells.append(("PASS" if r["verdict"] == "PASS" else "**FAIL**") + f" {r['first_logit_delta']:.2g}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out += ["", "| Model | dtype | weights equal after wrapping | wrapped params | seconds |", "|---|---|---|---|---|"]
        for mr in eq["models"]:
            out.append(f"| tiny:{mr['family']} | {mr['dtype']} | {mr.get('weights_equal', 'crash')} | "
                       f"{mr.get('ds_param_dtype', '-')} on {mr.get('ds_param_device', '-')} | {mr.get('seconds', '-')} |")
        crashes = [r for r in eq["results"] if r.get("error")]
        if crashes:
            out += ["", "### Crashes (last lines of the traceback)", ""]
            for r in crashes:
                out += [f"**{r['method']}**, {r['family']}, {r['dtype']}:", "", "```", *r["error"], "```", ""]
    t = report.get("ttft")
    if t is not None:
        out += ["", f"## B. TTFT: {t['model']}, {t['dtype']}, batch 1, plain vs DeepSpeed", ""]
        if t.get("skipped"):
            out.append(f"Skipped: {t['skipped']}.")
        else:
            if t.get("error"):
                out += ["```", *t["error"], "```", ""]
            out += [f"Random weights; budget {t['budget']}; {t['warmup']} warm-up and {t['runs']} timed prefills per "
                    f"method (bench.gpu_check.ttft_task); {t.get('image_px')} px images; model built in "
                    f"{t.get('build_seconds')} s" + (f"; peak {t['peak_gib']} GiB" if t.get("peak_gib") else "")
                    + ". The same runtime is timed plain first, then after `deepspeed_inference`.", "",
                    "| Method | Budget | Plain median (ms) | p90 | DeepSpeed median (ms) | p90 | DeepSpeed / plain |",
                    "|---|---|---|---|---|---|---|"]
            for r in t.get("table", []):
                if r.get("not_run"):
                    out.append(f"| {r['method']} | {G._fmt(r['budget'], 'd')} | not run ({r['not_run']}) | | | | |")
                    continue
                if r.get("error"):
                    out.append(f"| {r['method']} | {G._fmt(r['budget'], 'd')} | crash: `{G._short(r['error'])}` | | | | |")
                    continue
                ms = [G._fmt(r[k], ".2f") for k in ("plain_ms", "plain_p90_ms", "deepspeed_ms", "deepspeed_p90_ms")]
                out.append(f"| {r['method']} | {G._fmt(r['budget'], 'd')} | " + " | ".join(ms)
                           + f" | {G._fmt(r['ratio'], '.3f')} |")
    la = report.get("launcher")
    if la is not None:
        out += ["", "## C. The real launcher: scripts/eval/pope.sh, LAUNCHER=python vs deepspeed", "",
                f"POPE fixture (eval.fixtures, {la['n_answers']} questions), `MODEL={la['model']}`, fastv 8, "
                f"`--max-new-tokens {la['max_new_tokens']}`, NPROC=1. Verdict: **{la['verdict']}**"
                + (f" ({'; '.join(la['reasons'])})" if la["reasons"] else "; answers equal and nonempty") + ".", "",
                "| LAUNCHER | exit | wall (s) | answers | device | dtype | deepspeed in run_config |", "|---|---|---|---|---|---|---|"]
        for k, r in la["runs"].items():
            out.append(f"| {k} | {r.get('rc', '-')} | {r.get('seconds', '-')} | {len(r.get('answers') or {})} | "
                       f"{r.get('device', '-')} | {r.get('dtype', '-')} | {r.get('deepspeed') or '-'} |")
        ds = la["runs"].get("deepspeed", {})
        out += ["", f"deepspeed executable: `{la.get('deepspeed_exe')}`", "", "Commands:", "", "```"]
        out += [r.get("command", "") for r in la["runs"].values()]
        out += [f"# deepspeed launcher: {c}" for c in ds.get("deepspeed_cmd", [])]
        out += [f"# spawned: {c}" for c in ds.get("spawned", [])]
        out += ["```"]
        for k, r in la["runs"].items():
            if r.get("error"):
                out += ["", f"LAUNCHER={k} failed:", "", "```", *r["error"], "```"]
    return "\n".join(out) + "\n"


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


if __name__ == "__main__":
    sys.exit(main())

"""bench.deepspeed_check's verdicts (:func:`summarize`: one line per part, PASS / FAIL / PARTIAL) and the
markdown report of parts A, B and C."""

from __future__ import annotations

from bench import gpu_check as G


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
           "`llava.tp.deepspeed_inference`: `deepspeed.init_inference` with tensor-parallel size 1 and kernel "
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

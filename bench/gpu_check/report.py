"""The GPU check's report (bench/gpu_check/__init__.py writes it as JSON and markdown): the summary (``summarize``: a
PASS / FAIL per check and per method, PARTIAL when tasks were not run) and the markdown file (``markdown``:
the tiny-model tables, the crashes, the TTFT table, then the fast-path section of bench/gpu_check/fast_report.py)."""

from __future__ import annotations

from bench.gpu_check import fast, fast_report
from bench.gpu_check.config import FP32_LOGIT_TOL, CheckConfig, _fmt, _short
from bench.gpu_check.tiny import sync_verdict


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------


def summarize(report: dict, cfg: CheckConfig) -> dict:
    recs = report["tiny"]
    checks = {"batch==alone": True, "cached==no-cache": True, "no crash": True, "host syncs": True} if cfg.tiny else {}
    methods: dict[str, dict] = {}
    for r in recs:
        r["verdicts"]["syncs"] = sync_verdict(r, cfg.max_syncs_per_sample)
        crash = bool(r["error"]) or any("error" in sc or sc.get("cache", {}).get("error")
                                        or sc.get("batch_alone", {}).get("error") for sc in r["scenarios"].values()) \
            or "error" in (r.get("syncs") or {})
        ok = {"batch==alone": r["verdicts"]["batch_alone"]["pass"], "cached==no-cache": r["verdicts"]["cache"]["pass"],
              "no crash": not crash, "host syncs": r["verdicts"]["syncs"]["pass"]}
        m = methods.setdefault(r["method"], {"pass": True, "failed": [], "n/a": [], "not run": []})
        if r.get("not_run"):  # the time limit or a signal stopped the run first: neither a pass nor a failure
            m["not run"].append(f"{r['family']}, {r['dtype']}")
            continue
        if r.get("skipped"):  # the method does not support this family: not run, not a failure
            m["n/a"].append(f"{r['family']}, {r['dtype']}")
            continue
        m["ran"] = True
        for k, v in ok.items():
            checks[k] = checks.get(k, True) and v
            if not v:
                m["pass"] = False
                m["failed"].append(f"{k} ({r['family']}, {r['dtype']})")
    if report.get("ttft") is not None:
        t = report["ttft"]
        checks["TTFT runs"] = t.get("error") is None and all(x.get("error") is None for x in t["results"])
        for x in t["results"]:
            m = methods.setdefault(x["method"], {"pass": True, "failed": [], "n/a": [], "not run": []})
            if x.get("not_run"):
                m["not run"].append("TTFT")
            elif x.get("error"):
                m["ran"] = True
                m["pass"] = False
                m["failed"].append("TTFT (crash)")
    fast.summarize(report.get("fast"), checks, methods)
    labels = {k: "PASS" if v else "FAIL" for k, v in checks.items()}
    if cfg.max_syncs_per_sample is None and "host syncs" in labels:
        labels["host syncs"] = "reported (no limit set)"
    labels.update(fast.labels(report.get("fast")))
    every = report["tiny"] + ((report.get("ttft") or {}).get("results") or []) + fast.records(report.get("fast"))
    not_run = [r for r in every if r.get("not_run")]
    ok = all(checks.values())
    summ = {"pass": ok and not not_run, "partial": bool(not_run),
            "verdict": "FAIL" if not ok else "PARTIAL" if not_run else "PASS",
            "tasks": {"total": len(every), "run": len(every) - len(not_run), "not run": len(not_run),
                      "not run reason": sorted({r["not_run"] for r in not_run})},
            "checks": labels,
            "methods": {k: {"verdict": "FAIL" if not v["pass"] else "PARTIAL" if v["not run"] and v.get("ran")
                            else "not run" if v["not run"] else "PASS" if v.get("ran") else "n/a",
                            "failed": v["failed"], "n/a": v["n/a"], **({"not run": v["not run"]} if v["not run"] else {})}
                        for k, v in methods.items()}}
    if not_run:
        labels["all tasks run"] = (f"PARTIAL: {len(not_run)} of {len(every)} not run "
                                   f"({', '.join(summ['tasks']['not run reason'])})")
    return summ


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------


def _cell(r: dict) -> str:
    if r.get("skipped"):
        return "n/a"
    if r.get("not_run"):
        return f"not run ({r['not_run']})"
    if r["error"]:
        return "**crash**"
    v = r["verdicts"]
    bad = [k for k, name in (("batch_alone", "batch"), ("cache", "cache")) if not v[k]["pass"]]
    crash = any("error" in sc or sc.get("cache", {}).get("error") or sc.get("batch_alone", {}).get("error")
                for sc in r["scenarios"].values()) or "error" in (r.get("syncs") or {})
    parts = [{"batch_alone": "batch!=alone", "cache": "cache!=recompute"}[k] for k in bad]
    if crash:
        parts.append("crash")
    if not v["syncs"]["pass"]:
        parts.append("syncs")
    if parts:
        return "**FAIL**: " + ", ".join(parts)
    note = any(v[k]["notes"] for k in ("batch_alone", "cache"))
    return "ok*" if note else "ok"


def _agree(sc: dict, check: str) -> str:
    c = sc.get(check) if isinstance(sc, dict) else None
    if c is None or c.get("error") or ("error" in sc and check not in sc):
        return "crash"
    ss = c["samples"]
    n = sum(s["equal"] for s in ss)
    d1 = max((s["first_logit_delta"] for s in ss), default=None)
    d = max((s["max_logit_delta"] for s in ss), default=None)
    flag = "" if all(s.get("verdict", "PASS").startswith("PASS") for s in ss) else " **x**"
    return f"{n}/{len(ss)}, {_fmt(d1)}, {_fmt(d)}{flag}"


def markdown(report: dict) -> str:
    env, cfg, summ = report["environment"], report["config"], report["summary"]
    recs = report["tiny"]
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    out = [f"# GPU check: {dev}, {env['date']}", "",
           f"**Overall: {_overall(summ)}**", "",
           f"Device {env['device']}" + (f", driver {env['driver']}, CUDA {env['cuda']}" if env.get("gpu") else "")
           + f"; torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}"
           + (f"; commit {env['git_commit']}" if env.get("git_commit") else "") + ".",
           f"Command: `{report['command']}`; {report['seconds']:.0f} s.", "",
           "Tiny random-weight models (`tiny:<family>`, seed "
           f"{cfg['seed']}), every method at a budget that prunes (its own convention; table below), batches of 3: "
           "`mixed` (unequal prompts and images / crops / videos), `same-question` (equal questions, unequal images), "
           "Video-LLaVA also `video+images` (one video sample, two image samples). Greedy, "
           f"{cfg['new_tokens']} forced new tokens. batch==alone: each row of the batch against the sample run "
           "alone; cached==no-cache: cached generate against a no-cache greedy recompute with the recorded "
           f"selections (`engine.replay`). fp32 must agree exactly (tokens, and the logits of every step within {FP32_LOGIT_TOL:g}); "
           "fp16 / bf16 fail only where the unpruned model agrees and the logits up to the first differing token left "
           "the noise band (4x the unpruned model's own largest delta in that family and dtype, at least 2 ulp(1)); "
           "a flip inside it is a near tie. TF32 is off in the fp32 runs.", "",
           "## Summary", "", "| Check | Result |", "|---|---|"]
    if not cfg.get("tiny", True):  # --fast-only: the paragraph above describes checks that did not run
        out[7] = "Fast-path section only (`--fast-only`): no tiny-model batch / cache checks, no eager TTFT table."
    for k, v in summ["checks"].items():
        out.append(f"| {k} | {'**FAIL**' if v == 'FAIL' else v} |")
    if summ.get("partial"):
        out += ["", f"**Partial report**: {summ['tasks']['not run']} of {summ['tasks']['total']} tasks were not run "
                f"({', '.join(summ['tasks']['not run reason'])}); they are listed as `not run` below. The verdicts "
                "cover the tasks that ran."]
    cols = [(f, d) for f in cfg["families"] for d in cfg["dtypes"]] if cfg.get("tiny", True) else []
    by = {(r["method"], r["family"], r["dtype"]): r for r in recs}
    out += ["", "## Per method", "", "`ok*`: passed with a half-precision note (see the JSON); `n/a`: the method does not support the "
            "family (its `families`), not run; `not run (...)`: stopped before it by the time limit or a signal.", "",
            "| " + " | ".join(["Method", "Verdict", *(f"{f} {d}" for f, d in cols)]) + " |",
            "|---|---|" + "---|" * len(cols)]
    for m in report["methods"]:
        v = summ["methods"].get(m, {}).get("verdict", "-")
        cells = [_cell(by[(m, f, d)]) if (m, f, d) in by else "-" for f, d in cols]
        out.append("| " + " | ".join([m, "**FAIL**" if v == "FAIL" else v, *cells]) + " |")
    if not cfg.get("tiny", True):  # --fast-only: no tiny-model checks
        return _tail_sections(report, out)
    # host syncs: one pruned prefill of the `mixed` batch (3 samples), per sample
    sd = "float32" if "float32" in cfg["dtypes"] else cfg["dtypes"][0]
    limit = cfg.get("max_syncs_per_sample")
    syncs = ["", f"## Host syncs per sample ({sd})", "",
             "`llava.syncs.SyncCounter` around one pruned prefill (`model(**batch)`) of the `mixed` batch of 3, divided "
             "by 3 (total in brackets)" + (f"; limit {limit:g} per sample." if limit is not None else "; reported, no limit set."),
             "", "| Method | " + " | ".join(cfg["families"]) + " |", "|---|" + "---|" * len(cfg["families"])]
    for m in report["methods"]:
        cells = []
        for f in cfg["families"]:
            sy = (by.get((m, f, sd)) or {}).get("syncs") or {}
            if (by.get((m, f, sd)) or {}).get("skipped"):
                cells.append("n/a")
                continue
            if (by.get((m, f, sd)) or {}).get("not_run"):
                cells.append("not run")
                continue
            cells.append("crash" if "error" in sy else (f"{sy['per_sample']:.1f} ({sy['total']})" if sy else "-"))
        syncs.append(f"| {m} | " + " | ".join(cells) + " |")
    out += syncs
    # details
    for f in cfg["families"]:
        for d in cfg["dtypes"]:
            rows = [by[(m, f, d)] for m in report["methods"] if (m, f, d) in by]
            if not rows:
                continue
            names = list(next((r["scenarios"] for r in rows if r["scenarios"]), {}).keys())
            out += ["", f"### {f}, {d}", "",
                    "Cells: samples agreeing / 3, max |delta logit| of the first generated token, max |delta logit| "
                    "over the generated steps (up to the first differing token); **x** = failed. Tokens: visual tokens "
                    "entering the LLM / layer average / candidates per sample (`mixed`).", "",
                    "| Method | Budget | Tokens | " + " | ".join(f"batch==alone {n}" for n in names) + " | "
                    + " | ".join(f"cached==no-cache {n}" for n in names) + " | Syncs/sample (batch 3) |",
                    "|---|---|---|" + "---|" * (2 * len(names) + 1)]
            for r in rows:
                if r.get("skipped"):
                    out.append(f"| {r['method']} | n/a | {r['skipped']} |" + " |" * (2 * len(names) + 1))
                    continue
                if r.get("not_run"):
                    out.append(f"| {r['method']} | {_fmt(r.get('budget'), '')} | not run ({r['not_run']}) |"
                               + " |" * (2 * len(names) + 1))
                    continue
                if r["error"]:
                    out.append(f"| {r['method']} | {_fmt(r['budget'], '')} | crash: `{_short(r['error'])}` |"
                               + " |" * (2 * len(names) + 1))
                    continue
                toks = (r["scenarios"].get("mixed") or {}).get("tokens") or []
                tk = "; ".join(f"{s['visual_entering_llm']}/{s['visual_layer_avg']:.3g}/{s['visual_candidates']}" for s in toks)
                if r["method"] not in ("none",) and toks and not any(s["visual_layer_avg"] < s["visual_candidates"] for s in toks):
                    tk += " (did not prune)"
                ba = [_agree(r["scenarios"].get(n, {}), "batch_alone") for n in names]
                ca = [_agree(r["scenarios"].get(n, {}), "cache") for n in names]
                sy = r.get("syncs") or {}
                syc = "crash" if "error" in sy else (f"{sy['per_sample']:.1f} ({sy['total']})" if sy else "-")
                out.append(f"| {r['method']} | {_fmt(r['budget'], '')} | {tk} | " + " | ".join(ba + ca) + f" | {syc} |")
    return _tail_sections(report, out)


def _tail_sections(report: dict, out: list[str]) -> str:
    """The crash list, the TTFT table and the fast-path section after the tiny-model tables."""
    crashes = [(r, where, e) for r in report["tiny"] for where, e in _errors(r)]
    if crashes:
        out += ["", "## Crashes (last lines of the traceback)", ""]
        for r, where, e in crashes:
            out += [f"**{r['method']}**, {r['family']}, {r['dtype']}, {where}:", "", "```", *e, "```", ""]
    t = report.get("ttft")
    if t is not None:
        out += ["", f"## TTFT: {t.get('model')}, {t.get('dtype')}, batch 1", ""]
        if t.get("error"):
            out += ["```", *t["error"], "```"]
        else:
            out += [f"Random weights; budget {t['budget']} (each method's own convention), "
                    f"{t['warmup']} warm-up and {t['runs']} timed prefills (seeded random {t.get('image_px')} px images, "
                    f"{report['config']['ttft_text_words']}-word questions); model built in {t['build_seconds']} s"
                    + (f"; peak {t['peak_gib']} GiB" if t.get("peak_gib") else "") + "."
                    + (f" Device warmed first with {t['device_warmup']['prefills']} unpruned prefills "
                       f"({t['device_warmup']['seconds']} s)." if t.get("device_warmup") else "")
                    + (f" The unpruned model timed again after the last method: {t['drift']:+.1%} against the first "
                       "row; rows closer than that are not told apart." if t.get("drift") is not None else ""), "",
                    "| Method | Budget | Tokens in / layer avg | TTFT median (ms) | p90 | vision / selection / LLM (ms) "
                    "| Selection / unpruned TTFT | Speed-up |", "|---|---|---|---|---|---|---|---|"]
            for r in t["results"]:
                name = r["method"] + (" (again, last)" if r.get("again") else "")
                if r.get("not_run"):
                    out.append(f"| {name} | - | not run ({r['not_run']}) | | | | | |")
                    continue
                if r.get("error"):
                    out.append(f"| {name} | {_fmt(r['budget'], '')} | crash: `{_short(r['error'])}` | | | | | |")
                    continue
                ms = lambda s: _fmt(s["median"] * 1e3 if s else None, ".2f")  # noqa: E731
                out.append(f"| {name} | {_fmt(r['budget'], '')} | {r['visual_entering_llm']:.0f} / "
                           f"{r['visual_layer_avg']:.1f} | {ms(r['ttft'])} | {_fmt(r['ttft']['p90'] * 1e3, '.2f')} | "
                           f"{ms(r.get('t_vision'))} / {ms(r.get('t_selection'))} / {ms(r.get('t_llm'))} | "
                           f"{_fmt(r.get('selection_overhead'), '.1%')} | {_fmt(r.get('speedup'), '.2f')}x |")
    out += fast_report.markdown(report)
    return "\n".join(out) + "\n"


def _overall(summ: dict) -> str:
    v = summ.get("verdict") or ("PASS" if summ["pass"] else "FAIL")
    if summ.get("partial"):
        t = summ["tasks"]
        return (f"{v}" + (" (PARTIAL)" if v != "PARTIAL" else "")
                + f": {t['run']} of {t['total']} tasks run, {t['not run']} not run ({', '.join(t['not run reason'])})")
    return v


def _errors(r: dict):
    if r["error"]:
        yield "setup", r["error"]
        return
    for name, sc in r["scenarios"].items():
        if "error" in sc:
            yield name, sc["error"]
        for check in ("cache", "batch_alone"):
            if (sc.get(check) or {}).get("error"):
                yield f"{name} {check}", sc[check]["error"]
    if "error" in (r.get("syncs") or {}):
        yield "sync count", r["syncs"]["error"]

"""The fast-path section of the GPU check's markdown report (bench/gpu_check/fast.py): the equality table
(fast == uncompiled == eager engine, per family x dtype x method), the timing table with the issue's targets,
and the section's crashes."""

from __future__ import annotations

from bench.gpu_check.config import FP32_LOGIT_TOL, _fmt, _short
from bench.gpu_check.fast import agreement
from bench.gpu_check.fast_timing import _ms


def _crash(r: dict) -> str:
    return (r.get("exception") or "").replace("|", "\\|")[:160] or _short(r["error"])


def _eq_cell(r: dict, check: str) -> str:
    a = agreement(r, check)
    flag = "" if r["verdicts"][check]["pass"] else " **x**"
    return (f"{a['prompts_equal']}/{a['prompts']} ({a['tokens_equal']}/{a['tokens']} tok), "
            f"{_fmt(a['first_logit_delta'])}, {_fmt(a['max_logit_delta'])}{flag}")


def markdown(report: dict) -> list[str]:
    """The report's "Fast path" section (lines)."""
    f = report.get("fast")
    if not f:
        return []
    cfg = report["config"]
    c = f["coverage"]
    out = ["", "## Fast path (`load(..., fast=True)`)", "",
           "Tiny random-weight models (`tiny:<family>`, the families the fast path plans), batch 1, "
           f"{f['prompts']} prompts per method (unequal questions and images; Video-LLaVA alternates 8-frame videos "
           f"and images), {f['tokens']} forced greedy tokens each. Three runs per prompt: the fast path on the "
           f"device's backend ({f.get('backend')}{', CUDA graphs' if f.get('cuda_graphs') else ''}), the same fast "
           "path uncompiled (backend `none`), and the eager engine. Path: every prefill of a captured method took the "
           "fast path (`engine.stats.path`) with the eager engine's visual token counts; a method the fast path does "
           "not capture is listed as eager with its reason. "
           f"fp32: tokens equal and every step's logits within {FP32_LOGIT_TOL:g}; fp16 / bf16: as the tiny checks "
           "(the unpruned model is the half-precision reference; a method fails where it differs and the unpruned "
           "model does not, unless its logits stayed within 4x the unpruned model's own delta or its batch noise "
           "from the tiny check). Cells: prompts with all tokens equal / prompts (tokens equal up to the first "
           "difference / tokens), max |delta logit| of the first step, max over the steps up to the first "
           "difference; **x** = failed.", "",
           f"Coverage: **{c['prompts_at_32_tokens']}** prompts x >= 32 tokens compared with the eager engine, "
           f"{c['prompts_equal_at_32_tokens']} with every token equal (target >= 200, none failed: {c['verdict']}); "
           "all lengths, by dtype: "
           + (", ".join(f"{d} {x['prompts_equal']}/{x['prompts']} prompts, {x['tokens_equal']}/{x['tokens']} tokens "
                        "equal" for d, x in c["by_dtype"].items()) or "none") + ".", "",
           "| Family | Dtype | Method | Budget | Path | fast == uncompiled | fast == eager engine | Verdict |",
           "|---|---|---|---|---|---|---|---|"]
    for r in f["equality"]:
        head = f"| {r['family']} | {r['dtype']} | {r['method']} | {_fmt(r.get('budget'), '')} |"
        if r.get("not_run"):
            out.append(f"{head} not run ({r['not_run']}) | | | not run |")
            continue
        if r.get("skipped"):
            out.append(f"{head} {r['skipped']} | | | n/a |")
            continue
        if r.get("error"):
            out.append(f"{head} crash: `{_crash(r)}` | | | **FAIL** |")
            continue
        v = r["verdicts"]
        if not r.get("captured"):
            ec = r.get("eager_check") or {}
            reason = (r.get("refusal") or "").replace("|", "\\|")
            out.append(f"{head} eager: {reason} | - | - | "
                       + ("eager (not captured)" if v["path"]["pass"] else f"**FAIL**: took the {ec.get('path')} path")
                       + " |")
            continue
        ok = all(v[k]["pass"] for k in ("path", "uncompiled", "eager"))
        note = any(v[k]["notes"] for k in ("uncompiled", "eager"))
        graphs = sum(p["new_graph"] for p in r["prompts"])
        path = "fast" if v["path"]["pass"] else "**" + "; ".join(v["path"]["failed"]).replace("|", "\\|") + "**"
        out.append(f"{head} {path} ({graphs} graphs) | {_eq_cell(r, 'uncompiled')} | {_eq_cell(r, 'eager')} | "
                   + ("PASS*" if ok and note else "PASS" if ok else "**FAIL**") + " |")
    crashes = [r for r in f["equality"] if r.get("error") and not r.get("not_run")]
    t = f.get("timing")
    if t is not None:
        out += ["", f"### Fast-path timing: batch 1, {t['dtype']}", "",
                f"The fast path after warm-up ({t['warmup']} warm-up prefills; a timed prefill that still compiled a "
                f"graph is timed again), {t['runs']} timed prefills per row (seeded random images: LLaVA-1.5 336x336, "
                f"NeXT 672x672 in the `spatial` layout, {cfg['ttft_text_words']}-word questions), one synchronize "
                f"before and after each whole prefill (bench.efficiency's `measure`); TPOT over {t['decode_tokens']} "
                "generated tokens. Budget: the method's own convention (NeXT: total visual tokens / 5 per crop for the "
                "per-crop methods). Speed-up: the unpruned fast path's TTFT / the row's. Eager TTFT: the TTFT table "
                "above (same inputs), where it ran.", "",
                "| Model | Method | Tokens (budget) | Path taken | TTFT median / p90 (ms) | Speed-up | TPOT (ms) "
                "| Eager TTFT (ms) |", "|---|---|---|---|---|---|---|---|"]
        eager = {r["method"]: r for r in ((report.get("ttft") or {}).get("results") or []) if r.get("ttft")}
        for r in t["results"]:
            head = f"| {r['model']} | {r['method']} | {_fmt(r.get('tokens'), '')} ({_fmt(r.get('budget'), '')}) |"
            if r.get("not_run"):
                out.append(f"{head} not run ({r['not_run']}) | | | | |")
                continue
            if r.get("error"):
                out.append(f"{head} crash: `{_crash(r)}` | | | | |")
                crashes.append(r)
                continue
            taken = r["path_taken"] + ("" if r["path_taken"] == "fast" else
                                       ": " + "; ".join(r["path_reasons"]).replace("|", "\\|"))
            e = eager.get(r["method"]) if r["model"] == (report.get("ttft") or {}).get("model") else None
            out.append(f"{head} {taken} | {_fmt(_ms(r['ttft']), '.2f')} / {_fmt(r['ttft']['p90'] * 1e3, '.2f')} | "
                       f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt(_ms(r.get('tpot')), '.2f')} | "
                       f"{_fmt(_ms((e or {}).get('ttft')), '.2f')} |")
        out += ["", "Targets (reported, they do not fail the check):", ""]
        if t.get("targets"):
            out += [f"- {x['target']}: {x['shown']} - **{x['verdict']}**" for x in t["targets"]]
        if t.get("targets_note"):
            out.append(f"- {t['targets_note']}")
    if crashes:
        out += ["", "### Fast-path crashes (last lines of the traceback)", ""]
        for r in crashes:
            out += [f"**{r['method']}**, {r.get('family') or r.get('model')}, {r.get('dtype')}:", "", "```",
                    *r["error"], *([r["exception"]] if r.get("exception") else []), "```", ""]
    return out

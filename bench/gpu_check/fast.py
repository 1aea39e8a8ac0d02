"""The GPU check's fast-path section: ``load(..., fast=True)`` (llava/fast/path.py) on the device.

Two task kinds, run by the GPU check's task machinery (bench/gpu_check/__init__.py, bench/gpu_check/worker.py: worker
isolation, ``--time-limit``, the ``.partial.jsonl`` and ``--resume``); skip both with ``--no-fast``, the timing
with ``--no-fast-ttft`` (``--no-ttft`` skips every timing table):

* ``fast`` (equality), per tiny LLaVA family (llava, llava-next, video-llava: the families the fast path
  plans) x dtype (``--fast-dtypes``, default the check's) x method: ``--fast-prompts`` prompts at batch 1
  (unequal questions and images; Video-LLaVA alternates 8-frame videos and images), ``--fast-tokens``
  greedy tokens each (placeholders suppressed, forced length, as the tiny checks generate), three ways:
  the fast path with the device's backend (``--fast-backend``, default "auto": Inductor + CUDA graphs on
  CUDA, dynamo without code generation on a CPU), the same fast path with backend "none" (the captured
  Python function run uncompiled: "replay equals the eager fast path") and the eager engine (``load``
  without ``fast``). A captured method (``eng.fast.refusal is None``) must take the fast path on every
  prompt (``engine.stats.path == "fast"``) and give the uncompiled and the eager engine's tokens and visual
  token counts. fp32: tokens equal and every step's logits within ``FP32_LOGIT_TOL``. fp16 / bf16 are
  judged as the tiny checks judge them (:func:`bench.gpu_check.tiny.noise_tolerance`): the unpruned model is the
  half-precision reference, and a method fails on a prompt only where it differs and the unpruned model
  does not, unless its logits up to the first differing token stayed within 4x the larger of the unpruned
  model's own delta on that comparison and its batch==alone / cached==no-cache delta in the tiny check
  (its fp16 batch noise), at least 2 ulp(1). A method the fast path does not capture is listed as eager
  with its reason (one prompt confirms the prefill ran eagerly and says why), never as a failure.
* ``fast_ttft`` (timing), batch 1 in ``--ttft-dtype``: the fast path's TTFT median and TPOT on
  ``shape:llava-1.5-7b`` (unpruned and ``--fast-ttft-methods`` at ``--ttft-budget``) and on
  ``shape:llava-next-7b`` (672x672, ``spatial`` layout: 2880 visual tokens) at ``--fast-next-tokens`` total
  visual tokens (the per-crop methods get tokens / 5 per crop). Timed by bench.efficiency's ``measure``
  (warm-up prefills compile first, a timed prefill that still compiled is timed again; one synchronize
  before and after each whole prefill; TPOT = (generate N - generate 1) / (N - 1)). The issue's targets
  (:func:`target_verdicts`) are reported as met / missed; they do not fail the check, a crash does.

This file: the task list, the equality checks and their verdicts, the section's summary; the timing in
bench/gpu_check/fast_timing.py, the section's markdown in bench/gpu_check/fast_report.py.
"""

from __future__ import annotations

import torch

from bench.gpu_check.config import IMAGE_SIZES, NO_BUDGET, QUESTIONS, family_key, supported, tiny_budget
from bench.gpu_check.device import _recorded_with_cause, _unprune
from bench.gpu_check.fast_timing import (FAST_TTFT_METHODS, NEXT_CROPS, PER_SAMPLE_BUDGET, TARGET_MODEL,  # noqa: F401
                                         TARGET_NEXT, load_timing, next_budget, target_verdicts, timing_table,
                                         timing_task, ttft_budget)
from bench.gpu_check.tiny import _sample_verdict, build, compare, generate, noise_tolerance, rand_image

#: batch-1 prompts of unequal lengths (the tiny tokenizer splits unknown words into pieces)
FAST_QUESTIONS = QUESTIONS + ["describe the picture", "is there a red square in the top left corner of the image, "
                              "and if so what is next to it?", "why?"]
CHECKS = ("path", "uncompiled", "eager")  # an equality record's verdicts


def families(cfg) -> list[str]:
    """The families of the run the fast path plans (their record's ``fast``)."""
    from llava.families import registry

    return [f for f in cfg.families if registry.get(f).fast]


def fast_dtypes(cfg) -> list[str]:
    return list(cfg.fast_dtypes or cfg.dtypes)


def tasks(cfg, methods: list[str]) -> list[dict]:
    """The fast section's tasks: equality per family x dtype x method, then the timing rows."""
    if not cfg.fast:
        return []
    out = [{"kind": "fast", "family": f, "dtype": d, "method": m}
           for f in families(cfg) for d in fast_dtypes(cfg) for m in methods]
    if cfg.fast_ttft:
        tm = ["none"] + [m for m in (cfg.fast_ttft_methods or FAST_TTFT_METHODS) if m != "none"]
        out += [{"kind": "fast_ttft", "model": cfg.fast_ttft_model, "dtype": cfg.ttft_dtype, "method": m,
                 "tokens": None if m in NO_BUDGET else cfg.ttft_budget} for m in tm]
        if cfg.fast_next_model and cfg.fast_next_tokens:
            nm = [m for m in (cfg.fast_next_methods or tm) if m != "none"]
            out += [{"kind": "fast_ttft", "model": cfg.fast_next_model, "dtype": cfg.ttft_dtype, "method": "none",
                     "tokens": None}]
            out += [{"kind": "fast_ttft", "model": cfg.fast_next_model, "dtype": cfg.ttft_dtype, "method": m,
                     "tokens": int(n)} for n in cfg.fast_next_tokens for m in nm]
    return out


def context_key(t: dict) -> tuple:
    return ("fast", t["family"], t["dtype"]) if t["kind"] == "fast" else ("fast_ttft", t["model"])


def where(t: dict) -> str:
    """The task's column in the progress log."""
    if t["kind"] == "fast":
        return f"fast {t['family']} {t['dtype']}".ljust(22)
    return f"fast TTFT {t['model'].split(':')[-1]} {t.get('tokens') or ''}".ljust(22)


# ------------------------------------------------------------------------------------------------
# equality: fast (device backend) == fast uncompiled == eager engine
# ------------------------------------------------------------------------------------------------


def prompts(family: str, n: int, seed: int = 0) -> list[tuple]:
    """``n`` batch-1 samples (question, image or None, video frames or None) of unequal lengths and
    images: one NeXT crop grid (each grid / layout is its own graph: a compile per structure), and
    Video-LLaVA alternating 8-frame videos and images (two towers)."""
    from llava.families import registry

    rec = registry.get(family)
    out = []
    for i in range(n):
        q = FAST_QUESTIONS[i % len(FAST_QUESTIONS)]
        if rec.video_model and i % 2 == 0:
            out.append((q, None, [rand_image(1000 + 10 * i + j, 50, 50) for j in range(8)]))
            continue
        h, w = (56, 56) if rec.layout == "anyres" else IMAGE_SIZES[i % len(IMAGE_SIZES)]
        out.append((q, rand_image(100 + seed + i, h, w), None))
    return out


def load_equality(family: str, dtype: str, cfg) -> dict:
    from llava.models import load

    rt = load(f"tiny:{family}", seed=cfg.seed, dtype=dtype, device=cfg.device)
    return {"rt": rt, "prompts": prompts(family, cfg.fast_prompts, cfg.seed)}


def _attach(rt, method: str, budget, backend: str | None, slots: int, attention: str = "auto"):
    """``rt.prune`` with the fast path on ``backend`` (None: the eager engine), its prompt attention ``attention``."""
    rt.fast = {"backend": backend, "max_new_tokens": slots, "attention": attention} if backend else None
    try:
        return rt.prune(method, budget)
    finally:
        rt.fast = None


def _visual(eng) -> list:
    s = eng.stats.samples[0]
    return [int(s.visual_candidates), int(s.visual_entering_llm), round(float(s.visual_layer_avg), 3)]


def _run_prompts(rt, eng, batches, steps: int) -> list[tuple]:
    """Greedy tokens and logits of every prompt, with the path each prefill took."""
    out = []
    for b in batches:
        toks, logits = generate(rt, b, steps)
        st = eng.stats
        out.append((toks[0], logits[0], {"path": st.path, "path_reason": st.path_reason or None, "bucket": st.bucket,
                                         "new_graph": bool(st.new_graph), "visual": _visual(eng)}))
    return out


def equality_task(ctx: dict, t: dict, cfg) -> dict:
    """One method on one loaded tiny family and dtype: fast (device backend) vs fast uncompiled vs eager."""
    rt, samples, device = ctx["rt"], ctx["prompts"], cfg.device
    fam = family_key(t["family"])
    rec = {**t, "budget": None, "tokens": cfg.fast_tokens, "prompts": [], "error": None}
    if not supported(t["method"], fam):
        return {**rec, "skipped": f"n/a: {t['method']} does not support {fam}"}
    rec["budget"] = budget = tiny_budget(t["method"], fam)
    steps = cfg.fast_tokens
    try:
        with _recorded_with_cause(device, rec):
            batches = [build(rt, [s], device) for s in samples]
            eng = _attach(rt, t["method"], budget, cfg.fast_backend, steps, cfg.fast_attention)
            rec.update(backend=eng.fast.backend, cuda_graphs=bool(eng.fast.cuda_graphs),
                       refusal=eng.fast.refusal or None)
            if eng.fast.refusal:  # not captured: one prompt confirms it runs eagerly, and why
                _, _, info = _run_prompts(rt, eng, batches[:1], min(steps, 2))[0]
                rec["captured"] = False
                rec["eager_check"] = {"path": info["path"], "path_reason": info["path_reason"]}
                return rec
            rec["captured"] = True
            real = _run_prompts(rt, eng, batches, steps)
            rec["cudagraph_skips"] = list(eng.fast.cudagraph_skips)  # Inductor: graphs it compiled without CUDA graphs
            _unprune(rt)
            if hasattr(torch, "_dynamo"):  # this engine's graphs (and CUDA-graph pools) are not reused
                torch._dynamo.reset()
            eng = _attach(rt, t["method"], budget, "none", steps, cfg.fast_attention)
            uncompiled = _run_prompts(rt, eng, batches, steps)
            _unprune(rt)
            eng = _attach(rt, t["method"], budget, None, steps)
            eager = _run_prompts(rt, eng, batches, steps)
            for i, ((tk, lg, info), (tn, ln, inf_n), (te, le, inf_e)) in enumerate(zip(real, uncompiled, eager)):
                s = samples[i]
                rec["prompts"].append({
                    "input": "video" if s[2] is not None else "x".join(map(str, s[1].size[::-1])),
                    "prompt_length": int(batches[i]["input_ids"].shape[1]), **info,
                    "uncompiled_path": inf_n["path"], "uncompiled_visual": inf_n["visual"],
                    "eager_path": inf_e["path"], "eager_visual": inf_e["visual"],
                    "uncompiled": compare(tk, lg, tn, ln), "eager": compare(tk, lg, te, le)})
    finally:
        _unprune(rt)
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()
    return rec


def _batch_noise(tiny: list[dict], family: str, dtype: str) -> float | None:
    """The unpruned model's own largest batch==alone / cached==no-cache logit delta in the tiny check."""
    base = next((r for r in tiny if r["method"] == "none" and r["family"] == family and r["dtype"] == dtype
                 and not r.get("error")), None)
    ds = [s["max_logit_delta"] for sc in (base or {}).get("scenarios", {}).values() if isinstance(sc, dict)
          for c in ("batch_alone", "cache") for s in (sc.get(c) or {}).get("samples", [])]
    return max(ds) if ds else None


def judge(recs: list[dict], tiny: list[dict]) -> None:
    """A verdict per check of every equality record (in place): ``path`` (a captured method took the fast
    path on every prompt, and its visual token counts equal the eager engine's; an uncaptured one ran
    eagerly), ``uncompiled`` (== the same fast path run uncompiled) and ``eager`` (== the eager engine)."""
    base = {(r["family"], r["dtype"]): r for r in recs if r["method"] == "none" and r.get("prompts")}

    def whole(ok: bool, why: str) -> dict:  # a verdict on the record as a whole
        return {"pass": ok, "why": why, "failed": [] if ok else [why], "notes": []}

    for r in recs:
        r["verdicts"] = {}
        if r.get("skipped") or r.get("not_run"):
            why = "n/a" if r.get("skipped") else f"not run ({r['not_run']})"
            r["verdicts"] = {k: whole(True, why) for k in CHECKS}
            continue
        if r.get("error"):
            r["verdicts"] = {k: whole(False, "crash") for k in CHECKS}
            continue
        if not r.get("captured"):  # runs eagerly by design: the one prompt must have said so
            ok = (r.get("eager_check") or {}).get("path") == "eager"
            r["verdicts"] = {"path": whole(ok, f"eager: {r.get('refusal')}" if ok else "refused, yet on the fast path"),
                             "uncompiled": whole(True, "n/a (eager)"), "eager": whole(True, "n/a (eager)")}
            continue
        bad = [f"prompt {i}: {p['path']} ({p['path_reason']})" for i, p in enumerate(r["prompts"])
               if p["path"] != "fast" or p["uncompiled_path"] != "fast"]
        bad += [f"prompt {i}: visual tokens {p['visual'][:2]} != eager {p['eager_visual'][:2]}"
                for i, p in enumerate(r["prompts"]) if p["visual"][:2] != p["eager_visual"][:2]]
        r["verdicts"]["path"] = {"pass": not bad, "failed": bad, "notes": []}
        exact = r["dtype"] == "float32"
        b = base.get((r["family"], r["dtype"]))
        noise = None if exact else _batch_noise(tiny, r["family"], r["dtype"])
        for check in ("uncompiled", "eager"):
            tol = None
            if not exact:
                ds = [p[check]["max_logit_delta"] for p in (b or {}).get("prompts", [])] if b is not r else []
                tol = noise_tolerance(r["dtype"], max(ds + [noise or 0.0]))
            fails, notes = [], []
            ref = {"scenarios": {"prompts": {check: {"samples": [p[check] for p in b["prompts"]]}}}} if b else None
            for i, p in enumerate(r["prompts"]):
                s = p[check]
                v = _sample_verdict(s, exact, tol, ref, "prompts", check, i, r is b)
                if v.startswith("PASS (unpruned model: half-precision reference") and tol is not None:
                    v += (f"; logits within {s['max_logit_delta']:.3g} <= {tol:.3g}, the batch noise band"
                          if s["max_logit_delta"] <= tol else
                          f"; logits {s['max_logit_delta']:.3g} beyond the batch noise band {tol:.3g}")
                s["verdict"] = v
                if v == "FAIL":
                    fails.append(f"prompt {i}")
                elif v != "PASS":
                    notes.append(f"prompt {i}: {v}")
            r["verdicts"][check] = {"pass": not fails, "failed": fails, "notes": notes, "noise_tolerance": tol,
                                    "batch_noise": noise}


def coverage(eq: list[dict]) -> dict:
    """How many prompts x tokens the captured methods were compared with the eager engine on, per dtype,
    and the issue's bar: >= 200 prompts of >= 32 tokens, none of them failed."""
    ran = [r for r in eq if r.get("captured") and not r.get("error") and not r.get("not_run")]
    by = {}
    for r in ran:
        a, c = agreement(r, "eager"), by.setdefault(r["dtype"], {"prompts": 0, "prompts_equal": 0, "tokens": 0,
                                                                 "tokens_equal": 0})
        for k in c:
            c[k] += a[k]
    long = [r for r in ran if r["tokens"] >= 32]
    n = sum(len(r["prompts"]) for r in long)
    failed = sum(not r["verdicts"]["eager"]["pass"] for r in long)
    return {"by_dtype": by, "prompts_at_32_tokens": n, "prompts_equal_at_32_tokens":
            sum(agreement(r, "eager")["prompts_equal"] for r in long), "failed_cases": failed,
            "target": ">= 200 prompts x 32 tokens equal to the eager engine",
            "verdict": "met" if n >= 200 and not failed else "missed"}


def agreement(r: dict, check: str) -> dict:
    """Exact counts of one check: prompts with every token equal, tokens equal up to the first difference."""
    ps = [p[check] for p in r.get("prompts", [])]
    T = r.get("tokens") or 0
    return {"prompts": len(ps), "prompts_equal": sum(s["equal"] for s in ps),
            "tokens": len(ps) * T, "tokens_equal": sum(T if s["equal"] else s["diverge_step"] for s in ps),
            "first_logit_delta": max((s["first_logit_delta"] for s in ps), default=None),
            "max_logit_delta": max((s["max_logit_delta"] for s in ps), default=None)}


# ------------------------------------------------------------------------------------------------
# the report's section
# ------------------------------------------------------------------------------------------------


def section(cfg, recs: list[dict], tiny: list[dict]) -> dict | None:
    """The report's ``fast`` entry: the judged equality records, the coverage and the timing table."""
    if not cfg.fast:
        return None
    eq = [r for r in recs if r["kind"] == "fast"]
    judge(eq, tiny)
    return {"backend": next((r.get("backend") for r in eq if r.get("backend")), None),
            "cuda_graphs": next((r.get("cuda_graphs") for r in eq if r.get("backend")), None),
            "prompts": cfg.fast_prompts, "tokens": cfg.fast_tokens, "families": families(cfg),
            "dtypes": fast_dtypes(cfg),
            "equality": eq, "coverage": coverage(eq),
            "timing": timing_table([r for r in recs if r["kind"] == "fast_ttft"], cfg) if cfg.fast_ttft else None}


def records(fast: dict | None) -> list[dict]:
    if not fast:
        return []
    return fast["equality"] + ((fast.get("timing") or {}).get("results") or [])


def summarize(fast: dict | None, checks: dict, methods: dict) -> None:
    """Add the fast section's checks to ``checks`` and charge its failures to ``methods`` (in place)."""
    if not fast:
        return
    names = {"path": "fast path taken", "uncompiled": "fast == uncompiled", "eager": "fast == eager engine"}
    for k in names.values():
        checks.setdefault(k, True)
    for r in fast["equality"]:
        m = methods.setdefault(r["method"], {"pass": True, "failed": [], "n/a": [], "not run": []})
        if r.get("not_run"):
            m["not run"].append(f"fast {r['family']}, {r['dtype']}")
            continue
        if r.get("skipped"):  # the method does not support this family
            m["n/a"].append(f"fast {r['family']}, {r['dtype']}")
            continue
        m["ran"] = True
        for k, name in names.items():
            if not r["verdicts"][k]["pass"]:
                checks[name] = False
                m["pass"] = False
                m["failed"].append(f"{name} ({r['family']}, {r['dtype']})")
    t = fast.get("timing")
    if t is not None:
        checks["fast TTFT runs"] = all(not x.get("error") for x in t["results"])
        for x in t["results"]:
            m = methods.setdefault(x["method"], {"pass": True, "failed": [], "n/a": [], "not run": []})
            if x.get("not_run"):
                m["not run"].append(f"fast TTFT {x['model']}")
            elif x.get("error"):
                m["ran"] = True
                m["pass"] = False
                m["failed"].append(f"fast TTFT {x['model']} (crash)")


def labels(fast: dict | None) -> dict:
    """Informational summary lines (they never fail the check)."""
    if not fast:
        return {}
    c = fast["coverage"]
    out = {"fast coverage": f"{c['verdict']}: {c['prompts_at_32_tokens']} prompts x >= 32 tokens compared with the "
                            f"eager engine, {c['prompts_equal_at_32_tokens']} with every token equal (target >= 200)"}
    tg = (fast.get("timing") or {}).get("targets")
    if tg:
        c = {v: sum(x["verdict"] == v for x in tg) for v in ("met", "missed", "not measured")}
        out["fast targets"] = ", ".join(f"{n} {v}" for v, n in c.items() if n) + " (reported, not a failure)"
    return out

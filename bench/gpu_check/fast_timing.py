"""The fast-path section's timing (bench/gpu_check/fast.py, the ``fast_ttft`` tasks): batch-1 TTFT and TPOT of
the fast path on ``shape:llava-1.5-7b`` and ``shape:llava-next-7b`` (bench.efficiency's ``measure``), each
method in its own budget convention, and the issue's targets as met / missed (``target_verdicts``; they never
fail the check, a crash does) in the timing table."""

from __future__ import annotations

import torch

from bench.gpu_check.config import NO_BUDGET, TINY_BUDGETS, _fmt
from bench.gpu_check.device import _recorded_with_cause, _unprune

#: the timing rows of the issue's targets on the LLaVA-1.5-7B shapes (at --ttft-budget)
FAST_TTFT_METHODS = ["none", "fastervlm", "random", "visionzip", "divprune", "consensusdrop", "fastv", "pdrop"]
#: methods whose budget is the total per sample on LLaVA-NeXT (the others: per crop, or on the 576-token scale)
PER_SAMPLE_BUDGET = {"fastv", "attnmix", "dart"}
NEXT_CROPS = 5  # 672x672 under the spatial layout: the base crop and a 2x2 grid, 576 tokens each
TARGET_MODEL, TARGET_NEXT = "shape:llava-1.5-7b", "shape:llava-next-7b"


def next_budget(method: str, tokens: int):
    """A method's budget for ``tokens`` visual tokens in all on the 5-crop NeXT image, in its convention."""
    if method in NO_BUDGET:
        return None
    return tokens if method in PER_SAMPLE_BUDGET else tokens // NEXT_CROPS


def ttft_budget(method: str, cfg):
    """The LLaVA-1.5 timing budget (an adaptive method, TINY_BUDGETS None, chooses its own count)."""
    return None if method in NO_BUDGET or (method in TINY_BUDGETS and TINY_BUDGETS[method] is None) \
        else cfg.ttft_budget


def load_timing(model: str, cfg) -> dict:
    import time

    from bench.efficiency import default_image_hw, make_inputs
    from llava.models import load

    t0 = time.perf_counter()
    rt = load(model, dtype=cfg.ttft_dtype, device=cfg.device, next_layout="spatial", fast=True,
              fast_backend=cfg.fast_backend, fast_max_new_tokens=max(cfg.fast_tokens, 1),
              fast_attention=cfg.fast_attention)
    device = next(rt.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    hw = default_image_hw(rt)  # LLaVA-1.5 336x336 (576 tokens), NeXT 672x672 (5 crops, 2880 tokens)
    items = make_inputs(rt, max(cfg.ttft_runs, 1), cfg.ttft_text_words, 0, hw)
    return {"rt": rt, "device": device, "items": items, "image_hw": list(hw),
            "build_seconds": round(time.perf_counter() - t0, 1)}


def timing_task(ctx: dict, t: dict, cfg) -> dict:
    """Batch-1 fast-path TTFT and TPOT of one method (bench.efficiency.measure on the fast path)."""
    from bench.efficiency import BenchConfig, measure

    rt, device, m = ctx["rt"], ctx["device"], t["method"]
    budget = ttft_budget(m, cfg) if t["model"] != cfg.fast_next_model else next_budget(m, t["tokens"] or 0)
    rec = {**t, "budget": budget, "error": None, "build_seconds": ctx["build_seconds"], "image_hw": ctx["image_hw"]}
    bench = BenchConfig(model=t["model"], n=cfg.ttft_runs, warmup=cfg.ttft_warmup, batch_sizes=[1],
                        decode_tokens=cfg.fast_tokens, decode_samples=min(3, cfg.ttft_runs))
    try:
        with _recorded_with_cause(device, rec):
            res = measure(rt, m, budget, {}, ctx["items"][: cfg.ttft_runs], bench, device, path="fast")
            f = res.get("fast") or {}
            rec.update(ttft=res["ttft"], tpot=res["tpot"] or None, t_plan=res.get("t_plan") or None,
                       t_prefill_total=res.get("t_prefill_total") or None, path_taken=res["path_taken"],
                       path_reasons=res["path_reasons"], compiled_in_timed=res["compiled_in_timed"],
                       backend=f.get("backend"), cuda_graphs=f.get("cuda_graphs"), refusal=f.get("refusal"),
                       buckets=f.get("buckets"), visual_entering_llm=res["visual_entering_llm"],
                       visual_layer_avg=res["visual_layer_avg"])
            if res.get("peak_bytes"):
                rec["peak_gib"] = round(res["peak_bytes"] / 2**30, 2)
    finally:
        _unprune(rt)
    return rec


def _ms(s) -> float | None:
    return None if not s or s.get("median") is None else s["median"] * 1e3


def target_verdicts(ttft_ms: dict, tpot_ms: float | None = None, next_ms: dict | None = None) -> list[dict]:
    """The issue's targets (LLaVA-1.5-7B shapes, fp16, batch 1, the fast path after warm-up) as met / missed.

    ``ttft_ms``: TTFT medians (ms) by method, ``"none"`` the unpruned fast path, the others at 64 tokens;
    ``tpot_ms``: the unpruned fast path's TPOT; ``next_ms``: NeXT-7B (2880 tokens) TTFT medians, ``"none"``
    and ``(method, total visual tokens)``. A target whose row was not measured is "not measured"."""
    out = []

    def add(target, value, ok, shown):
        out.append({"target": target, "value": value, "shown": shown,
                    "verdict": "not measured" if ok is None else "met" if ok else "missed"})

    def le(x, limit):
        return None if x is None else x <= limit

    base = ttft_ms.get("none")
    add("unpruned TTFT <= 18 ms", base, le(base, 18.0), _fmt(base, ".2f") + " ms")
    for m, limit in (("fastervlm", 8.0), ("random", 8.0), ("visionzip", 8.0), ("divprune", 9.0), ("consensusdrop", 9.0)):
        x = ttft_ms.get(m)
        add(f"{m} at 64 TTFT <= {limit:g} ms", x, le(x, limit), _fmt(x, ".2f") + " ms")
        if limit == 8.0:
            ratio = base / x if base and x else None
            add(f"{m} at 64 >= 2x faster than the unpruned fast path", ratio,
                None if ratio is None else ratio >= 2.0, _fmt(ratio, ".2f") + "x")
    add("TPOT <= 7 ms (unpruned)", tpot_ms, le(tpot_ms, 7.0), _fmt(tpot_ms, ".2f") + " ms")
    nb = (next_ms or {}).get("none")
    rows = sorted(k for k in (next_ms or {}) if k != "none" and 160 <= k[1] <= 320)
    for m, n in rows:
        ratio = nb / next_ms[m, n] if nb and next_ms[m, n] else None
        add(f"NeXT-7B {m} at {n} tokens >= 4x faster than unpruned", ratio, None if ratio is None else ratio >= 4.0,
            _fmt(ratio, ".2f") + "x")
    if not rows:
        add("NeXT-7B at 160-320 tokens >= 4x faster than unpruned", None, None, "-")
    return out


def timing_table(recs: list[dict], cfg) -> dict:
    """The timing rows with the speed-up over each model's unpruned fast path, and the targets (from the rows
    whose timed prefills all took the fast path: another row's target is "not measured")."""
    base = {r["model"]: _ms(r.get("ttft")) for r in recs if r["method"] == "none"}
    for r in recs:
        x, b = _ms(r.get("ttft")), base.get(r["model"])
        if x and b:
            r["speedup"] = b / x
    out = {"model": cfg.fast_ttft_model, "next_model": cfg.fast_next_model, "dtype": cfg.ttft_dtype, "batch": 1,
           "warmup": cfg.ttft_warmup, "runs": cfg.ttft_runs, "decode_tokens": cfg.fast_tokens, "results": recs}
    on_target = cfg.fast_ttft_model == TARGET_MODEL and cfg.ttft_dtype == "float16"
    if on_target:
        fast = [r for r in recs if r.get("path_taken") == "fast"]  # a row that ran eagerly is not the fast path's
        main = {r["method"]: _ms(r.get("ttft")) for r in fast if r["model"] == TARGET_MODEL
                and (r["method"] == "none" or r.get("tokens") == 64)}
        tpot = next((_ms(r.get("tpot")) for r in fast if r["model"] == TARGET_MODEL and r["method"] == "none"), None)
        nxt = {("none" if r["method"] == "none" else (r["method"], r["tokens"])): _ms(r.get("ttft"))
               for r in fast if r["model"] == TARGET_NEXT} if cfg.fast_next_model == TARGET_NEXT else {}
        out["targets"] = target_verdicts(main, tpot, nxt)
        if cfg.ttft_budget != 64:
            out["targets_note"] = f"the targets are stated at 64 tokens; this run timed {cfg.ttft_budget}"
    else:
        out["targets"] = None
        out["targets_note"] = f"the targets are stated for {TARGET_MODEL} in float16 (this run: " \
                              f"{cfg.fast_ttft_model}, {cfg.ttft_dtype})"
    return out

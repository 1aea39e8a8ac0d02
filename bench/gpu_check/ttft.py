"""The GPU check's TTFT table (bench/gpu_check/__init__.py; ``--no-ttft`` skips it): ``--ttft-model`` (default
``shape:llava-1.5-7b``: real shapes, random weights) in ``--ttft-dtype``, the unpruned model and every method at
``--ttft-budget``, batch 1: median TTFT with the engine's vision / selection / LLM breakdown, timed with
bench.efficiency's helpers. Before the first row the device is warmed with unpruned prefills for
``--ttft-device-warmup`` seconds, and the unpruned model is timed again after the last method: a GPU's clocks
and caches make the first rows of a cold run slow (the H200 run of 2026-11-26 timed the unpruned model first at
52 ms with a 15 ms vision tower that took 9 ms in every later row), and the drift between the two unpruned rows
bounds how far apart two rows of one table can be compared. bench.deepspeed_check times its plain and wrapped runtimes with the same task."""

from __future__ import annotations

import statistics
import time

import torch

from bench.gpu_check.config import NO_BUDGET, TINY_BUDGETS, CheckConfig
from bench.gpu_check.device import _finish, _recorded, _unprune


def _load_ttft(cfg: CheckConfig) -> dict:
    from bench.efficiency import build_batch, make_inputs
    from llava.models import load

    t0 = time.perf_counter()
    rt = load(cfg.ttft_model, dtype=cfg.ttft_dtype, device=cfg.device)
    device = next(rt.model.parameters()).device
    _finish(device)
    size = rt.model.config.vision_config.image_size
    items = make_inputs(rt, max(cfg.ttft_runs, 1), cfg.ttft_text_words, 0, (size, size))
    ctx = {"rt": rt, "device": device, "batches": [build_batch(rt, [it], device) for it in items],
           "build_seconds": round(time.perf_counter() - t0, 1), "image_px": size}
    ctx["device_warmup"] = _warm_device(ctx, cfg.ttft_device_warmup)
    return ctx


def _warm_device(ctx: dict, seconds: float) -> dict | None:
    """Unpruned prefills for ``seconds`` (at least one): what the first timed row would otherwise pay alone.
    Returns the seconds spent and the prefills run (None when ``seconds`` <= 0: no warm-up)."""
    from bench.efficiency import prefill_once

    if seconds <= 0:
        return None
    t0, n = time.perf_counter(), 0
    while (n == 0 or time.perf_counter() - t0 < seconds):
        prefill_once(ctx["rt"], ctx["batches"][n % len(ctx["batches"])], ctx["device"])
        n += 1
    return {"seconds": round(time.perf_counter() - t0, 2), "prefills": n}


def ttft_task(ctx: dict, method: str, cfg: CheckConfig, again: int = 0) -> dict:
    """Batch-1 TTFT of one method on the loaded ``--ttft-model``: warm-ups, then timed prefills. ``again``: the
    unpruned model's closing re-time (1), reported beside the first."""
    from bench.efficiency import prefill_once, summary

    rt, batches, device = ctx["rt"], ctx["batches"], ctx["device"]
    # an adaptive method (budget None in TINY_BUDGETS, e.g. PruMerge) chooses its own count here too
    budget = None if method in NO_BUDGET or (method in TINY_BUDGETS and TINY_BUDGETS[method] is None) \
        else cfg.ttft_budget
    rec = {"kind": "ttft", "method": method, "budget": budget, "error": None, "build_seconds": ctx["build_seconds"],
           "image_px": ctx["image_px"], "device_warmup": ctx.get("device_warmup")}
    if again:
        rec["again"] = again
    try:
        with _recorded(device, rec):
            eng = rt.prune(method, budget)
            for i in range(cfg.ttft_warmup):
                prefill_once(rt, batches[i % len(batches)], device)
            ttft, parts, toks = [], {}, []
            for b in batches[: cfg.ttft_runs]:
                t, o = prefill_once(rt, b, device)
                ttft.append(t)
                for k, v in eng.stats.timings.items():
                    parts.setdefault(k, []).append(v)
                toks.append((eng.stats.samples[0].visual_entering_llm, eng.stats.samples[0].visual_layer_avg))
                del o
            rec.update(ttft=summary(ttft), **{f"t_{k}": summary(v) for k, v in parts.items()},
                       visual_entering_llm=statistics.fmean(a for a, _ in toks),
                       visual_layer_avg=statistics.fmean(b for _, b in toks))
            if device.type == "cuda":
                rec["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    finally:
        _unprune(rt)
    return rec


def ttft_table(recs: list[dict], cfg: CheckConfig) -> dict:
    """The TTFT records as one table, with speed-up and selection overhead against the unpruned row."""
    out = {"model": cfg.ttft_model, "dtype": cfg.ttft_dtype, "budget": cfg.ttft_budget, "batch": 1,
           "warmup": cfg.ttft_warmup, "runs": cfg.ttft_runs, "results": recs,
           "build_seconds": next((r.get("build_seconds") for r in recs if r.get("build_seconds")), None),
           "peak_gib": max((r.get("peak_gib") or 0 for r in recs), default=0) or None,
           "image_px": next((r.get("image_px") for r in recs if r.get("image_px")), None),
           "device_warmup": next((r.get("device_warmup") for r in recs if r.get("device_warmup")), None)}
    base = next((r.get("ttft") for r in recs if r["method"] == "none" and not r.get("again")), None)
    last = next((r.get("ttft") for r in recs if r["method"] == "none" and r.get("again")), None)
    if base and last:  # how far the device moved between the first and the last row
        out["drift"] = last["median"] / base["median"] - 1
    for r in recs:
        if base and r.get("ttft"):
            r["speedup"] = base["median"] / r["ttft"]["median"]
            if r.get("t_selection"):
                r["selection_overhead"] = r["t_selection"]["median"] / base["median"]
    return out

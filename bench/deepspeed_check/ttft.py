"""Part B of bench.deepspeed_check: batch-1 TTFT per method (bench.gpu_check's ``ttft_task``), first on the
plain runtime, then on the same runtime wrapped by ``deepspeed_inference``; medians and their ratio."""

from __future__ import annotations

import torch

from bench import gpu_check as G
from bench.deepspeed_check.config import Budget, DSCheckConfig
from llava.families.registry import DEFAULT_MODEL


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
        res["skipped"] = f"{cfg.ttft_model} is too large for a CPU run (use --ttft-model {DEFAULT_MODEL})"
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

"""Part A of bench.deepspeed_check: every tiny family and dtype loaded twice with the same seed, the second
copy wrapped by ``deepspeed_inference`` (tp_size 1); each method attached to both must give the same greedy
tokens on bench.gpu_check's ``mixed`` batch."""

from __future__ import annotations

import os
import time

import torch

from bench import gpu_check as G
from bench.deepspeed_check.config import Budget, DSCheckConfig, _fam, _supports, budget_for


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

"""The efficiency benchmark's timers: one synchronised prefill (:func:`prefill_once`, the TTFT), its launch
count per engine phase (:func:`prefill_ops`), the decode time per step inside one ``generate`` call
(:func:`decode_step_time`), the unpruned LLM's prefill time over a sweep of lengths (:func:`llm_sweep`, the
roofline's points), and :func:`measure`: everything for one method x budget, on the eager engine or the fast
path."""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench.efficiency.cost import cache_bytes, hybrid_spec, llm_dims, prefill_macs
from bench.efficiency.inputs import build_batch
from llava.cost import prompt_kv_bytes


_IMPORTED = time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (the kernel's start time of the process, Linux ``/proc``; elsewhere since
    this module's import): where a process's first token falls from its start."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime (clock ticks since boot)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def precompile_record(fast) -> dict | None:
    """The fast path's precompiled functions (``llava.fast.precompile``) of an engine: how many this process compiled
    and saved, and loaded, and how many files it found saved for something else (stale: compiled afresh); None when its functions are not precompiled (off, another backend, or a build that falls
    back to the regular compile)."""
    fns = [getattr(fast, n, None) for n in ("_tower", "_prefill", "_decode")]
    fns = [f for f in fns if hasattr(f, "loaded") and hasattr(f, "compiled")]
    if not fns:
        return None
    return {"folder": getattr(fast, "precompile", None), "compiled": sum(f.compiled for f in fns),
            "loaded": sum(f.loaded for f in fns), "stale": sum(getattr(f, "stale", 0) for f in fns),
            "refused": [f.refused for f in fns if getattr(f, "refused", None)]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {}
    return {"median": statistics.median(xs), "p90": _pct(xs, 0.9), "mean": statistics.fmean(xs),
            "std": statistics.pstdev(xs), "n": len(xs)}


def prefill_once(rt, batch, device):
    """One TTFT measurement: prefill keeping the last-position logits, greedy pick on the host."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = rt.model(**batch, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).cpu()
    _sync(device)
    return time.perf_counter() - t0, out


def prefill_ops(rt, batch) -> dict:
    """Launching aten ops (``llava.syncs.OpCounter``) of one :func:`prefill_once`, split as the engine
    splits its time: while counting, the engine's phase clock (``PruningEngine.clock``) reads the op count
    instead of the time, so ``PrefillStats.timings`` holds op counts per phase. ``total`` also covers what
    runs after the engine (LM head, greedy pick: ``other``); ``syncs`` = host syncs in the same pass. The
    split is left out (total only) when no engine is attached."""
    from llava.syncs import OpCounter

    counter = OpCounter(syncs=True)
    eng = getattr(rt, "engine", None)
    if eng is not None:
        eng.stats = None
        eng.clock = lambda: float(counter.op_total)  # the engine's phase clock reads the op count
    try:
        with torch.inference_mode(), counter:
            out = rt.model(**batch, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).cpu()
    finally:
        if eng is not None:
            eng.clock = None
    del out
    res = {"total": counter.op_total}
    timings = getattr(getattr(eng, "stats", None), "timings", None) or {}
    if {"vision", "selection", "llm", "prefill_total"} <= set(timings):
        res.update({k: int(round(timings[k])) for k in ("vision", "selection", "llm", "prefill_total")})
        res["other"] = res["total"] - res["prefill_total"]
    res["syncs"] = counter.sync_total
    res["by_op"] = dict(sorted(counter.ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return res


def generate_time(rt, batch, device, new_tokens: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        rt.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    return time.perf_counter() - t0


class _StepClock:
    """A logits processor that reads the clock (after a device sync) each time ``generate`` has a token's
    logits: right after the prefill, then after every decode step."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def decode_step_time(rt, batch, device, new_tokens: int) -> float:
    """Time per decode step inside ONE ``generate`` call of ``new_tokens`` forced tokens: from the first token's
    logits (the prefill's end) to the last one's, over ``new_tokens - 1`` steps. The prefill is not in it (the older
    difference of two ``generate`` timings carried the prefill's noise, which exceeds the decode time on a CPU)."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError("decode_step_time needs at least 2 new tokens")
    clock = _StepClock(device)
    with torch.inference_mode():
        rt.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList([clock]))
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"generate produced {len(clock.times)} tokens' logits, expected {new_tokens}")
    return (clock.times[-1] - clock.times[0]) / (new_tokens - 1)


def llm_sweep(rt, lengths: list[int], device, repeats: int = 3) -> list[tuple[int, float]]:
    """Unpruned LLM prefill time (decoder + norm + last-position head) on text-only inputs of length n."""
    lm, head = rt.model.model.language_model, rt.model.lm_head
    emb = lm.embed_tokens.weight
    pts = []
    for n in lengths:
        x = emb[torch.randint(0, emb.shape[0], (1, n), generator=torch.Generator().manual_seed(n)).to(emb.device)]
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                h = lm(inputs_embeds=x, use_cache=False).last_hidden_state
                head(h[:, -1:]).argmax(-1).cpu()
            _sync(device)
            times.append(time.perf_counter() - t0)
        pts.append((n, statistics.median(times[1:])))  # first run = warm-up for the shape
    return pts


def attach(rt, method: str, budget, opts: dict, path: str = "eager"):
    """``rt.prune`` on the requested path: "eager" = the eager engine (also on a runtime loaded with
    ``fast=True``), "fast" = with the runtime's fast path (``load(..., fast=True)``)."""
    if path == "fast":
        if rt.fast is None:
            raise ValueError("the fast path needs a runtime loaded with fast=True")
        return rt.prune(method, budget, **opts)
    saved, rt.fast = rt.fast, None
    try:
        return rt.prune(method, budget, **opts)
    finally:
        rt.fast = saved


def timed_prefill(rt, batch, device, eng) -> tuple[float, object, int]:
    """:func:`prefill_once` with compile / capture warm-up excluded: a prefill that compiled or captured a
    new fast-path graph (``engine.stats.new_graph``) is run again and the second (warm) run is timed.
    Returns (seconds, output, prefills that compiled here)."""
    ttft, out = prefill_once(rt, batch, device)
    compiled = 0
    while eng.stats is not None and eng.stats.new_graph and compiled < 2:
        compiled += 1
        del out
        ttft, out = prefill_once(rt, batch, device)
    if eng.stats is not None and eng.stats.new_graph:
        raise RuntimeError("a fast-path prefill compiled a new graph on every run of the same input")
    return ttft, out, compiled


def _path_of(recs: list[dict]) -> tuple[str, dict]:
    """("fast" | "eager" | "mixed", {eager reason: count}) of timed prefills."""
    paths = {r["path"] for r in recs}
    reasons: dict = {}
    for r in recs:
        if r["path"] == "eager" and r.get("path_reason"):
            reasons[r["path_reason"]] = reasons.get(r["path_reason"], 0) + 1
    return (paths.pop() if len(paths) == 1 else "mixed"), reasons


def measure(rt, method: str, budget, opts: dict, items, cfg, device, path: str = "eager") -> dict:
    """All measurements for one method x budget, on the eager engine (``path="eager"``) or with the
    runtime's fast path (``"fast"``: ``engine.stats.path`` of every timed prefill is recorded; a method the
    fast path does not capture runs eagerly there, and the row says so)."""
    eng = attach(rt, method, budget, opts, path)
    fast = path == "fast"
    d, m, L, d_kv = llm_dims(rt.model.config)
    spec = hybrid_spec(rt.model.config)
    batch1 = [build_batch(rt, [it], device) for it in items]
    start_age = process_age()
    t0 = time.perf_counter()
    first = None  # the cell's first prefill: its time (on the fast path compile / capture / load) and its end's
    for b in batch1[: cfg.warmup]:  # warm-up on representative inputs (shapes of the first samples)
        prefill_once(rt, b, device)
        if first is None:
            first = {"first_prefill_s": time.perf_counter() - t0, "first_token_process_s": process_age()}
    warmup_s = time.perf_counter() - t0  # on the fast path: mostly compile and capture
    # launch count, once, outside the timed runs (eager engine only: a captured prefill is one graph)
    ops = None if fast else prefill_ops(rt, batch1[0])
    rec = []
    for b in batch1:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t1 = time.perf_counter()
        ttft, out, compiled = timed_prefill(rt, b, device, eng)
        if first is None:  # no warm-up: the first timed prefill (with a compile, timed again) is the first
            first = {"first_prefill_s": time.perf_counter() - t1, "first_token_process_s": process_age()}
        st = eng.stats
        s = st.samples[0]
        if st.path == "fast":  # a static cache of bucket + decode slots, allocated whole; the LLM ran on the bucket
            kv, _ = cache_bytes(out.past_key_values)
            lens = list(st.seq_len_per_layer)
        else:  # a hybrid model's linear layers keep no length: the length they ran on, from the engine's stats
            kv, lens = cache_bytes(out.past_key_values)
            lens = [n if n is not None else st.seq_len_per_layer[i] for i, n in enumerate(lens)]
        text_tokens = int(b["attention_mask"].sum()) - s.visual_candidates
        analytic_lens = [text_tokens + v for v in s.visual_per_layer]
        rec.append({
            "ttft": ttft, **{f"t_{k}": v for k, v in st.timings.items()},
            "path": st.path, "path_reason": st.path_reason, "bucket": st.bucket, "compiled_before_timing": compiled,
            "visual_candidates": s.visual_candidates, "visual_entering_llm": s.visual_entering_llm,
            "visual_layer_avg": s.visual_layer_avg, "layer_lengths": lens,
            "kv_bytes": kv,
            "kv_bytes_analytic": prompt_kv_bytes(rt.model.config, analytic_lens, rt.model.dtype.itemsize),
            "macs_A": prefill_macs(lens, d, m, "A", d_kv, spec), "macs_B": prefill_macs(lens, d, m, "B", d_kv, spec),
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        })
        del out
    res = {"method": method, "budget": budget, "options": opts, "config": eng.method.config(), "records": rec,
           "ops": ops, "path": path, "warmup_s": warmup_s, "process_s_at_start": start_age, **(first or {})}
    res["path_taken"], res["path_reasons"] = _path_of(rec)
    res["compiled_in_timed"] = sum(r["compiled_before_timing"] for r in rec)
    if fast and eng.fast is not None:
        res["fast"] = {"backend": eng.fast.backend, "cuda_graphs": bool(eng.fast.cuda_graphs),
                       "max_new_tokens": eng.fast.max_new_tokens, "refusal": eng.fast.refusal or None,
                       "regional": eng.fast.regional, "compile_cache": eng.fast.cache_dir,
                       # Inductor + CUDA graphs: the functions it compiled without a CUDA graph, and why
                       "cudagraph_skips": list(getattr(eng.fast, "cudagraph_skips", [])),
                       "buckets": sorted({r["bucket"] for r in rec if r["bucket"] is not None})}
    for key in ("ttft", "t_vision", "t_selection", "t_llm", "t_plan", "t_plan_exposed", "t_prefill_total"):
        res[key] = summary([r.get(key) for r in rec])
    for key in ("visual_entering_llm", "visual_layer_avg", "kv_bytes", "kv_bytes_analytic", "macs_A", "macs_B"):
        res[key] = statistics.fmean(r[key] for r in rec)
    # a fast prefill's static cache holds bucket + decode slots: no per-token KV accounting to compare
    res["kv_match"] = (all(r["kv_bytes"] == r["kv_bytes_analytic"] for r in rec)
                       if res["path_taken"] == "eager" else None)
    res["peak_bytes"] = max((r["peak_bytes"] or 0) for r in rec) or None
    # decode time per output token, forced length: the steps after the prefill, inside one generate call
    dec = []
    if fast and cfg.decode_samples and cfg.decode_tokens > 1 and batch1:  # compile the decode graph first
        generate_time(rt, batch1[0], device, cfg.decode_tokens)
    for b in batch1[: cfg.decode_samples]:
        if cfg.decode_tokens > 1:
            dec.append(decode_step_time(rt, b, device, cfg.decode_tokens))
    res["tpot"] = summary(dec)
    # batch B
    res["batched"] = {}
    for bs in cfg.batch_sizes:
        if bs == 1:
            continue
        groups = [items[i:i + bs] for i in range(0, len(items) - bs + 1, bs)] or [items[:bs]]
        bb = [build_batch(rt, g, device) for g in groups]
        prefill_once(rt, bb[0], device)
        times, brec = [], []
        for b in bb:
            t, out, compiled = timed_prefill(rt, b, device, eng)
            del out
            times.append(t)
            brec.append({"path": eng.stats.path, "path_reason": eng.stats.path_reason, "compiled": compiled})
        med = statistics.median(times)
        taken, reasons = _path_of(brec)
        res["batched"][str(bs)] = {"ttft": summary(times), "samples_per_s": bs / med, "n_batches": len(bb),
                                   "path_taken": taken, "path_reasons": reasons,
                                   "compiled_in_timed": sum(r["compiled"] for r in brec)}
    if fast and eng.fast is not None:  # after the decode: its function is compiled (or loaded) by now
        res["fast"]["precompile"] = precompile_record(eng.fast)
        res["fast"]["precompile_requested"] = getattr(eng.fast, "precompile_requested", None)
    rt.unprune()
    if fast and hasattr(torch, "_dynamo"):  # this engine's graphs (and CUDA-graph pools) are not reused
        torch._dynamo.reset()
    return res

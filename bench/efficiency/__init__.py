"""Efficiency benchmark: TTFT (with its vision / selection / LLM breakdown), decode time per token,
KV-cache bytes, peak memory and analytic prefill FLOPs, for the unpruned model and methods x budgets
in one run (the protocol and the formulas: docs/efficiency.md, "What is measured, and how").

    python -m bench.efficiency --model shape:llava-1.5-7b --dtype float16 --device cuda \
        --methods none consensusdrop visiondrop attnmix fastv --budgets 192 128 64 --n 200 --batch 1 8

Outputs (``--out DIR``, default ``runs/efficiency``; ``scripts/bench/efficiency.sh`` names a folder under
docs/results/ for a committed report): ``efficiency.json`` (every per-sample record, the environment, the cost model
and the bar checks), ``efficiency.md`` (the tables) and ``efficiency.png``
(TTFT and KV vs visual tokens per method), written at the end; ``cells.jsonl`` gets each cell's row as it ends
(its headline numbers - TTFT / TPOT / selection medians, warm-up seconds: compile and capture on the fast path -
and the whole result with the configuration's fingerprint). A run stopped by SIGTERM (``timeout``, a Slurm limit)
or Ctrl-C writes the report from the rows it has (no cost model, exit status 124 / 130); ``--resume`` reuses the
rows of an earlier run of the same configuration and measures the rest; a cell that raises is recorded (its
error in the report) and the run goes on. ``--device-warmup S`` runs unpruned prefills for S seconds before the
first row, ``--retime-none`` times the unpruned row again after the last method (the report gives the drift).

Launch count (``ops`` / ``extra_ops`` in the JSON, the last two table columns): the aten ops that would
launch a GPU kernel or memcpy (``llava.syncs.OpCounter``: views, allocations and host-side work not
counted) of one batch-1 prefill on the first input, counted once per method x budget outside the timed
runs and split as the engine splits the time (vision / selection / llm, plus ``other`` = LM head and the
greedy pick). ``extra_ops`` = total minus the unpruned model's total on the same input. At batch 1 an
eager 7B prefill on an H100 is launch-bound (docs/results/efficiency-h100.md), so ``extra_ops`` x ~10-15 us
estimates a method's selection overhead there from a CPU run.

``--fast``: every (method, budget, batch) cell also runs with ``load(..., fast=True)`` (llava/fast/path.py),
right after its eager run, and ``efficiency.md`` gets a "Fast path vs eager engine" section with the two
rows side by side and the fast / eager TTFT (and TPOT) ratio (``efficiency.json``: ``fast.results`` and
``fast.comparison``). The fast rows exclude compile / capture: warm-up prefills first, and a timed prefill
that still compiled a graph (``engine.stats.new_graph``) is run again and counted. Each fast row states the
path its prefills actually took (``engine.stats.path``): a method the fast path does not capture runs
eagerly there, and the row says so with the reason. The main table, the bars and the plot are the eager rows.

Cost model for the speed-up bar (stated in every output): the LLM prefill time of the *unpruned* model
is measured on text-only inputs over a sweep of sequence lengths n and fitted with a roofline
``T(n) = max(T_floor, a + k F(n))`` (F = convention-B MACs; the floor is the weight-read-bound regime,
the linear part the FLOPs-bound one). A method's predicted TTFT = its measured vision + selection time
+ sum over layers of T(n_l) / L at its actual per-layer lengths n_l.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

# The benchmark by purpose; every name is re-exported here (``from bench.efficiency import measure``):
#   cost: the analytic model (prefill MACs, KV bytes per token, the roofline fit)
#   inputs: BenchConfig, the synthetic images and questions, the processor's batch
#   timing: the timers (prefill_once, prefill_ops, decode_step_time, llm_sweep) and measure (one method x budget)
#   hardware: the device's measured copy bandwidth and matmul peak; floor: each fast-table row's physical floor
#   report: the environment, the bars, the fast-vs-eager rows, efficiency.md / .png, W&B
# This module: run (the whole table, the files) and main (the command line).
from bench.efficiency.cost import (HybridSpec, Roofline, attention_layers, cache_bytes, fit_roofline, hybrid_spec,
                                   kv_bytes_per_token, layer_macs, linear_layer_macs, llm_dims, prefill_macs)
from bench.efficiency.floor import FLOOR_RULE, add_floors, row_floor, vision_flops, weight_bytes
from bench.efficiency.hardware import copy_bandwidth, matmul_peak
from bench.efficiency.hardware import describe as describe_hardware
from bench.efficiency.hardware import measure as measure_hardware
from bench.efficiency.inputs import (LAYOUT_IMAGE_HW, BenchConfig, build_batch, default_image_hw, describe_inputs,
                                     make_inputs, parse_method)
from bench.efficiency.report import (check_bars, cpu_model, environment, fast_comparison, fast_markdown, label,
                                     log_wandb, markdown, plot)
from bench.efficiency.timing import (attach, decode_step_time, generate_time, llm_sweep, measure, prefill_once,
                                     prefill_ops, process_age, summary, timed_prefill)
from llava.fast.precompile import wanted as precompile_wanted
from llava.method import method_class

__all__ = [
    # cost
    "layer_macs", "HybridSpec", "hybrid_spec", "linear_layer_macs", "prefill_macs", "llm_dims", "kv_bytes_per_token",
    "attention_layers", "cache_bytes", "Roofline", "fit_roofline",
    # inputs
    "BenchConfig", "LAYOUT_IMAGE_HW", "default_image_hw", "describe_inputs", "make_inputs", "build_batch",
    "parse_method",
    # timing
    "summary", "prefill_once", "prefill_ops", "generate_time", "decode_step_time", "llm_sweep", "attach",
    "timed_prefill", "measure", "process_age",
    # hardware, floor
    "copy_bandwidth", "matmul_peak", "measure_hardware", "describe_hardware", "weight_bytes", "vision_flops",
    "row_floor", "add_floors",
    # report
    "cpu_model", "environment", "fast_comparison", "label", "check_bars", "markdown", "fast_markdown", "plot",
    "log_wandb",
    # here
    "run", "main",
]


#: the config fields a finished cell's numbers depend on: a resumed run reuses only rows with the same values
RESUME_FIELDS = ("model", "dtype", "device", "n", "warmup", "batch_sizes", "decode_tokens", "decode_samples",
                 "text_words", "image_hw", "images", "next_layout", "seed", "threads", "fast", "fast_backend",
                 "fast_max_new_tokens", "fast_attention")


def _fingerprint(cfg: BenchConfig) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in RESUME_FIELDS}, default=str))


def _cell_key(name, budget, opts, path, closing=False) -> str:
    return json.dumps([name, budget, opts, path, bool(closing)], sort_keys=True, default=str)


def _load_rows(progress: Path, fingerprint: dict) -> tuple[dict, int]:
    """Rows of an earlier run of the same configuration (``--resume``): {cell key: result}, and the count of
    lines left out (another configuration's, or cut mid-line by a kill)."""
    rows, skipped = {}, 0
    if not progress.exists():
        return rows, skipped
    for line in progress.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run
            skipped += 1
            continue
        if rec.get("fingerprint") != fingerprint or "result" not in rec:  # a failed cell's line: measured again
            skipped += 1
            continue
        rows[rec["cell"]] = rec["result"]
    return rows, skipped


class _Stopped(Exception):
    """SIGTERM (``timeout``, a Slurm time limit): write the report from the rows measured so far."""


#: set by the SIGTERM handler and kept: code that catches the handler's exception (Inductor wraps an exception
#: raised during its code generation in its own, and dynamo may fall back to running eagerly) cannot swallow the stop
_STOP = {"requested": False}


def _on_sigterm(signum, frame):
    _STOP["requested"] = True
    raise _Stopped()


def _device_warmup(rt, items, device, seconds: float) -> int:
    """Unpruned eager prefills for ``seconds`` before the first row (clocks, allocator, cuBLAS / cuDNN
    heuristics): without it the first row timed pays the device's warm-up (seen on an H200: the first row's
    vision tower 15 ms, every later one's 9 ms)."""
    if seconds <= 0:
        return 0
    attach(rt, "none", None, {}, "eager")
    b = build_batch(rt, [items[0]], device)
    t0, runs = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        prefill_once(rt, b, device)
        runs += 1
    rt.unprune()
    return runs


def run(cfg: BenchConfig) -> dict:
    from llava.models import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fast_slots = None
    if cfg.fast:
        fast_slots = cfg.fast_max_new_tokens or max(cfg.decode_tokens, 1)
        if fast_slots < cfg.decode_tokens:
            raise ValueError(f"--fast-max-new-tokens {fast_slots} < --decode-tokens {cfg.decode_tokens}: the fast "
                             "path's static cache would run out")
    try:
        rt = load(cfg.model, dtype=cfg.dtype, device=cfg.device, next_layout=cfg.next_layout, fast=cfg.fast,
                  fast_backend=cfg.fast_backend, fast_max_new_tokens=fast_slots or 256,
                  fast_attention=cfg.fast_attention)
    except (ValueError, OSError) as e:  # unknown shape / family, no such directory or hub id
        from llava.cli import InputError

        raise InputError(f"cannot load model {cfg.model!r}: {e.args[0] if e.args else e}") from e
    loaded_s = process_age()
    device = next(rt.model.parameters()).device
    image_hw = tuple(cfg.image_hw) if cfg.image_hw else default_image_hw(rt)
    inputs = describe_inputs(rt, image_hw)
    items = make_inputs(rt, cfg.n, cfg.text_words, cfg.seed, image_hw, cfg.images)
    floor = None
    if cfg.fast:  # the fast table's floors: the device's limits, the weights' bytes, the tower's FLOPs
        floor = _floor_inputs(rt, items, device)
        print("device limits " + describe_hardware(floor["hardware"]), file=sys.stderr, flush=True)
    cells = [("none", None, {}, False)]
    for spec in cfg.methods:
        name, opts = parse_method(spec)
        if name == "none":
            continue
        budgets = cfg.budgets if method_class(name).budgeted else [None]  # an adaptive count: one row, no budget
        cells += [(name, b, opts, False) for b in budgets]
    if cfg.retime_none:  # the unpruned row again at the end: the drift of the device over the run
        cells.append(("none", None, {}, True))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "cells.jsonl"  # one line per measured cell, as it ends: a run cut short keeps its rows
    fingerprint = _fingerprint(cfg)
    done, skipped = _load_rows(progress, fingerprint) if cfg.resume else ({}, 0)
    if not cfg.resume:
        progress.write_text("")
    elif skipped:
        print(f"--resume: {skipped} line(s) of {progress} left out (another configuration's, or cut by a kill)",
              file=sys.stderr, flush=True)
    results, fast_results, errors = [], [], []
    paths = (("fast", "eager") if cfg.fast_first else ("eager", "fast")) if cfg.fast else ("eager",)
    total, i = len(cells) * len(paths), 0
    print(f"bench.efficiency: {total} cells ({len(cells)} method x budget{' x 2 paths' if cfg.fast else ''}, "
          f"{cfg.n} samples each) on {cfg.model}; writing to {out}"
          + (f"; {len(done)} done in an earlier run (--resume)" if done else ""), file=sys.stderr, flush=True)
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    _STOP["requested"] = False
    stopped = None
    try:
        warm = _device_warmup(rt, items, device, cfg.device_warmup) if len(done) < total else 0
        if warm:
            print(f"device warm-up: {warm} unpruned prefills in {cfg.device_warmup:g} s", file=sys.stderr, flush=True)
        for name, b, opts, closing in cells:  # with --fast: each cell on both paths, back to back
            for path in paths:
                i += 1
                if _STOP["requested"]:  # a SIGTERM whose exception something caught: stop before the next cell
                    raise _Stopped()
                key = _cell_key(name, b, opts, path, closing)
                what = (f"{name}{'' if b is None else f' budget {b}'}{' ' + json.dumps(opts) if opts else ''}"
                        f"{' (closing re-time)' if closing else ''}{' (fast path)' if path == 'fast' else ''}")
                if key in done:
                    res = done[key]
                    print(f"[{i}/{total}] {what}: done earlier (--resume)", file=sys.stderr, flush=True)
                else:
                    print(f"[{i}/{total}] {what}", file=sys.stderr, flush=True)
                    t0 = time.perf_counter()
                    try:
                        res = measure(rt, name, b, opts, items, cfg, device, path=path)
                    except (KeyboardInterrupt, _Stopped):
                        raise
                    except Exception as e:  # noqa: BLE001 - one failing cell must not lose the others
                        if _STOP["requested"]:  # the SIGTERM's exception, wrapped (e.g. by Inductor's compile)
                            raise _Stopped() from e
                        rt.unprune()
                        err = {"method": name, "budget": b, "options": opts, "path": path, "closing": closing,
                               "error": f"{type(e).__name__}: {e}"}
                        errors.append(err)
                        print(f"cell failed: {err['error']}", file=sys.stderr, flush=True)
                        with progress.open("a") as f:
                            f.write(json.dumps({**err, "cell": key, "fingerprint": fingerprint},  # retried by --resume
                                               default=str) + "\n")
                        continue
                    if _STOP["requested"]:  # swallowed inside the cell (a compile fell back): its row is not kept
                        raise _Stopped()
                    res["closing"] = closing
                    res["cell_s"] = time.perf_counter() - t0
                    _progress(progress, res, key, fingerprint)
                (fast_results if path == "fast" else results).append(res)
        print(f"[{total}/{total}] cells done", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, _Stopped) as e:
        stopped = e
        print(f"stopped after {len(results) + len(fast_results)} of {total} cells: writing the report from them "
              f"(the rows are in {progress}; --resume continues)", file=sys.stderr, flush=True)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    report = _report(rt, cfg, device, image_hw, inputs, results, fast_results, errors, fast_slots,
                     complete=stopped is None, out=out, progress=progress, floor=floor,
                     process={"loaded_s": loaded_s, "pid": os.getpid()})
    if isinstance(stopped, KeyboardInterrupt):
        raise stopped
    return report


def _floor_inputs(rt, items, device) -> dict:
    """What the fast table's floors need (bench.efficiency.floor), measured once at the start of a run: the device's
    copy bandwidth and matmul peak in the model's dtype, the weights' bytes by phase and the tower's FLOPs (one
    unpruned prefill of the first input under torch's FLOP counter, no engine attached)."""
    hw = measure_hardware(device, rt.model.dtype)
    model = {"weights": weight_bytes(rt.model), "dtype_bytes": rt.model.get_input_embeddings().weight.element_size()}
    try:
        model["vision_count"] = vision_flops(rt.model, build_batch(rt, [items[0]], device))
        model["vision_flops"] = model["vision_count"]["vision"]
    except Exception as e:  # noqa: BLE001 - a family the counter cannot run: the tower's floor is its weight read
        model["vision_flops"], model["vision_flops_error"] = 0.0, f"{type(e).__name__}: {e}"
        print(f"the tower's FLOPs were not counted ({model['vision_flops_error']}): its floor is its weight read",
              file=sys.stderr, flush=True)
    return {"hardware": hw, "model": model}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _pair(results: list[dict], fast_results: list[dict]) -> tuple[list[dict], list[dict]]:
    """The eager and fast rows of the cells measured on both paths, in the same order."""
    key = lambda r: (r["method"], r["budget"], json.dumps(r["options"], sort_keys=True), bool(r.get("closing")))  # noqa: E731
    fast = {key(r): r for r in fast_results}
    pairs = [(r, fast[key(r)]) for r in results if key(r) in fast]
    return [e for e, _ in pairs], [f for _, f in pairs]


def _report(rt, cfg, device, image_hw, inputs, results, fast_results, errors, fast_slots, complete: bool, out: Path,
            progress: Path, floor: dict | None = None, process: dict | None = None) -> dict:
    """efficiency.json / .md / .png from the rows there are (a run stopped early: no cost model, no bars)."""
    base = next((r for r in results if r["method"] == "none" and not r.get("closing")), None)
    for r in results:  # launches a method adds over the unpruned model on the same input
        if base is not None and r.get("ops") and base.get("ops"):
            r["extra_ops"] = r["ops"]["total"] - base["ops"]["total"]
    d, m, L, d_kv = llm_dims(rt.model.config)
    spec = hybrid_spec(rt.model.config)
    model = None
    if complete and base is not None:
        full = int(base["records"][0]["layer_lengths"][0])
        lengths = cfg.sweep or sorted({max(8, int(full * f)) for f in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)})
        print(f"cells done; fitting the cost model on {len(lengths)} text-only lengths", file=sys.stderr, flush=True)
        model = fit_roofline(llm_sweep(rt, lengths, device), d, m, L, d_kv, spec)
    report = {"config": {**asdict(cfg), "image_hw": list(image_hw)}, "environment": environment(rt, device, rt.model.dtype),
              "inputs": inputs, "complete": complete, "errors": errors,
              "flops_model": {"scope": "LLM decoder prefill only, at the measured per-layer lengths; the vision tower "
                                       "(CLIP / SigLIP / Qwen2.5-VL's windowed ViT), projector / merger and LM head are "
                                       "not counted", "d": d, "m": m, "layers": L, "d_kv": d_kv,
                              "A": "2nd^2 + 2nd*d_kv + 2n^2d + 2ndm per layer",
                              "B": "2nd^2 + 2nd*d_kv + 2n^2d + 3ndm per layer",
                              **({"hybrid": {"layers": list(spec.kinds), "full": "the formula above + nd^2 (the q_proj's "
                                             "output gate)", "linear": "n (d(2K+V) + dV + 2dH_v + Vd + (2K+V)k + "
                                             "3 H_v d_k d_v + 2 or 3 dm) (Gated DeltaNet, recurrent form)",
                                             "K": spec.key_dim, "V": spec.value_dim, "H_v": spec.v_heads,
                                             "d_k": spec.head_k, "d_v": spec.head_v, "kernel": spec.kernel}}
                                 if spec is not None else {})},
              "cost_model": None if model is None else {
                  "description": model.describe(), "floor_s": model.floor, "a_s": model.a,
                  "k_s_per_mac": model.k, "ridge_tokens": model.ridge(), "sweep": model.points,
                  "rule": "predicted TTFT = measured vision + selection + sum_l T(n_l)/L"},
              "results": results}
    if floor is not None:
        report["hardware"] = floor["hardware"]
    if process is not None:
        report["process"] = process
    if cfg.fast:
        eager_rows, fast_rows = _pair(results, fast_results)
        f0 = next((r["fast"] for r in fast_results if r.get("fast")), {})
        comparison = fast_comparison(eager_rows, fast_rows)
        if floor is not None:
            add_floors(comparison, eager_rows, rt.model.config, floor["model"], floor["hardware"], cfg.decode_tokens)
        report["fast"] = {"backend": f0.get("backend"), "requested_backend": cfg.fast_backend,
                          "attention": cfg.fast_attention,
                          "cuda_graphs": f0.get("cuda_graphs"), "max_new_tokens": fast_slots,
                          "note": "each cell ran on the eager engine and with load(fast=True) in this run; fast rows: "
                                  "warm-up prefills first, a timed prefill that still compiled a graph is timed again "
                                  "(compiled_in_timed); path_taken = engine.stats.path of the timed prefills",
                          "precompile_requested": (rt.info.get("fast") or {}).get("precompile",
                                                                                  precompile_wanted(None)),
                          "process": process,
                          "floor": None if floor is None else {**floor, "decode_tokens": cfg.decode_tokens,
                                                               "rule": FLOOR_RULE},
                          "results": fast_results, "comparison": comparison}
    report["bars"] = check_bars(results, model) if model is not None else []
    (out / "efficiency.json").write_text(json.dumps(report, indent=1, default=str))
    wrote = [out / "efficiency.json", progress]
    if results:
        (out / "efficiency.md").write_text(markdown(report))
        wrote.insert(1, out / "efficiency.md")
        try:
            plot(report, out / "efficiency.png")
            wrote.insert(2, out / "efficiency.png")
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
        except Exception as e:  # the figure is a view of the rows already written: it never fails the run
            print(f"warning: the figure was not written ({type(e).__name__}: {e}); efficiency.json / .md hold "
                  "every row", file=sys.stderr)
    if complete:
        log_wandb(report, cfg.wandb)
    print("wrote " + ", ".join(str(p) for p in wrote), file=sys.stderr, flush=True)
    return report


def _progress(path: Path, res: dict, key: str, fingerprint: dict) -> None:
    """Append one cell's row to ``cells.jsonl`` (its headline numbers, and the whole result for ``--resume`` and
    a report written after a kill) and print the headline."""
    line = {"method": res["method"], "budget": res["budget"], "options": res["options"], "path": res["path"],
            "closing": bool(res.get("closing")), "path_taken": res["path_taken"], "warmup_s": round(res["warmup_s"], 3),
            "compiled_in_timed": res["compiled_in_timed"], "ttft_median_s": res["ttft"]["median"],
            "selection_median_s": (res.get("t_selection") or {}).get("median"),
            "tpot_median_s": res["tpot"].get("median"),
            "visual_entering_llm": res["visual_entering_llm"],
            "batched_ttft_median_s": {k: v["ttft"]["median"] for k, v in res["batched"].items()}}
    with path.open("a") as f:
        f.write(json.dumps({**line, "cell": key, "fingerprint": fingerprint, "result": res}, default=str) + "\n")
    print("cell " + json.dumps(line, default=str), file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from llava.cli import HelpFormatter, InputError
    from llava.fast.attention import MODES as FAST_ATTENTION
    from llava.fast.path import BACKENDS as FAST_BACKENDS

    ap = argparse.ArgumentParser(prog="python -m bench.efficiency", description=__doc__, formatter_class=HelpFormatter)
    d = BenchConfig()
    ap.add_argument("--model", default=d.model, help="hub id, local directory, shape:<name> or tiny:<family>")
    ap.add_argument("--dtype", default=None, help="default: the checkpoint's (shape / tiny models: float32)")
    ap.add_argument("--device", default=None, help="default: the CPU; cuda for a GPU")
    ap.add_argument("--methods", nargs="+", default=d.methods, help="names, or name:key=value,... for options")
    ap.add_argument("--budgets", nargs="+", type=int, default=d.budgets, help="visual-token budgets of each method")
    ap.add_argument("--n", type=int, default=d.n, help="timed samples per cell")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs before each cell")
    ap.add_argument("--batch", nargs="+", type=int, default=d.batch_sizes, dest="batch_sizes", help="batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="forced answer length for TPOT")
    ap.add_argument("--decode-samples", type=int, default=d.decode_samples, help="samples whose decode is timed")
    ap.add_argument("--text-words", type=int, default=d.text_words, help="words of the synthetic question")
    ap.add_argument("--images", choices=("noise", "pages"), default=d.images,
                    help="the synthetic pictures: random pixels (default), or document pages (flat margins, text bars: "
                         "what a pre-tower stage such as PixelPrune drops)")
    ap.add_argument("--image-hw", nargs=2, type=int, default=None,
                    help="synthetic image height width (default per family's layout: " + ", ".join(
                        f"{k} {h}x{w}" for k, (h, w) in LAYOUT_IMAGE_HW.items()) + "; the Qwen grid 24 merged tokens "
                    "a side, InternVL two tiles a side)")
    ap.add_argument("--next-layout", default=d.next_layout, choices=["spatial", "spatial_unpad"])
    ap.add_argument("--sweep", nargs="*", type=int, default=[], help="sequence lengths of the text-only runs the roofline is fitted to (default: from the inputs)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the random weights and inputs")
    ap.add_argument("--out", default=d.out, help="output folder")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--wandb", action="store_true", help="log to W&B (honours WANDB_MODE)")
    ap.add_argument("--fast", action="store_true", help="also run every (method, budget, batch) cell with "
                    "load(fast=True) and put fast and eager rows side by side with their TTFT ratio")
    ap.add_argument("--fast-backend", default=d.fast_backend,
                    choices=FAST_BACKENDS,
                    help="with --fast: auto = inductor + CUDA graphs on a GPU; cudagraphs = CUDA graphs of the "
                         "uncompiled functions (capture in seconds, no code generation; docs/fast-path.md)")
    ap.add_argument("--fast-attention", default=d.fast_attention, choices=FAST_ATTENTION,
                    help="with --fast: the prompt's attention over its padded bucket (llava.fast.attention): SDPA's "
                         "causal kernel, the 4-D mask, or auto (causal on a GPU from 1024 rows)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of cells.jsonl measured by an earlier run of "
                    "the same configuration (a killed run) and measure only the others")
    ap.add_argument("--device-warmup", type=float, default=d.device_warmup,
                    help="seconds of unpruned prefills before the first row (the device's warm-up)")
    ap.add_argument("--retime-none", action="store_true",
                    help="time the unpruned row again after the last method (the drift over the run)")
    ap.add_argument("--fast-first", action="store_true",
                    help="with --fast: each cell's fast row before its eager row (a process's first fast-path token "
                         "then comes right after the model's load: the second-process measurements)")
    ap.add_argument("--fast-max-new-tokens", type=int, default=None,
                    help="with --fast: decode slots of the static cache (default: --decode-tokens)")
    a = ap.parse_args(argv)
    cfg = BenchConfig(**{k: v for k, v in vars(a).items()})
    try:
        report = run(cfg)
    except InputError as e:  # a bad --model: one line, as the other commands
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the report of the rows so far is written, no traceback
        print(f"interrupted: the cells finished so far are in {Path(cfg.out) / 'cells.jsonl'} (--resume continues)",
              file=sys.stderr)
        return 130
    if report["results"]:
        print(markdown(report))
    return 0 if report.get("complete", True) else 124  # stopped by SIGTERM: the report of what was measured


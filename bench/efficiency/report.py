"""The efficiency benchmark's report: the environment (machine, versions, code), the fast-vs-eager comparison
rows, the performance bars (selection overhead, speed-up against the roofline, KV bytes), the markdown table
(``efficiency.md``), the plot (``efficiency.png``) and the optional W&B log."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.efficiency.cost import Roofline
from bench.efficiency.hardware import cpu_model  # noqa: F401 - re-exported (bench.efficiency.cpu_model)
from bench.efficiency.hardware import describe as describe_hardware
from bench.efficiency.hardware import si
from llava.fast.precompile import PRECOMPILE_BACKENDS


def environment(rt, device, dtype) -> dict:
    env = {"date": time.strftime("%Y-%m-%d"), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "dtype": str(dtype), "device": str(device),
           "llm_attention": rt.model.config.text_config._attn_implementation,
           "vision_attention": rt.model.config.vision_config._attn_implementation, "model": rt.name}
    import transformers

    env["transformers"] = transformers.__version__
    from eval.provenance import git_info

    env["git"] = git_info()  # the code that was timed (VTPRUNE_GIT_COMMIT on a copied tree)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env.update(cpu=f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()})", threads=torch.get_num_threads())
        if hasattr(os, "getloadavg"):  # other processes on a shared CPU inflate and scatter the timings
            env["loadavg_1_5_15min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return env


def fast_comparison(eager: list[dict], fast: list[dict]) -> list[dict]:
    """One row per (method, budget, batch) cell: the eager and the fast row's TTFT medians, their ratio
    (fast / eager, < 1 = the fast path is faster), the TPOT ratio at batch 1, and the path the fast row's
    timed prefills actually took (with the reasons when eager)."""
    rows = []
    for e, f in zip(eager, fast):
        assert (e["method"], e["budget"], e["options"]) == (f["method"], f["budget"], f["options"])
        cells = [("1", e["ttft"], f["ttft"], f["path_taken"], f["path_reasons"], f["compiled_in_timed"])]
        cells += [(bs, e["batched"][bs]["ttft"], fb["ttft"], fb["path_taken"], fb["path_reasons"], fb["compiled_in_timed"])
                  for bs, fb in f["batched"].items() if bs in e["batched"]]
        for bs, te, tf, taken, reasons, compiled in cells:
            row = {"method": e["method"], "options": e["options"], "label": label(e), "budget": e["budget"],
                   "batch": int(bs), "eager_ttft_median": te["median"], "fast_ttft_median": tf["median"],
                   "eager_ttft_p90": te["p90"], "fast_ttft_p90": tf["p90"],
                   "ttft_ratio": tf["median"] / te["median"], "fast_path_taken": taken, "fast_path_reasons": reasons,
                   "fast_compiled_in_timed": compiled,
                   "cudagraph_skips": list((f.get("fast") or {}).get("cudagraph_skips") or [])}
            if bs == "1":
                row["fast_warmup_s"] = f.get("warmup_s")  # the warm-up prefills: compile / capture, on its own
                row["eager_selection_median"] = (e.get("t_selection") or {}).get("median")
                row["eager_tpot_median"] = (e["tpot"] or {}).get("median")
                row["fast_tpot_median"] = (f["tpot"] or {}).get("median")
                # the fast prefill's host plan: all of it / the part before the device has work (the rest runs
                # while the device runs the tower)
                row["fast_plan_median"] = (f.get("t_plan") or {}).get("median")
                row["fast_plan_exposed_median"] = (f.get("t_plan_exposed") or {}).get("median")
                if row["eager_tpot_median"] and row["fast_tpot_median"]:
                    row["tpot_ratio"] = row["fast_tpot_median"] / row["eager_tpot_median"]
            rows.append(row)
    # the selection's cost inside the captured prefill, where it is not timed apart: a method's fast TTFT over
    # random's at the same budget and batch (random's selection: a few kernels; both keep the same token count)
    floor = {(r["budget"], r["batch"]): r["fast_ttft_median"] for r in rows
             if r["method"] == "random" and not r["options"] and "closing" not in r["label"]}
    for r in rows:
        if r["method"] not in ("random", "none") and (r["budget"], r["batch"]) in floor:
            r["fast_over_random"] = r["fast_ttft_median"] - floor[(r["budget"], r["batch"])]
    return rows


def label(r: dict) -> str:
    """A result row's name: the method and its options (``consensusdrop preset=probe``), so that two
    variants of one method stay apart in the tables, the bar checks and the plot."""
    from llava.method import method_label

    name = method_label(r["method"], r.get("options"))
    return f"{name} (closing re-time)" if r.get("closing") else name


def check_bars(results: list[dict], model: Roofline, overhead_limit=0.03, speedup_tol=0.10, speedup_budget=64) -> list[dict]:
    """The issue's performance bars: selection overhead <= 3% of the unpruned TTFT; TTFT speed-up at
    the 64-token budget within 10% of the cost model's prediction; measured KV bytes == analytic."""
    base = next(r for r in results if r["method"] == "none" and not r.get("closing"))
    t_base = base["ttft"]["median"]
    bars = []
    for r in results:
        if r["method"] == "none":
            continue
        tag = {"method": r["method"], "label": label(r), "budget": r["budget"]}
        sel = r["t_selection"]["median"]
        bars.append({**tag, "bar": "selection overhead <= 3% of unpruned TTFT", "value": sel / t_base,
                     "limit": overhead_limit, "pass": sel / t_base <= overhead_limit})
        bars.append({**tag, "bar": "measured KV bytes == analytic", "value": r["kv_bytes"],
                     "limit": r["kv_bytes_analytic"], "pass": r["kv_match"]})
        if r["budget"] == speedup_budget:
            pred = statistics.fmean(
                rec["t_vision"] + rec["t_selection"] + model.per_layer(rec["layer_lengths"]) for rec in r["records"])
            measured = t_base / r["ttft"]["median"]
            predicted = t_base / pred
            bars.append({**tag, "bar": "TTFT speed-up within 10% of the cost model", "value": measured,
                         "limit": predicted, "pass": abs(measured / predicted - 1) <= speedup_tol,
                         "note": f"measured {measured:.2f}x vs predicted {predicted:.2f}x"})
    return bars


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------


def _flops_line(report: dict) -> str:
    fm = report.get("flops_model") or {}
    hy = fm.get("hybrid")
    if hy:
        n_lin = hy["layers"].count("linear")
        return (f"hybrid decoder (d = {fm['d']}, d_kv = {fm['d_kv']}, m = {fm['m']}; {fm['layers'] - n_lin} gated "
                f"full-attention layers: A = 3nd^2+2nd*d_kv+2n^2d+2ndm, B = the same with 3ndm (the q_proj also makes "
                f"the output gate); {n_lin} Gated DeltaNet layers, recurrent form, linear in n: "
                f"n(d(2K+V)+dV+2dH_v+Vd+(2K+V)k+3H_v d_k d_v) + the FFN, K = {hy['K']}, V = {hy['V']}, "
                f"H_v = {hy['H_v']}, d_k = {hy['d_k']}, d_v = {hy['d_v']}, k = {hy['kernel']}). KV bytes: the "
                "full-attention layers only (a DeltaNet layer keeps a fixed-size state).")
    if fm and fm["d_kv"] != fm["d"]:
        return (f"grouped-query attention (d = {fm['d']}, d_kv = {fm['d_kv']}, m = {fm['m']}, L = {fm['layers']}): "
                "A = 2nd^2+2nd*d_kv+2n^2d+2ndm, B = 2nd^2+2nd*d_kv+2n^2d+3ndm.")
    return "A = 4nd^2+2n^2d+2ndm, B = 4nd^2+2n^2d+3ndm."


def _inputs_lines(report: dict) -> list[str]:
    inp = report.get("inputs")
    if not inp:
        return []
    h, w = inp["image_hw"]
    grid = f", image_grid_thw {inp['image_grid_thw']}" if "image_grid_thw" in inp else ""
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in inp["batch_keys"].items())
    kind = "document page" if report.get("config", {}).get("images") == "pages" else "image"
    return [f"Input: one {h}x{w} synthetic {kind} per prompt through the runtime's processor ({inp['family']}): "
            f"{inp['visual_tokens']} visual tokens{grid}; batch tensors {shapes}.", ""]


def _ops_split(r: dict) -> str:
    ops = r.get("ops") or {}
    if "selection" not in ops:
        return f"{ops['total']} (total)" if "total" in ops else "-"
    return f"{ops['vision']} / {ops['selection']} / {ops['llm']}"


def _ops_over(r: dict) -> str:
    return f"{r['extra_ops']:+d}" if r.get("extra_ops") is not None else "-"


def _closing_lines(rows: list[dict], base: dict) -> list[str]:
    """The drift of the device over the run: the unpruned row timed first and again after the last method."""
    end = next((r for r in rows if r["method"] == "none" and r.get("closing")), None)
    if end is None or end is base:
        return []
    a, b = base["ttft"]["median"], end["ttft"]["median"]
    return [f"Unpruned TTFT at the start {a * 1e3:.2f} ms, re-timed after the last method {b * 1e3:.2f} ms "
            f"(drift {100 * (b / a - 1):+.1f} %): speed-ups against the start row are within that.", ""]


def markdown(report: dict) -> str:
    env, rows, model = report["environment"], report["results"], report["cost_model"]
    base = next((r for r in rows if r["method"] == "none" and not r.get("closing")), rows[0])
    t_base = base["ttft"]["median"]
    bs = [k for k in base["batched"]]
    out = [f"# Efficiency: {env['model']}", "",
           f"Device: {env.get('gpu') or env.get('cpu')} ({env['device']}); dtype {env['dtype']}; LLM attention "
           f"{env['llm_attention']}, vision tower {env['vision_attention']}; torch {env['torch']}, transformers "
           f"{env['transformers']}; {env['date']}"
           + (f"; device limits {describe_hardware(report['hardware'])}" if report.get("hardware") else "")
           + f". N = {report['config']['n']} inputs (seeded random "
           + ("document pages" if report["config"].get("images") == "pages" else "images") + ", "
           f"{report['config']['text_words']}-word questions), warm-up {report['config']['warmup']}, "
           f"TPOT: the decode steps of one generate call of {report['config']['decode_tokens']} forced tokens "
           "(prefill excluded). FLOPs in T MAC (x2 for FLOPs), LLM "
           "prefill only (vision tower, projector and LM head not counted), at the measured per-layer lengths; "
           + _flops_line(report), "",
           *_inputs_lines(report),
           (f"Cost model: {model['description']}" if model else "Cost model: not fitted (**the run stopped before its "
            "last cell**: the rows below are those it measured; `--resume` continues it)"), "",
           *_closing_lines(rows, base),
           *(["Cells that failed (the run went on): " + "; ".join(
               f"{e['method']} {e['budget'] if e['budget'] is not None else '-'} ({e['path']}): {e['error']}"
               for e in report.get("errors") or []), ""] if report.get("errors") else []),
           "Ops: aten ops of one batch-1 prefill of the first input that would launch a GPU kernel or memcpy "
           "(llava.syncs.OpCounter; views, allocations and host-side work not counted), split vision / selection / "
           "LLM as the time; over unpruned = total (incl. LM head) minus the unpruned row's total. At batch 1 a "
           "GPU prefill is launch-bound: each op costs about 10-15 us on an H100.", "",
           "| Method | Budget | tok-in / tok-eq | TTFT b1 median / p90 (ms) | vision / select / LLM (ms) |"
           + "".join(f" TTFT b{b} (ms), samples/s |" for b in bs)  # one cell per batch size (none: no cell)
           + " TPOT (ms) | KV (MiB) | Peak (GiB) | FLOPs A / B (T MAC) | Speed-up b1 | ops vision / select / LLM "
           "| ops over unpruned |",
           "|---|---|---|---|---|" + "---|" * len(bs) + "---|---|---|---|---|---|---|"]
    for r in rows:
        ms = lambda s: f"{s['median'] * 1e3:.1f}" if s else "-"  # noqa: E731
        bcols = [f"{r['batched'][b]['ttft']['median'] * 1e3:.1f}, {r['batched'][b]['samples_per_s']:.1f}"
                 if b in r["batched"] else "-" for b in bs]
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
        out.append(
            f"| {label(r)} | {r['budget'] if r['budget'] is not None else '-'} | "
            f"{r['visual_entering_llm']:.0f} / {r['visual_layer_avg']:.1f} | {ms(r['ttft'])} / "
            f"{r['ttft']['p90'] * 1e3:.1f} | {ms(r['t_vision'])} / {ms(r['t_selection'])} / {ms(r['t_llm'])} |"
            + "".join(f" {c} |" for c in bcols)
            + f" {ms(r['tpot'])} | {r['kv_bytes'] / 2**20:.2f} | {peak} | {r['macs_A'] / 1e12:.3g} / "
            f"{r['macs_B'] / 1e12:.3g} | {t_base / r['ttft']['median']:.2f}x | {_ops_split(r)} | "
            f"{_ops_over(r)} |")
    out += ["", "## Bars", "", "| Method | Budget | Bar | Value | Limit | Pass |", "|---|---|---|---|---|---|"]
    for b in report["bars"]:
        v = b["value"]
        fmt = (lambda x: f"{x:.3f}") if isinstance(v, float) else str
        out.append(f"| {b.get('label', b['method'])} | {b['budget']} | {b['bar']} | {fmt(v)} | {fmt(b['limit'])} | "
                   f"{'yes' if b['pass'] else '**no**'} |")
    if report.get("fast"):
        out += ["", *fast_markdown(report["fast"])]
    return "\n".join(out) + "\n"


def _taken(path: str, reasons: dict, requested: str) -> str:
    """The path a row's timed prefills took, in words (a fast row that ran eagerly says so, with why)."""
    if path == "eager" and requested == "fast":
        return "**eager**: " + "; ".join(reasons) if reasons else "**eager**"
    if path == "mixed":
        return "**mixed** (eager: " + "; ".join(f"{r} x{c}" for r, c in reasons.items()) + ")"
    return path


def fast_markdown(fast: dict) -> list[str]:
    """The fast-vs-eager section: per (method, budget, batch) an eager row and a fast row side by side, the
    fast row with the path its timed prefills actually took and the fast / eager TTFT (and TPOT) ratio."""
    out = ["## Fast path vs eager engine (`--fast`)", "",
           f"Every cell ran twice in this run, back to back: on the eager engine and with `load(fast=True)` (backend "
           f"{fast.get('backend')}{', CUDA graphs' if fast.get('cuda_graphs') else ''}; prompt attention "
           f"{fast.get('attention', 'masked')} (`--fast-attention`); static cache of "
           f"{fast.get('max_new_tokens')} decode slots). Fast rows: warm-up prefills compile / capture first; a timed "
           "prefill that still compiled a graph (`engine.stats.new_graph`) is timed again and counted under 'graphs "
           "compiled in timed runs'. 'Path taken' is `engine.stats.path` of the timed prefills: a method the fast path "
           "does not capture runs eagerly on the fast row, which then says so (its ratio compares eager with eager). "
           "Ratio = fast / eager median (< 1: the fast path is faster). The table, bars and plot above are the eager "
           "rows.", "",
           "Selection: the eager row's selection time; the fast prefill is one graph, so its selection is not timed "
           "apart: the fast row gives its TTFT over random's fast TTFT at the same budget and batch (when random ran: "
           "the selection and its signals inside the graph; for a method that selects inside the LLM also its layers "
           "before the stage at full length). Warm-up: the fast row's warm-up prefills, compile / capture included, "
           "never in the TTFT. Host plan: the fast prefill's planning on the host, all / the part before the device "
           "has work (the rest runs while the device runs the tower).", "",
           *_floor_lines(fast),
           "| Method | Budget | Batch | Path | Path taken | TTFT median / p90 (ms) | fast / eager TTFT | TPOT (ms) "
           "| fast / eager TPOT | selection (ms) | host plan / exposed (ms) | warm-up (s) "
           "| graphs compiled in timed runs | floor TTFT (ms) | TTFT / floor | floor TPOT (ms) | TPOT / floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda x: f"{x * 1e3:.2f}" if x is not None else "-"  # noqa: E731
    over = lambda c: f"{c['fast_over_random'] * 1e3:+.2f} over random" if "fast_over_random" in c else "-"  # noqa: E731
    plan = lambda c: (f"{ms(c['fast_plan_median'])} / {ms(c.get('fast_plan_exposed_median'))}"  # noqa: E731
                      if c.get("fast_plan_median") is not None else "-")
    ratio = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731

    def floors(c, side):  # the row's floor and its distance from it (bench.efficiency.floor)
        return (f" {ms(c.get('floor_ttft_s'))} | {ratio(c.get(f'{side}_ttft_over_floor'))} | "
                f"{ms(c.get('floor_tpot_s'))} | {ratio(c.get(f'{side}_tpot_over_floor'))} |")

    for c in fast["comparison"]:
        head = f"| {c['label']} | {c['budget'] if c['budget'] is not None else '-'} | {c['batch']} |"
        b1 = c["batch"] == 1
        out.append(f"{head} eager | eager | {ms(c['eager_ttft_median'])} / {ms(c['eager_ttft_p90'])} | - | "
                   f"{ms(c.get('eager_tpot_median')) if b1 else '-'} | - | {ms(c.get('eager_selection_median'))} | - "
                   "| - | - |" + floors(c, "eager"))
        taken = _taken(c["fast_path_taken"], c["fast_path_reasons"], "fast")
        tpot_ratio = f"{c['tpot_ratio']:.2f}x" if c.get("tpot_ratio") else "-"
        out.append(f"{head} fast | {taken} | {ms(c['fast_ttft_median'])} / {ms(c['fast_ttft_p90'])} | "
                   f"{c['ttft_ratio']:.2f}x | {ms(c.get('fast_tpot_median')) if b1 else '-'} | "
                   f"{tpot_ratio if b1 else '-'} | {over(c)} | {plan(c)} | "
                   f"{f'{w:.1f}' if (w := c.get('fast_warmup_s')) is not None else '-'} | {c['fast_compiled_in_timed']} |"
                   + floors(c, "fast"))
    skipped = [(c["label"], c["budget"], s) for c in fast["comparison"] if c["batch"] == 1
               for s in c.get("cudagraph_skips") or []]
    if skipped:  # Inductor compiled these without a CUDA graph: their kernels ran one by one
        out += ["", "**Inductor did not capture these functions as CUDA graphs** (their kernels ran one by one; "
                "`fast_backend=\"cudagraphs\"` records the uncompiled functions instead):", ""]
        out += [f"- {name}{f' at {b}' if b is not None else ''}: `{s['function']}`: {s['reason']}"
                for name, b, s in skipped]
    out += _process_lines(fast)
    return out


def _floor_lines(fast: dict) -> list[str]:
    """The floor columns' paragraph: the device's measured limits (bandwidth, peak, date) and the rule."""
    fl = fast.get("floor")
    if not fl:
        return []
    m = fl["model"]
    w = m["weights"]
    vis = (f"{si(m['vision_flops'], 'FLOP')} per sample (counted)" if not m.get("vision_flops_error")
           else f"not counted ({m['vision_flops_error']}): its weight read only")
    return [f"Floor: device limits {describe_hardware(fl['hardware'])}. Weights read per forward: LLM decoder "
            f"{si(w['llm'], 'B')} + LM head {si(w['head'], 'B')}, tower and projector {si(w['vision'], 'B')} (the "
            f"input embedding, {si(w['embedding'], 'B')}, is a gather); the tower's FLOPs {vis}. "
            f"{fl.get('rule', '')} (T = {fl.get('decode_tokens')}; docs/efficiency.md, \"The physical floor\"). "
            "TTFT / floor and TPOT / floor: the row's median over it (1.00x = at the limit).", ""]


def _process_lines(fast: dict) -> list[str]:
    """Where the fast path's first token fell from the process start, and what its functions' precompiled files did
    (loaded, compiled and saved, or not used)."""
    out = []
    rows = [r for r in fast.get("results") or [] if r.get("first_token_process_s") is not None]
    proc = fast.get("process") or {}
    if rows:
        r = min(rows, key=lambda r: r["first_token_process_s"])
        loaded = f"model loaded {proc['loaded_s']:.1f} s after the process start; " if proc.get("loaded_s") else ""
        at = f" {r['budget']}" if r.get("budget") is not None else ""
        out += ["", f"Process: {loaded}first fast-path token {r['first_token_process_s']:.1f} s after the process "
                f"start ({label(r)}{at}: its first prefill {r['first_prefill_s']:.1f} s, compile / capture / load "
                "included)."]
    pre = [(label(r), r.get("budget"), (r.get("fast") or {}).get("precompile")) for r in fast.get("results") or []]
    can = fast.get("backend") in PRECOMPILE_BACKENDS  # other backends compile the regular way, quietly
    if (fast.get("precompile_requested") and can) or any(p for _, _, p in pre):
        used = [(n, b, p) for n, b, p in pre if p]
        if not used:
            out += ["", "Precompiled functions (on): **not used** - no fast row's functions were precompiled (this "
                    "torch falls back to the regular Inductor compile): the warm-up column is the regular compile, on "
                    "Inductor's cache where it is warm."]
        else:
            out += ["", "Precompiled functions (on): " + "; ".join(
                f"{n}{f' {b}' if b is not None else ''}: loaded {p['loaded']}, compiled and saved {p['compiled']}"
                + (f" (not saved: {'; '.join(p['refused'])})" if p.get("refused") else "") for n, b, p in used)
                + ("" if len(used) == len(pre) else f"; {len(pre) - len(used)} row(s) not precompiled") + "."]
    return out


MARKERS, LINESTYLES = "os^vD<>ph*", ("-", "--", ":", "-.")


def line_style(i: int, colors) -> dict:
    """The ``i``-th row's line in the figure, distinct for any number of rows up to 80: tab20's dark shades first
    (0, 2, ... 18), then its light ones (1, 3, ... 19), a marker cycling over ten, and from the 21st row on the
    next line style (every registered method in one report: 29 rows and more)."""
    c = i % 20
    return dict(color=colors[2 * c if c < 10 else 2 * (c - 10) + 1], marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[(i // 20) % len(LINESTYLES)])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    by = {}
    for r in report["results"]:
        by.setdefault(label(r), []).append(r)
    for i, (name, rs) in enumerate(by.items()):
        rs = sorted(rs, key=lambda r: r["visual_layer_avg"])
        x = [r["visual_layer_avg"] for r in rs]
        style = dict(**line_style(i, plt.get_cmap("tab20").colors), label=name)
        ax[0].plot(x, [r["ttft"]["median"] * 1e3 for r in rs], **style)
        ax[1].plot(x, [r["kv_bytes"] / 2**20 for r in rs], **style)
    ax[0].set(xlabel="visual tokens (layer average)", ylabel="TTFT median, batch 1 (ms)")
    ax[1].set(xlabel="visual tokens (layer average)", ylabel="KV cache (MiB)")
    ax[0].legend(fontsize=7)
    fig.suptitle(f"{report['environment']['model']} on {report['environment'].get('gpu') or 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_wandb(report: dict, enabled: bool) -> None:
    """Best effort: never fails the run."""
    if not enabled or os.environ.get("WANDB_MODE") == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vtprune-efficiency"), config=report["config"],
                         job_type="efficiency", settings=wandb.Settings(init_timeout=30))
        table = wandb.Table(columns=["method", "budget", "tok_in", "tok_eq", "ttft_ms", "kv_mib", "macs_B"])
        for r in report["results"]:
            table.add_data(label(r), r["budget"], r["visual_entering_llm"], r["visual_layer_avg"],
                           r["ttft"]["median"] * 1e3, r["kv_bytes"] / 2**20, r["macs_B"])
        run.log({"efficiency": table})
        if report.get("fast"):
            ft = wandb.Table(columns=["method", "budget", "batch", "fast_path_taken", "eager_ttft_ms", "fast_ttft_ms",
                                      "ttft_ratio"])
            for c in report["fast"]["comparison"]:
                ft.add_data(c["label"], c["budget"], c["batch"], c["fast_path_taken"], c["eager_ttft_median"] * 1e3,
                            c["fast_ttft_median"] * 1e3, c["ttft_ratio"])
            run.log({"fast_vs_eager": ft})
        run.finish()
    except Exception as e:  # noqa: BLE001 - logging must never fail the benchmark
        print(f"[wandb] skipped: {e}", file=sys.stderr)

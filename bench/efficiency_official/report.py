"""bench.efficiency_official's report: ``official.md`` (per model, the FastV and the vision-tower tables)
and ``official.json``."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(s: dict | None) -> str:
    if not s:
        return "OOM" if s is not None else "-"
    return f"{s['median'] * 1e3:.2f} / {s['p90'] * 1e3:.2f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    c = report["config"]
    out = ["# Signal cost: ours vs the official implementations", "",
           f"Device: {env.get('device_name')} ({env['device']}"
           + (f", driver {env['driver']}, CUDA {env.get('cuda')}" if env.get("driver") else "")
           + f"); dtype {env['dtype']}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}. "
           f"Each time: {c['warmup']} warm-up calls, then median / p90 over {c['n']} calls, each synchronised "
           "on both sides. Peak = extra device memory over what was allocated before the call (CUDA only).", ""]
    for m in report["models"]:
        out += [f"## {m['model']}", "", f"Built: {m['built']} ({m['build_s']:.1f} s). Image {m['image_hw'][0]}x"
                f"{m['image_hw'][1]} px, {m['units_per_image']} vision-tower pass(es) per image.", ""]
        f0 = m["fastv"][0]
        out += [f"**FastV, decoder layer {f0['measured_layer']} (K = {f0['layer_K']})**: time of that layer's forward "
                "plus the visual-token ranking, ours (SDPA layer + the last token's attention row recomputed from "
                "the layer input, per sample) vs the official way (eager layer returning the full attention map, "
                "then the head-mean last row); SDPA layer alone for reference.", "",
                "| Batch | L | Visual (kept) | Map (MiB) | SDPA layer ms | Ours ms | Official ms | Official - ours ms "
                "| % of unpruned TTFT | Peak ours / official (MiB) | Top-k agree |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["fastv"]:
            rk = r.get("ranking", {})
            agree = ("OOM" if rk.get("oom") else "exact" if rk.get("exact")
                     else f"{rk.get('overlap_mean', 0):.3f} (min {rk.get('overlap_min', 0):.3f})")
            pct = f"{r['diff_pct_of_ttft']:.2f}%" if "diff_pct_of_ttft" in r else "-"
            diff = f"{r['diff_s'] * 1e3:.2f}" if "diff_s" in r else "-"
            out.append(f"| {r['batch']} | {r['seq_len']} | {r['visual_tokens']} ({r['kept']}) | "
                       f"{_mib(r['attention_map_bytes'])} | {_ms(r['sdpa_layer']['time_s'])} | "
                       f"{_ms(r['ours']['time_s'])} | {_ms(r['official']['time_s'])} | {diff} | {pct} | "
                       f"{_mib(r['ours']['peak_extra_bytes'])} / {_mib(r['official']['peak_extra_bytes'])} | {agree} |")
        t0 = m["tower"][0]
        out += ["", f"**Vision tower with the select layer's [CLS] attention** (layer {t0['select_layer_index']}): "
                "time of one tower call over all crops of the batch, stock (SDPA, hidden states only) vs ours (SDPA "
                "+ the [CLS] row and keys recomputed in a pre-hook, the engine's `clip.run_tower`) vs the official way "
                "(eager, every layer's attention map returned).", "",
                "| Batch | Passes | Maps (MiB) | Stock SDPA ms | Ours ms | Official ms | Official - ours ms | "
                "Peak stock / ours / official (MiB) | [CLS] top-k agree | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["tower"]:
            rk = r.get("ranking")
            agree = "-" if not rk else ("exact" if rk["exact"] else
                                        f"{rk['overlap_mean']:.3f} (min {rk['overlap_min']:.3f})")
            mad = "-" if not rk else f"{rk['cls_attn_max_abs_diff']:.2e}"
            diff = f"{r['diff_s'] * 1e3:.2f}" if "diff_s" in r else "-"
            out.append(f"| {r['batch']} | {r['units']} | {_mib(r['attention_maps_bytes'])} | "
                       f"{_ms(r['stock_sdpa']['time_s'])} | {_ms(r['ours']['time_s'])} | "
                       f"{_ms(r['official']['time_s'])} | {diff} | {_mib(r['stock_sdpa']['peak_extra_bytes'])} / "
                       f"{_mib(r['ours']['peak_extra_bytes'])} / {_mib(r['official']['peak_extra_bytes'])} | "
                       f"{agree} | {mad} |")
        out.append("")
    out += ["Times are median / p90 in ms. Map = bytes of the attention probabilities the official way materialises "
            "(FastV: B x H x L x L of layer K-1; tower: every layer's maps). Top-k agree: the official-style top-k "
            "set equals ours on the same input (exact), else the mean (min) overlap fraction of the sets over the "
            "batch; FastV k = the method's kept count, tower k = min(64, patches / 2) of the head-mean [CLS] "
            "attention; max abs diff = the [CLS] attention rows, official vs ours. The eager 4-D causal mask and "
            "the rotary cos / sin are built once outside the timed calls; the official VisionZip also takes the "
            "select layer's keys from a patched attention forward, not included in its time here.", ""]
    return "\n".join(out)


def write(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "official.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "official.md").write_text(markdown(report))
    return out

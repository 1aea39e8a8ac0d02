"""Our signal computation vs the official implementations' way, timed where the two differ, on the same device and
the same shapes.

    python -m bench.efficiency_official --model shape:llava-1.5-7b shape:llava-next-7b --dtype float16 \
        --device cuda --batch 1 16 --n 20 --warmup 5 --out DIR [--ttft-json EFFICIENCY.json ...]
    python -m bench.efficiency_official --model tiny:llava --device cpu --dtype float32 --n 3 --out DIR

(a) FastV. The official code (pkunlp-icler/FastV, in-place LLaVA version) runs decoder layer K-1 with
    eager attention and ``output_attentions=True``, which materialises the full (B, H, L, L)
    probability map, then ranks the visual tokens by the last token's head-mean row. Ours keeps the
    layer on SDPA and recomputes only the last token's row from the layer's input
    (``llm_qk`` + ``causal_attention_rows``, i.e. ``LLMSignals.attention("last", layer="prev")``).
    Timed: (i) layer K-1 on SDPA + ``FastV.select_llm`` on signals built the engine's way;
    (ii) layer K-1 on eager attention (the layer's attention module reads a copy of the text config
    set to "eager"; its probabilities are taken with a forward hook, which is how transformers 5
    records ``output_attentions``) + the official ranking (head mean of the whole map, last row,
    visual columns, top-k, sorted). Also layer K-1 alone on SDPA, so the row recompute is visible.
(b) Pre-LLM methods' signals (VisionZip, FasterVLM). Ours runs the vision tower once on SDPA and
    recomputes the select layer's [CLS] row and keys in a forward pre-hook (the engine's own
    ``llava.families.clip.run_tower``); the official code runs
    the tower on eager attention with ``output_attentions=True`` (every layer's map returned) and
    reads ``attentions[select layer][:, :, 0]``. Timed: stock tower (SDPA,
    ``output_hidden_states=True``), ours, official style.

Every measurement: ``--warmup`` untimed calls, then ``--n`` calls each timed with a device
synchronisation on both sides (``time.perf_counter``); median and p90 are reported. Peak memory
(CUDA only) is ``max_memory_allocated`` during one call minus what was allocated before it.
Correctness cross-check on the timed inputs: the official-style top-k set equals ours (exactly in
fp32; in fp16 the overlap fraction is reported), and the same for the vision [CLS] ranking.

For ``shape:`` models only the parts measured are built, with random weights, from the shipped
config in llava/configs: the vision tower and the first K decoder layers (+ rotary embedding); the
prompt layout (sequence length, visual positions) comes from the project's own processor.

Outputs (``--out DIR``): ``official.json`` (environment, config, every measurement with median /
p90) and ``official.md`` (tables).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# By purpose; every name is re-exported here:
#   parts: what is measured, built once per model (Parts, build_parts, FastV's K)
#   timing: the timer, the out-of-memory guard, the switches to eager attention
#   compare: (a) run_fastv and (b) run_tower, ours vs the official way
#   report: official.md / official.json
# This module: the configuration, the environment, the unpruned TTFT lookup, run and the command line.
from bench.efficiency_official.compare import fastv_inputs, run_fastv, run_tower
from bench.efficiency_official.parts import Parts, _dtype, build_parts, units_per_image
from bench.efficiency_official.report import markdown, write
from bench.efficiency_official.timing import _sync, bench, eager_llm_attention, eager_tower, guarded
from llava.families import registry
from llava.families.registry import DEFAULT_MODEL

__all__ = ["Parts", "build_parts", "units_per_image", "bench", "guarded", "eager_llm_attention", "eager_tower",
           "fastv_inputs", "run_fastv", "run_tower", "markdown", "write", "Config", "MEASUREMENTS", "environment",
           "ttft_lookup", "run", "main"]


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    models: list
    dtype: str | None = None
    device: str | None = None
    batch_sizes: tuple = (1,)
    n: int = 20
    warmup: int = 5
    text_words: int = 12
    image_hw: tuple | None = None  # default: one crop (LLaVA-1.5), 2x the crop size (NeXT: 5 crops)
    next_layout: str = "spatial"
    fastv_layer: int = 2
    fastv_budget: int | None = None
    ttft_json: tuple = ()
    seed: int = 0
    threads: int | None = None
    out: str = "docs/results/efficiency-official"

    def image_hw_for(self, parts: Parts):
        if self.image_hw:
            return tuple(self.image_hw)
        s = parts.config.vision_config.image_size
        return (2 * s, 2 * s) if registry.get(parts.family).layout == "anyres" else (s, s)


MEASUREMENTS = {
    "fastv.sdpa_layer": "decoder layer K-1 forward on SDPA (reference)",
    "fastv.ours": "decoder layer K-1 on SDPA + per sample FastV.select_llm on LLMSignals whose attention('last', "
                  "layer='prev') is llm_qk + causal_attention_rows on the layer input (the engine's computation)",
    "fastv.official": "decoder layer K-1 on eager attention with its (B, H, L, L) probabilities returned + head "
                      "mean of the whole map, last row, visual columns, top-k, sorted (pkunlp-icler/FastV in-place)",
    "fastv.diff_s": "official median - ours median, per prefill of the batch (> 0: ours is faster)",
    "tower.stock_sdpa": "vision tower on SDPA, output_hidden_states=True (the unmodified model)",
    "tower.ours": "llava.families.clip.run_tower: the same call + a pre-hook on the select layer and its [CLS] query "
                  "row / keys recomputed from layer_norm1 + q/k projections",
    "tower.official": "vision tower on eager attention, output_attentions=True and output_hidden_states=True, "
                      "[CLS] row of the select layer's map read (VisionZip / FasterVLM official)",
    "time_s": "seconds per call: median, p90, mean, std, n (warm-up calls excluded; synchronised perf_counter)",
    "peak_extra_bytes": "CUDA max_memory_allocated during one call minus memory allocated before it",
    "ranking": "official-style top-k set vs ours on the same input: exact equality, overlap fractions",
    "masks": "the 4-D causal mask (eager) and rotary cos/sin are built once, outside the timed calls",
}


def environment(device: torch.device, dtype) -> dict:
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
           "device": str(device), "dtype": str(dtype)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            env["driver"] = drv[0] if drv else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def ttft_lookup(paths, model: str) -> dict:
    """Unpruned TTFT medians by batch size from efficiency.json files of bench.efficiency."""
    out = {}
    for p in paths:
        rep = json.loads(Path(p).read_text())
        if rep.get("environment", {}).get("model") != model:
            continue
        base = next((r for r in rep.get("results", []) if r.get("method") == "none"), None)
        if base is None:
            continue
        out["1"] = {"ttft_s": base["ttft"]["median"], "source": str(p)}
        for b, r in base.get("batched", {}).items():
            out[str(b)] = {"ttft_s": r["ttft"]["median"], "source": str(p)}
    return out


def run(cfg: Config) -> dict:
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(cfg.dtype) or torch.float32
    report = {"environment": environment(device, dtype),
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
              "measurements": MEASUREMENTS, "models": []}
    for name in cfg.models:
        t0 = time.perf_counter()
        parts = build_parts(name, dtype, device, cfg.next_layout, cfg.fastv_layer)
        _sync(device)
        rec = {"model": name, "family": parts.family, "built": parts.built,
               "build_s": time.perf_counter() - t0, "image_hw": list(cfg.image_hw_for(parts)),
               "units_per_image": units_per_image(parts), "fastv": [], "tower": []}
        ttft = ttft_lookup(cfg.ttft_json, name)
        for b in cfg.batch_sizes:
            r = run_fastv(parts, b, cfg, device, dtype)
            t = ttft.get(str(b))
            if t:
                r["unpruned_ttft_s"] = t["ttft_s"]
                r["ttft_source"] = t["source"]
                if "diff_s" in r:
                    r["diff_pct_of_ttft"] = 100.0 * r["diff_s"] / t["ttft_s"]
            rec["fastv"].append(r)
            rec["tower"].append(run_tower(parts, b, cfg, device, dtype))
        rec["total_s"] = time.perf_counter() - t0
        report["models"].append(rec)
        del parts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.efficiency_official", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config(models=[])
    ap.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], dest="models",
                    help="shape:<cfg> (only the measured parts are built), tiny:<family>, or a checkpoint")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", nargs="+", type=int, default=list(d.batch_sizes), dest="batch_sizes")
    ap.add_argument("--n", type=int, default=d.n)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--text-words", type=int, default=d.text_words)
    ap.add_argument("--image-hw", nargs=2, type=int, default=None)
    ap.add_argument("--next-layout", default=d.next_layout, choices=["spatial", "spatial_unpad"])
    ap.add_argument("--fastv-layer", type=int, default=d.fastv_layer, help="FastV's K on a 32-layer LLM (scaled)")
    ap.add_argument("--fastv-budget", type=int, default=None,
                    help="equivalent-token budget for the kept count (default: FastV's ratio 0.5)")
    ap.add_argument("--ttft-json", nargs="*", default=[],
                    help="efficiency.json files of bench.efficiency: the difference as %% of the unpruned TTFT")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=d.out)
    a = ap.parse_args(argv)
    cfg = Config(**vars(a))
    report = run(cfg)
    write(report, cfg.out)
    print(markdown(report))
    return 0

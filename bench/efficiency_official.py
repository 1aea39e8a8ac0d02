"""Our signal computation vs the official implementations' way, timed where the two differ (issue 18
item 2), on the same device and the same shapes.

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
import contextlib
import copy
import json
import platform
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.efficiency import build_batch, make_inputs, summary


# ------------------------------------------------------------------------------------------------
# the parts we measure
# ------------------------------------------------------------------------------------------------


@dataclass
class Parts:
    name: str
    family: str
    config: object  # the full LLaVA config (vision_feature_layer, vision_config, text_config)
    rt: object  # a llava.models.Runtime whose processor gives the prompt layout
    tower: torch.nn.Module  # CLIPVisionModel
    layers: torch.nn.ModuleList  # decoder layers 0..K-1 at least
    rotary: torch.nn.Module
    num_layers: int  # decoder layers of the real LLM
    built: str  # what was instantiated


def _dtype(s):
    from llava.models import _dtype as conv

    return conv(s)


def build_parts(name: str, dtype, device, next_layout: str, fastv_layer: int) -> Parts:
    """``shape:<cfg>``: vision tower + decoder layers 0..K-1 only (random weights, the shipped
    config). Anything else (``tiny:<family>``, a checkpoint): the whole model via llava.models.load."""
    import transformers as tf

    from llava import models as M

    if name.startswith("shape:"):
        key = name.split(":", 1)[1]
        if key not in M.SHAPES:
            raise ValueError(f"unknown shape config {key!r}; shipped: {', '.join(sorted(M.SHAPES))}")
        raw = json.loads(M.SHAPES[key].read_text())
        fam = raw["model_type"]
        if fam not in ("llava", "llava_next"):
            raise ValueError(f"{name}: only LLaVA-1.5 / LLaVA-NeXT shapes are measured here, not {fam}")
        cfg = tf.AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "hub_id"})
        from llava.tiny_tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
        ip = M._image_processor(fam, cfg.vision_config.image_size, M.CLIP_MEAN_STD[0], M.CLIP_MEAN_STD[1],
                                pinpoints=getattr(cfg, "image_grid_pinpoints", None))
        rt = M._runtime(types.SimpleNamespace(config=cfg), tok, ip, fam, name, None, next_layout)
        n_layers = cfg.text_config.num_hidden_layers
        k = _fastv_k(fastv_layer, n_layers, cfg.vision_config.num_hidden_layers, fam)
        tc = copy.deepcopy(cfg.text_config)
        tc.num_hidden_layers = k  # layers 0..K-1; K-1 is the one measured
        tc.vocab_size, tc.pad_token_id = 8, None  # the embedding table is never used
        dt = _dtype(dtype) or torch.float32
        torch.manual_seed(0)
        with torch.device(device or "cpu"):
            tower = tf.CLIPVisionModel._from_config(copy.deepcopy(cfg.vision_config), dtype=dt,
                                                    attn_implementation="sdpa")
            lm = tf.LlamaModel._from_config(tc, dtype=dt, attn_implementation="sdpa")
        tower.eval()
        lm.eval()
        return Parts(name, fam, cfg, rt, tower, lm.layers, lm.rotary_emb, n_layers,
                     f"vision tower + decoder layers 0..{k - 1} of llava/configs/{key}.json (random weights, "
                     "the rest of the model not built)")
    rt = M.load(name, dtype=dtype, device=device, next_layout=next_layout)
    if rt.family not in ("llava", "llava_next"):
        raise ValueError(f"{name}: only LLaVA-1.5 / LLaVA-NeXT models are measured here, not {rt.family}")
    core = rt.model.model
    lm = core.language_model
    return Parts(name, rt.family, rt.model.config, rt, core.vision_tower, lm.layers, lm.rotary_emb,
                 len(lm.layers), "the whole model (llava.models.load)")


def _fastv_method(fastv_layer: int, n_layers: int, n_vision: int, family: str, budget=None):
    from baselines.fastv import FastV

    m = FastV(budget, layer=fastv_layer)
    m.setup(num_layers=n_layers, num_vision_layers=n_vision, family=family)
    return m


def _fastv_k(fastv_layer, n_layers, n_vision, family) -> int:
    return _fastv_method(fastv_layer, n_layers, n_vision, family).k_layer


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, n: int, warmup: int, device: torch.device) -> dict:
    """``warmup`` untimed calls, then ``n`` synchronised calls; seconds. Adds peak memory (CUDA)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        res = {"time_s": summary(times)}
        if device.type == "cuda":
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            res.update(peak_bytes=int(peak), peak_extra_bytes=int(peak - base))
        else:
            res.update(peak_bytes=None, peak_extra_bytes=None)
    return res


def guarded(fn, *args, **kwargs) -> dict:
    """A measurement, or a record of running out of device memory (the run goes on)."""
    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True, "time_s": {}, "peak_bytes": None, "peak_extra_bytes": None}


@contextlib.contextmanager
def eager_llm_attention(layer: torch.nn.Module):
    """Layer ``layer``'s attention runs transformers' eager path (its own config copy), and its
    probabilities are captured the way ``output_attentions=True`` records them (a hook on the
    attention module's output)."""
    attn = layer.self_attn
    orig = attn.config
    cfg = copy.copy(orig)
    cfg._attn_implementation = "eager"
    captured = {}

    def hook(module, args, output):
        captured["weights"] = output[1]

    attn.config = cfg
    handle = attn.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
        attn.config = orig


@contextlib.contextmanager
def eager_tower(tower: torch.nn.Module):
    orig = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        yield
    finally:
        tower.set_attn_implementation(orig)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / max(1, len(a))


# ------------------------------------------------------------------------------------------------
# (a) FastV: layer K-1
# ------------------------------------------------------------------------------------------------


def fastv_inputs(parts: Parts, batch: int, device, dtype, text_words: int, image_hw, seed: int):
    """B copies of one prompt's layout (the processor's real template, visual block and question),
    random hidden states per row as layer K-1's input."""
    items = make_inputs(parts.rt, 1, text_words, seed, tuple(image_hw))
    one = build_batch(parts.rt, items, None)
    ids = one["input_ids"][0]
    L = ids.numel()
    vis = torch.nonzero(ids == parts.config.image_token_id).flatten()
    d = parts.config.text_config.hidden_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, d, generator=g).to(device=device, dtype=dtype)
    pos = torch.arange(L, device=device)[None].expand(batch, L)
    mask2d = torch.ones(batch, L, dtype=torch.long, device=device)
    return x, pos, mask2d, vis.to(device), int(vis[-1]) + 1


def run_fastv(parts: Parts, batch: int, cfg, device, dtype) -> dict:
    from transformers.masking_utils import create_causal_mask

    from llava.signals import LLMSignals, causal_attention_rows, llm_qk

    method = _fastv_method(cfg.fastv_layer, parts.num_layers, len(parts.tower.encoder.layers), parts.family,
                           cfg.fastv_budget)
    K = method.k_layer
    layer = parts.layers[K - 1]
    rotary = parts.rotary
    x, pos, mask2d, vis, after0 = fastv_inputs(parts, batch, device, dtype, cfg.text_words, cfg.image_hw_for(parts),
                                               cfg.seed)
    B, L, _ = x.shape
    nv = int(vis.numel())
    kept = method.kept_count(nv)
    tc = layer.self_attn.config
    with torch.inference_mode():
        pe = rotary(x, position_ids=pos)
        sdpa_mask = create_causal_mask(config=tc, inputs_embeds=x, attention_mask=mask2d, past_key_values=None,
                                       position_ids=pos)
        etc = copy.copy(tc)
        etc._attn_implementation = "eager"
        eager_mask = create_causal_mask(config=etc, inputs_embeds=x, attention_mask=mask2d, past_key_values=None,
                                        position_ids=pos)
    text_after = torch.arange(after0, L, device=device)
    origin = torch.arange(nv, device=device)

    def sdpa_layer():
        return layer(x, attention_mask=sdpa_mask, position_embeddings=pe)

    def ours():
        h = layer(x, attention_mask=sdpa_mask, position_embeddings=pe)
        keeps = []
        for b in range(B):  # per sample, as the engine's llm stage
            xb, pb = x[b], pos[b]

            def attn_fn(rows, which, xb=xb, pb=pb):
                if which != "prev":
                    raise ValueError(which)
                q, k = llm_qk(layer, xb, rotary, pb, rows)
                return causal_attention_rows(q, k, rows, layer.self_attn.scaling)

            sig = LLMSignals(layer=K, hidden=h[b], position_ids=pb, visual=vis, origin=origin,
                             text_after=text_after, question=text_after, _attn_fn=attn_fn)
            keeps.append(method.select_llm(0, sig).keep)
        return h, keeps

    def official(captured):
        def fn():
            h = layer(x, attention_mask=eager_mask, position_embeddings=pe)
            attn = captured.pop("weights")  # (B, H, L, L)
            avg = torch.mean(attn, dim=1)  # head mean of the whole map, as the official code
            last = avg[:, -1]  # the last token's row
            keeps = [last[b][vis].topk(kept).indices.sort().values for b in range(B)]
            return h, keeps, last
        return fn

    res = {"batch": B, "seq_len": L, "visual_tokens": nv, "kept": kept, "layer_K": K, "measured_layer": K - 1,
           "heads": layer.self_attn.config.num_attention_heads,
           "attention_map_bytes": B * layer.self_attn.config.num_attention_heads * L * L * x.element_size()}
    res["sdpa_layer"] = guarded(bench, sdpa_layer, cfg.n, cfg.warmup, device)
    res["ours"] = guarded(bench, ours, cfg.n, cfg.warmup, device)
    with eager_llm_attention(layer) as cap:
        res["official"] = guarded(bench, official(cap), cfg.n, cfg.warmup, device)
        cap.clear()
        try:  # cross-check on the same input
            with torch.inference_mode():
                h_o, keep_o, last = official(cap)()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            h_o = None
    if h_o is None:
        res["ranking"] = {"k": kept, "oom": True}
    else:
        with torch.inference_mode():
            h_s, keep_s = ours()
        ov = [_overlap(a, b) for a, b in zip(keep_o, keep_s)]
        res["ranking"] = {
            "k": kept, "exact": all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(keep_o, keep_s)),
            "overlap_mean": sum(ov) / len(ov), "overlap_min": min(ov),
            "layer_output_max_abs_diff": float((h_o.float() - h_s.float()).abs().max()),
        }
        del h_o, keep_o, last, h_s, keep_s
    o, s = res["official"]["time_s"], res["ours"]["time_s"]
    if o and s:
        res["diff_s"] = o["median"] - s["median"]  # > 0: ours is faster
        res["speedup"] = o["median"] / s["median"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------------
# (b) vision tower with the select layer's [CLS] attention
# ------------------------------------------------------------------------------------------------


def units_per_image(parts: Parts) -> int:
    return 5 if parts.family == "llava_next" else 1


def run_tower(parts: Parts, batch: int, cfg, device, dtype) -> dict:
    tower = parts.tower
    vc = parts.config.vision_config
    units = batch * units_per_image(parts)
    g = torch.Generator().manual_seed(cfg.seed)
    px = torch.randn(units, 3, vc.image_size, vc.image_size, generator=g).to(device=device, dtype=dtype)
    from llava.families.clip import attention_layer, run_tower as engine_run_tower

    v = parts.config.vision_feature_layer
    idx = attention_layer(tower, v, None)
    s = (vc.image_size // vc.patch_size) ** 2 + 1
    heads = vc.num_attention_heads

    def stock():
        return tower(px, output_hidden_states=True, return_dict=True).hidden_states[v]

    def ours():
        return engine_run_tower(tower, px, v, True, None)[:3]  # (hidden states, cls_attn (n, H, S), keys (n, S, d))

    def official():
        out = tower(px, output_hidden_states=True, output_attentions=True, return_dict=True)
        return out.hidden_states[v], out.attentions[idx][:, :, 0]  # (n, H, S): [CLS] row of the select layer

    res = {"batch": batch, "units": units, "tokens_per_unit": s, "select_layer_index": idx,
           "attention_maps_bytes": len(tower.encoder.layers) * units * heads * s * s * px.element_size()}
    res["stock_sdpa"] = guarded(bench, stock, cfg.n, cfg.warmup, device)
    res["ours"] = guarded(bench, ours, cfg.n, cfg.warmup, device)
    with eager_tower(tower):
        res["official"] = guarded(bench, official, cfg.n, cfg.warmup, device)
        try:
            with torch.inference_mode():
                hs_o, cls_o = official()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            hs_o = cls_o = None
    if cls_o is not None:
        with torch.inference_mode():
            hs_s, cls_s, _ = ours()
        k = max(1, min(64, (s - 1) // 2))
        score_o = cls_o[:, :, 1:].float().mean(1)  # head mean over the patches (FasterVLM; VisionZip sums)
        score_s = cls_s[:, :, 1:].mean(1)
        top_o = [r.topk(k).indices.sort().values for r in score_o]
        top_s = [r.topk(k).indices.sort().values for r in score_s]
        ov = [_overlap(a, b) for a, b in zip(top_o, top_s)]
        res["ranking"] = {"k": k, "exact": all(torch.equal(a, b) for a, b in zip(top_o, top_s)),
                          "overlap_mean": sum(ov) / len(ov), "overlap_min": min(ov),
                          "cls_attn_max_abs_diff": float((cls_o.float() - cls_s).abs().max()),
                          "hidden_max_abs_diff": float((hs_o.float() - hs_s.float()).abs().max())}
        del hs_o, cls_o, hs_s, cls_s
    for key in ("ours", "official"):
        a, b = res[key]["time_s"], res["stock_sdpa"]["time_s"]
        if a and b:
            res[f"{key}_minus_stock_s"] = a["median"] - b["median"]
    a, b = res["official"]["time_s"], res["ours"]["time_s"]
    if a and b:
        res["diff_s"] = a["median"] - b["median"]
        res["speedup"] = a["median"] / b["median"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


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
        return (2 * s, 2 * s) if parts.family == "llava_next" else (s, s)


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


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.efficiency_official", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config(models=[])
    ap.add_argument("--model", nargs="+", default=["tiny:llava"], dest="models",
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


if __name__ == "__main__":
    sys.exit(main())

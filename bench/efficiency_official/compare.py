"""The engine's signal computation against the official implementations' way, on the same inputs:
(a) FastV's decoder layer K-1 and its visual-token ranking (:func:`run_fastv`), (b) the vision tower with
the select layer's [CLS] attention, VisionZip / FasterVLM (:func:`run_tower`). Each returns its timings,
the memory the official way materialises, and whether the two rankings agree."""

from __future__ import annotations

import copy

import torch

from bench.efficiency.inputs import build_batch, make_inputs
from bench.efficiency_official.parts import Parts, _fastv_method, units_per_image
from bench.efficiency_official.timing import bench, eager_llm_attention, eager_tower, guarded


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

    from llava.attention_rows import causal_attention_rows, llm_qk
    from llava.signals import LLMSignals

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


def run_tower(parts: Parts, batch: int, cfg, device, dtype) -> dict:
    tower = parts.tower
    vc = parts.config.vision_config
    units = batch * units_per_image(parts)
    g = torch.Generator().manual_seed(cfg.seed)
    px = torch.randn(units, 3, vc.image_size, vc.image_size, generator=g).to(device=device, dtype=dtype)
    from llava.families.clip import attention_layer, run_tower as engine_run_tower
    from llava.needs import TowerCall

    v = parts.config.vision_feature_layer
    idx = attention_layer(tower, v, None)
    s = (vc.image_size // vc.patch_size) ** 2 + 1
    heads = vc.num_attention_heads

    def stock():
        return tower(px, output_hidden_states=True, return_dict=True).hidden_states[v]

    def ours():
        return engine_run_tower(tower, px, v, TowerCall(attention=True))[:3]  # (hidden states, cls_attn (n, H, S), keys (n, S, d))

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

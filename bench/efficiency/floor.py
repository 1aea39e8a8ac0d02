"""Every fast-table row's physical floor: the time its prefill (TTFT) and one decode step (TPOT) cannot go under on
the device the run measured (:mod:`bench.efficiency.hardware`), and the row's distance from it.

A phase's floor is max(bytes it must read / bandwidth, FLOPs / matmul peak). A prefill has two phases that run one
after the other (the LLM needs the tower's output; neither's weights fit on chip), so its floor is their sum:

- vision: the tower's and the projector's weights read once (every parameter outside the language model and the
  LM head), and the tower's FLOPs: counted once per run by torch's FLOP counter on one unpruned prefill of the first
  input (:func:`vision_flops`: GEMMs, convolutions, attention; what the model runs, all of the tower's layers);
- LLM: the decoder's weights read once (the embedding table is a gather, not read whole), the LM head's, and the
  prompt's keys and values once (:func:`llava.cost.prompt_kv_bytes` at the row's per-layer lengths); FLOPs: the
  cost model's convention B (exact for LLaMA's SwiGLU) at the same lengths, plus the LM head at the last position.

A decode step is one phase: the decoder's and the LM head's weights plus the cache's keys and values (each layer's
prompt length + T/2: the average context of the T - 1 timed steps of a T-token answer), and
:func:`bench.efficiency.cost.decode_step_macs`. The lengths are the eager row's (the tokens the method keeps): the
fast path's padded bucket and its static cache's empty slots are the implementation's, not the floor's. A batch-B
row: the weights once, the per-sample bytes and FLOPs B times (batch-1 lengths). Not counted: a method's own extra
work (an LLM probe's layers, a selection's kernels) - the floor is the pruned model's, so the distance includes it.
``single`` (in the JSON) is the looser bound max(all bytes / bandwidth, all FLOPs / peak) over the whole prefill.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

import torch

from bench.efficiency.cost import decode_step_macs, hybrid_spec, llm_dims, prefill_macs
from llava.cost import prompt_kv_bytes

__all__ = ["weight_bytes", "vision_flops", "row_floor", "add_floors", "FLOOR_RULE"]

#: the rule in one line (the report states it)
FLOOR_RULE = ("floor TTFT = tower phase max(its weights' bytes / bandwidth, its FLOPs / peak) + LLM phase max((decoder "
              "+ LM head weights + the prompt's KV) / bandwidth, (convention-B prefill + LM head) FLOPs / peak); floor "
              "TPOT = max((decoder + LM head weights + KV at prompt + T/2) / bandwidth, decode-step FLOPs / peak); "
              "lengths: the eager row's kept tokens")


def weight_bytes(model) -> dict:
    """Bytes of the weights a forward reads, by phase, at their stored dtype: ``llm`` (the decoder's layers and final
    norm; the input embedding left out: a gather of the prompt's rows), ``head`` (the LM head, counted here also when
    tied to the embedding), ``vision`` (everything else: tower, projector / merger), ``embedding`` (left out)."""
    lm, head = model.model.language_model, model.lm_head
    emb = model.get_input_embeddings().weight
    head_ids = {id(p) for p in head.parameters()}
    lm_ids = {id(p) for p in lm.parameters()}
    out = {"llm": 0, "head": 0, "vision": 0, "embedding": 0}
    for p in model.parameters():  # each tied parameter once
        n = p.numel() * p.element_size()
        if id(p) in head_ids:
            out["head"] += n
        elif p is emb:
            out["embedding"] += n
        elif id(p) in lm_ids:
            out["llm"] += n
        else:
            out["vision"] += n
    return out


def _cpu_sdpa_flops(q, k, v, *args, out_val=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q.shape, k.shape, v.shape)


_cpu_sdpa_flops._get_raw = True  # FlopCounterMode hands it the tensors (its own formulas take shapes)


def vision_flops(model, batch) -> dict:
    """FLOPs of one prefill of ``batch`` on the model as it is (call it with no engine attached: the unpruned
    model), counted by ``torch.utils.flop_counter`` per module: ``vision`` = all of it minus the language model and
    the LM head (the tower, the projector), per sample; ``total``, ``llm``, ``head`` as counted. The CPU's SDPA kernel
    is counted as the GPU's (the counter knows only the latter)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    # force_eager: a fast-path model's marked layers (nested_compile_region) would otherwise call torch.compile under
    # the counter's dispatch mode, which dynamo refuses, and then skip those frames for the rest of the process
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with stance, torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**batch, use_cache=True, logits_to_keep=1)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total = counts.get("Global", 0)

    def under(suffix):  # the outermost module whose name ends with the suffix
        names = [k for k in counts if k.endswith(suffix)]
        return counts[min(names, key=len)] if names else 0

    llm, head = under(".language_model"), under(".lm_head")
    samples = int(batch["input_ids"].shape[0])
    return {"vision": (total - llm - head) / samples, "total": total, "llm": llm, "head": head, "samples": samples}


def row_floor(lengths: list, config, weights: dict, vision_flops_per_sample: float, hw: dict, dtype_bytes: int,
              decode_tokens: int, batch: int = 1) -> dict:
    """The floor of one row (seconds and its terms) from one sample's per-layer lengths (module docstring)."""
    d, m, _, d_kv = llm_dims(config)
    spec = hybrid_spec(config)
    vocab = config.text_config.vocab_size
    bw, peak = float(hw["bytes_per_s"]), float(hw["flops_per_s"])
    lengths = [float(n) for n in lengths]
    vis_bytes = weights["vision"]
    vis_flops = batch * vision_flops_per_sample
    kv = prompt_kv_bytes(config, lengths, dtype_bytes)
    llm_bytes = weights["llm"] + weights["head"] + batch * kv
    llm_flops = batch * 2 * (prefill_macs(lengths, d, m, "B", d_kv, spec) + d * vocab)
    t_vis, t_llm = max(vis_bytes / bw, vis_flops / peak), max(llm_bytes / bw, llm_flops / peak)
    ctx = [n + decode_tokens / 2 for n in lengths]  # the T - 1 timed steps attend to prompt + 1 .. T - 1 tokens
    dec_bytes = weights["llm"] + weights["head"] + batch * prompt_kv_bytes(config, ctx, dtype_bytes)
    dec_flops = batch * 2 * (decode_step_macs(ctx, d, m, d_kv, spec) + d * vocab)
    return {"ttft_s": t_vis + t_llm, "tpot_s": max(dec_bytes / bw, dec_flops / peak),
            "vision": {"bytes": vis_bytes, "flops": vis_flops, "s": t_vis,
                       "bound": "bytes" if vis_bytes / bw >= vis_flops / peak else "flops"},
            "llm": {"bytes": llm_bytes, "flops": llm_flops, "kv_bytes": batch * kv, "s": t_llm,
                    "bound": "bytes" if llm_bytes / bw >= llm_flops / peak else "flops"},
            "decode": {"bytes": dec_bytes, "flops": dec_flops,
                       "bound": "bytes" if dec_bytes / bw >= dec_flops / peak else "flops"},
            "single_s": max((vis_bytes + llm_bytes) / bw, (vis_flops + llm_flops) / peak), "batch": batch}


def add_floors(comparison: list[dict], eager_rows: list[dict], config, floor_model: dict, hw: dict,
               decode_tokens: int) -> None:
    """Each fast-vs-eager comparison row gets its floor (``floor``: the mean over the eager row's samples of
    :func:`row_floor`, with the first sample's terms; ``floor_ttft_s``, ``floor_tpot_s`` at batch 1) and the eager / fast medians over it."""
    from bench.efficiency.report import label

    by = {(label(e), e["budget"]): e for e in eager_rows}
    for c in comparison:
        e = by.get((c["label"], c["budget"]))
        if e is None or not e.get("records"):
            continue
        fl = [row_floor(r["layer_lengths"], config, floor_model["weights"], floor_model["vision_flops"], hw,
                        floor_model["dtype_bytes"], decode_tokens, c["batch"]) for r in e["records"]]
        f = {k: statistics.fmean(x[k] for x in fl) for k in ("ttft_s", "tpot_s", "single_s")}
        f.update(samples=len(fl), batch=c["batch"], first_sample=fl[0])  # the terms: bytes, FLOPs, bound per phase
        c["floor"] = f
        c["floor_ttft_s"] = f["ttft_s"]
        c["eager_ttft_over_floor"] = c["eager_ttft_median"] / f["ttft_s"]
        c["fast_ttft_over_floor"] = c["fast_ttft_median"] / f["ttft_s"]
        if c["batch"] == 1:
            c["floor_tpot_s"] = f["tpot_s"]
            for side in ("eager", "fast"):
                if c.get(f"{side}_tpot_median"):
                    c[f"{side}_tpot_over_floor"] = c[f"{side}_tpot_median"] / f["tpot_s"]

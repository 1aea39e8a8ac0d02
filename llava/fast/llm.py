"""The fast path's in-LLM stages (FastV, PyramidDrop, VisionDrop): the decoder run segment by segment
inside the one captured prefill, each stage's re-laid-out rows planned on the host.

An llm stage before decoder layer K keeps a number of visual tokens that depends on the sample's
structure only (its visual count, units, the stage), never on the image or the text. So the host plan
finds every stage's output count the way it finds the vision stage's (a dry run of ``select_llm`` on
``meta`` tensors), and with it each segment's row lengths, its length bucket, the gather that lays out
its rows ([pad, text before, the stage's outputs, text after], left-padded), its positions and its 4-D
mask. On the device the stage is: the sample's padded row -> :class:`~llava.signals.LLMSignals`
(``captured``: the pads masked out of every attention row) -> the selection -> the outputs (kept rows,
``merge_tokens``, ``order``) -> one gather into the next segment's rows. No host read.

The static cache holds each layer's own length: the layers of segment s write their bucket's rows at
slots 0..L_s-1 and their generated tokens from slot L_s on; each segment has its decode mask and its
positions (``keep``: the original positions continue; ``reindex``: after the segment's own length, as
the eager engine's per-segment shift does), which the one decode step (:func:`llava.decode.decode_step`) reads.

What is static about the segments (their layers, per-sample visual counts, buckets: the
:class:`llava.plan.PrefillPlan` without its rows, :meth:`~llava.plan.PrefillPlan.key`) and each stage's padded text
block is part of the graph key; what depends on the prompt's length (pads, the gather, positions, masks) travels as
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention_rows import CachedRows, cached_kv
from ..llm_stage import StageEntry, StageRows, stage_signals
from ..plan import PrefillPlan, rebuilt_row, stage_rows
from ..layers import run_layers
from ..selection import Selection
from ..selection_rows import DeepStack
from .inputs import StageInputs
from ..signals import LLMSignals
from ..stage_step import ask_llm, llm_step


def text_count(needs, n_text: int) -> int:
    """The text-after count an llm stage is shown on the fast path: clipped to ``needs.llm_text_cap`` (the method's
    :class:`llava.needs.Needs`), so that a count the method does not tell apart stays out of the graph key."""
    cap = needs.llm_text_cap
    return n_text if cap is None else min(n_text, int(cap))


def count_stages(env, vision_sig, nv0: int, S: int, n_text: int, Q: int) -> tuple:
    """Each llm stage's output count for a sample whose ``nv0`` visual tokens enter decoder layer 0 and
    ``n_text`` tokens follow the image (padded to ``Q`` text rows), from dry runs of ``select_llm`` on
    ``meta`` tensors (``vision_sig``: the sample's meta vision signals, or None), padded rows of ``S``.
    Raises what the method raises when it reads a device value."""
    m, needs, lm = env.method, env.needs, env.lm
    cfg = lm.config
    D = cfg.hidden_size
    H = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or H
    hd = getattr(cfg, "head_dim", None) or D // H
    meta = torch.device("meta")
    state: dict = {}
    out, nv = [], nv0
    for stage in range(len(needs.llm_layers)):
        if not nv:
            out.append(0)
            continue
        vis = torch.empty(nv, dtype=torch.long, device=meta)
        text = text_mask = None
        if needs.llm_text_rows:
            text = torch.empty(Q, dtype=torch.long, device=meta)
            text_mask = torch.empty(Q, dtype=torch.bool, device=meta)
        sig = LLMSignals(layer=needs.llm_layers[stage], hidden=torch.empty(S, D, device=meta),
                         position_ids=torch.empty(S, dtype=torch.long, device=meta), visual=vis, origin=vis,
                         text_after=text, question=None, text_mask=text_mask, _num_text=n_text, visual_embeds=torch.empty(nv, D, device=meta),
                         text_embeds=torch.empty(Q, D, device=meta) if needs.llm_text_rows else None,
                         num_visual_entry=nv0, entry_visual_embeds=torch.empty(nv0, D, device=meta),
                         state=state, prev_hidden=torch.empty(S, D, device=meta), vision=vision_sig, captured=True,
                         key_mask=torch.empty(S, dtype=torch.bool, device=meta),
                         _attn_fn=lambda rows, which, **kw: torch.empty(H, rows.numel(), S, device=meta),
                         _keys_fn=lambda which, rope: torch.empty(S, hkv, hd, device=meta),
                         _qv_fn=lambda kind, which, rows=None, rope=True: (
                             torch.empty(H, rows.numel(), hd, device=meta) if kind == "queries"
                             else (torch.empty(S, hd, device=meta),) * 2 if kind == "rotary"
                             else torch.empty(S, hkv, hd, device=meta)),
                         _norm=lambda x: torch.empty_like(x))
        sel = ask_llm(m, stage, sig)
        if sel.values is not None:
            raise ValueError("Selection.values in an llm stage (rewritten hidden states) runs on the eager engine only")
        nv = sel.num_out
        out.append(nv)
    return tuple(out)


def plan_stages(needs, rows, layouts, plan: PrefillPlan, counts, buckets, bucket_for, text_buckets=(),
                deepstack: int = 0):
    """The host plan of the llm segments. ``rows``: per sample the prompt's :class:`llava.plan.RowLayout`;
    ``layouts``: per sample the layout of its row entering decoder layer 0 (in its bucket); ``plan``: the
    :class:`llava.plan.PrefillPlan` of those rows (one segment); ``counts``: per sample, its visual tokens entering
    layer 0 then after each stage. Returns the plan advanced at every stage (each segment's rows per sample and
    bucket), the stages' host tensors (one :class:`llava.fast.inputs.StageInputs` per stage: the visual rows entering
    it, the next rows' gather, positions, first-position gather, pad rows per sample, from which the 4-D mask is built
    on the device, :func:`prompt_mask`) and what each stage shows the method of the text after the image (``needs``:
    the method's :class:`llava.needs.Needs`): with ``needs.llm_text_rows`` per stage (the padded rows per sample, the
    real rows per sample up to the method's cap), the rows themselves padded to ``text_buckets`` (``text``,
    ``text_mask``); else ``()``. For a stage before decoder layer ``deepstack`` (DeepStack levels still to add) also
    the next segment's visual rows, flattened (``ds_at``)."""
    tensors, texts = [], []
    for stage, layer in enumerate(needs.llm_layers):
        seg = plan.segments[-1]
        Lp = seg.width
        m_out = [c[stage + 1] for c in counts]
        maps = [rebuilt_row(n, [(lay.first, nv)], [m]) for lay, n, nv, m in zip(rows, seg.rows, seg.visual, m_out)]
        Lb = bucket_for(max(r.n for r in maps), buckets)
        text, text_mask, text_q, n_text = [], [], [], []
        if needs.llm_text_rows:  # the rows after the image in the row entering the stage, padded
            for lay, n_old, nv in zip(rows, seg.rows, seg.visual):
                p0, pad_old = lay.first, Lp - n_old
                n_after = n_old - p0 - nv
                Q = bucket_for(n_after, text_buckets)
                real = torch.arange(Q) < n_after
                text.append(torch.where(real, pad_old + p0 + nv + torch.arange(Q), 0))
                text_mask.append(real)
                text_q.append(Q)
                n_text.append(text_count(needs, n_after))
        vis = torch.cat([lay.real[lay.visual] for lay in layouts])
        plan, layouts, g = stage_rows(plan, layer, layouts, maps, Lp, Lb, pad_src=0)  # pad rows read row 0
        # its mask: prompt_mask on the device, from the pads
        tensors.append(StageInputs(vis=vis, src=g.src, ar=g.ar, first=g.first, pad=g.pad,
                                   text=torch.cat(text) if text else None,
                                   text_mask=torch.cat(text_mask) if text else None,
                                   ds_at=g.vis_at if layer < deepstack else None))
        if text:
            texts.append((tuple(text_q), tuple(n_text)))
    return plan, tensors, tuple(texts)


def prompt_mask(pad: torch.Tensor, Lb: int, C: int) -> torch.Tensor:
    """(B, 1, Lb, C) bool from ``pad`` (B,) pad rows per sample (``Lb`` minus its real rows): rows left-padded to
    ``Lb``, causal over the real rows (row i sees [pad, i]), a pad row sees itself (no all-masked row: no NaN),
    the decode slots [Lb, C) unseen. Built where ``pad`` is, in a few element-wise kernels inside the captured
    prefill: the host plans only ``pad`` (a mask built on the host would be Lb x C bools per sample: at
    LLaVA-NeXT's 3072-row bucket 10 M, built and copied over at every prefill, several ms)."""
    i = torch.arange(Lb, device=pad.device)[:, None]
    j = torch.arange(C, device=pad.device)
    lo = torch.minimum(pad[:, None, None], i)  # (B, Lb, 1): a real row's first real row; a pad row: itself
    return ((j <= i) & (j >= lo))[:, None]


@dataclass
class Entry:
    """What enters the decoder of a captured prefill with llm stages: ``rows`` (B, L, D) and their ``pos`` / 4-D
    ``mask``; per sample ``visual0`` its visual rows among them, ``vision`` its vision stage's signals (or None)
    and ``origins`` each visual token's source candidate; ``ds`` the DeepStack rows at the visual rows (Qwen3-VL;
    None elsewhere)."""

    rows: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    visual0: list
    vision: list
    origins: list
    ds: DeepStack | None = None


def run_segments(env, entry: Entry, cache, segments: tuple, texts: tuple, stage_in: tuple, bad, attn):
    """The decoder over a captured prefill's rows with its llm stages (device, static shapes): ``segments`` the
    planned segments of decoder layers (:meth:`llava.plan.PrefillPlan.key`: an llm stage acts before each segment
    after the first), ``texts`` each stage's text-after block (:func:`plan_stages`) and ``stage_in`` the stages'
    uploaded tensors; a stage before the last DeepStack level carries the rows through its selection, as the eager
    engine. Returns the last rows' hidden states (B, 1, D) after the final norm, and ``bad`` ORed with every stage's
    malformed flags; ``attn``: rows -> the decoder's attention keyword for a prompt bucket (:mod:`llava.fast.attention`)."""
    lm, method = env.lm, env.method
    rows, pos, mask, ds = entry.rows, entry.pos, entry.mask, entry.ds
    B = rows.shape[0]
    entry_text = [None] * B
    if len(segments) > 1:
        entry_in = [rows[b][v] for b, v in enumerate(entry.visual0)]  # each visual token's input to layer 0
        at_entry = [torch.arange(v.numel(), device=rows.device) for v in entry.visual0]
        if texts:  # the text-after tokens' inputs to layer 0 (padded; segment 0's rows)
            at_t = 0
            for b, q in enumerate(texts[0][0]):
                entry_text[b] = rows[b][stage_in[0].text[at_t:at_t + q]]
                at_t += q
    origin = list(entry.origins)
    state = [{} for _ in range(B)]
    kw = dict(past_key_values=cache, use_cache=True)
    h, prev = run_layers(lm, rows, mask, lm.rotary_emb(rows, position_ids=pos), segments[0].layers, ds,
                         **kw, **attn(rows))
    for s, (seg_in, seg, t) in enumerate(zip(segments, segments[1:], stage_in)):
        layer = seg.layers.start  # the stage acts before this decoder layer
        if ds is not None and layer >= ds.rows.shape[1]:
            ds = None  # every level was added before this stage
        outs, vps, deep = [], [], []
        ds_in = ds.rows.split(list(seg_in.visual)) if ds is not None else None
        at = at_t = 0
        kv = cached_kv(cache, lm, layer - 1, h.shape[1])  # layer K-1 wrote these rows at slots 0..bucket-1
        for b in range(B):
            nv, m = seg_in.visual[b], seg.visual[b]
            vis = t.vis[at:at + nv]
            at += nv
            text_rows = text_mask = n_text = None
            if texts:
                q = texts[s][0][b]
                text_rows, text_mask = t.text[at_t:at_t + q], t.text_mask[at_t:at_t + q]
                n_text = texts[s][1][b]
                at_t += q
            if not nv:
                continue
            S = h.shape[1]
            one = StageRows(x=h[b], p=pos[..., b, :], prev=prev[b], vis=vis, origin=origin[b], entry=at_entry[b],
                            kv=CachedRows(kv, b, slice(0, S)) if kv is not None else None, key_mask=mask[b, 0, -1, :S])
            sig = stage_signals(lm, layer, one, StageEntry(entry_in[b], entry_text[b], state[b], entry.vision[b]),
                                text_after=text_rows, question=None, text_mask=text_mask, _num_text=n_text)
            sel = ask_llm(method, s, sig)
            if sel.values is not None:
                raise ValueError("Selection.values in an llm stage (rewritten hidden states) runs on the eager engine only")
            if sel.num_out != m:
                raise RuntimeError(f"{method.name} stage {s} gave {sel.num_out} outputs where the plan has {m}")
            flags = sel.flags(nv, nv, malformed_only=True)
            for name in Selection.MALFORMED:
                if name in flags:
                    bad = bad | flags[name]
            out = llm_step(sel, one, ds_in[b] if ds_in is not None else None)  # DeepStack rows follow the selection
            outs.append(out.rows)
            if ds_in is not None:
                deep.append(out.deep)
            vps.append(out.pos)  # a merged token takes its target's position
            origin[b], at_entry[b] = out.origin, out.entry
        Lb = seg.width
        h = torch.cat([h.reshape(-1, h.shape[-1])] + outs)[t.src].view(B, Lb, -1)
        R = pos.shape[:-2]  # () or (3,) (M-RoPE: kept positions, never renumbered)
        p2 = torch.cat([pos.reshape(*R, -1)] + vps, -1)[..., t.src].view(*R, B, Lb)
        if env.reindex:  # renumbered from the row's first position, as the eager engine
            p2 = t.ar + p2.reshape(-1)[t.first][:, None]
        pos, mask = p2, prompt_mask(t.pad, Lb, mask.shape[-1])
        if ds is not None:  # a sample without visual tokens left carries no rows
            ds = DeepStack(torch.cat(deep) if deep else ds.rows[:0], t.ds_at)
        h, prev = run_layers(lm, h, mask, lm.rotary_emb(h, position_ids=pos), seg.layers, ds, **kw, **attn(h))
    return lm.norm(h[:, -1:]), bad


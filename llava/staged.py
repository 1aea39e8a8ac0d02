"""The staged decoder: the prefill through the decoder layers with the method's ``llm`` stages between
them, the ``LLMSignals`` of a stage, and the decode-time mapping of generate's mask / positions onto
each segment of layers.

:class:`StagedDecoder`, the second part of the eager executor, built by :class:`llava.engine.PruningEngine` from
what it fixed at attach (:class:`llava.prefill.EngineEnv`); the rows of an llm stage are re-laid out on the host
with :mod:`llava.layout`'s ``place_outputs`` and :mod:`llava.plan`'s ``next_rows`` (its row arithmetic). It
keeps no state of its own: a prefill returns the :class:`llava.plan.PrefillPlan` it ran and its decode segments, and a
decode step is handed the engine's decode state. Without llm stages the stock language model runs, at prefill and at
decode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask

from .attention_rows import CachedRows, cached_kv
from .decode import decode_step
from .families.base import to_device as _to_device
from .layers import decoder_masks, first_full_layer, run_layers
from .layout import place_outputs
from .llm_stage import StageEntry, StageRows, stage_signals
from .plan import PrefillPlan, stage_rows, text_spans
from .prefill import EngineEnv, _Prefill
from .proxy_grad import proxy_loss_grad
from .selection import Selection
from .selection_rows import DeepStack, _deepstack, regathered
from .stage_step import ask_llm, llm_step
from .subblocks import SubBlockRecorder


@dataclass
class _Rows:
    """The decoder's rows through a staged prefill, replaced by each llm stage: the hidden states ``h`` (B, L, D)
    entering the next layer, their 2-D ``mask`` and positions ``pos``; per sample its host layout (``layouts``),
    each visual token's source candidate (``origin``) and its index among the visual tokens entering layer 0
    (``entry``); ``ds`` the DeepStack rows still to add (Qwen3-VL; None once added); ``prev`` the input of the
    last layer that ran; ``shift`` (B,) the rows each sample dropped so far (reindex mode's positions)."""

    h: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    layouts: list
    origin: list
    entry: list
    ds: DeepStack | None
    shift: torch.Tensor
    prev: torch.Tensor | None = None


@dataclass
class _DecodeSegment:
    start: int  # first decoder layer of the segment
    mask: torch.Tensor  # (B, L_s) 2-D mask of the prompt part of this segment's cache
    shift: torch.Tensor  # (B,) subtract from LLM-space decode positions (reindex mode)


class StagedDecoder:
    """The decoder of the eager executor: prefill (stock or staged) and decode."""

    def __init__(self, env: EngineEnv):
        self.env = env
        self.model, self.adapter, self.lm = env.model, env.adapter, env.lm
        self.method, self.needs = env.method, env.needs
        self.llm_layers = env.needs.llm_layers

    # ------------------------------------------------------------------ decoder
    def prefill(self, ctx: _Prefill, embeds, mask, pos, cache, use_cache, info, **kwargs):
        """Run the decoder on the prompt. Returns hidden, the :class:`llava.plan.PrefillPlan` it ran (extended after
        each llm stage) and the decode segments (None: the stock language model ran). Each llm stage is marked on
        ``ctx.clock`` (its time counts as selection)."""
        B, L = embeds.shape[:2]
        layouts, plan = info.layouts, info.plan  # the plan starts on the vision stage's rows (llava.plan.vision_rows)
        ds = info.deepstack  # Qwen3-VL: rows added at the visual positions after the first layers
        if not self.llm_layers:
            if ds is not None:  # the stock text model adds them (row-major order of the mask)
                kwargs = dict(kwargs, visual_pos_masks=ds.mask, deepstack_visual_embeds=list(ds.rows.unbind(1)))
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=use_cache, **kwargs)
            return out.last_hidden_state, plan, None
        lm = self.lm
        dev = embeds.device
        if pos is None:  # what the stock model does without position ids
            pos = torch.arange(L, device=dev)[None].expand(B, L)
        if mask is None:  # always an explicit mask: transformers must never read position gaps as packing
            mask = torch.ones(B, L, dtype=torch.long, device=dev)
        origin = info.origin or [torch.arange(lay.visual.numel(), device=dev) for lay in layouts]
        entry = [torch.arange(lay.visual.numel(), device=dev) for lay in layouts]  # index at layer-0 entry
        moved = _to_device([t for lay in layouts for t in
                            (lay.real[lay.visual], lay.real[text_spans(lay.ids, lay.visual, self.env.prompt_spec)[0]])],
                           dev)
        # per sample: its visual and text-after tokens' layer-0 inputs, its stages' scratch for this prefill
        ctx.entry = [StageEntry(embeds[b, moved[2 * b]], embeds[b, moved[2 * b + 1]], {}, ctx.vision_sigs[b])
                     for b in range(B)]
        ctx.cache = cache
        rows = _Rows(h=embeds, mask=mask, pos=pos, layouts=layouts, origin=origin, entry=entry, ds=ds,
                     shift=torch.zeros(B, dtype=torch.long, device=dev))
        sub = self.needs.llm_subblock_layers
        ctx.subblocks = {}
        rec = SubBlockRecorder(lm.layers, sub) if sub else None
        try:
            plan, segments = self._staged_loop(ctx, plan, rows, rec, use_cache, **kwargs)
        finally:
            if rec is not None:
                rec.remove()
            ctx.subblocks = {}
        return lm.norm(rows.h), plan, segments

    def _staged_loop(self, ctx: _Prefill, plan: PrefillPlan, rows: "_Rows", rec, use_cache, **kwargs):
        """The segments of decoder layers with an llm stage between each two (``prefill``), ``rows`` advanced
        through them in place; ``rec``: the sub-block recorder of the method's ``llm_subblock_layers`` (None when it
        names none), whose states of the layers since the previous stage are handed to each stage
        (``ctx.subblocks``); the layers write the prompt's cache, ``ctx.cache``. Returns ``plan`` advanced by each
        stage and the decode segments."""
        lm, cache = self.lm, ctx.cache
        bounds = [0, *self.llm_layers, len(lm.layers)]
        # reference modes: layers whose prefill runs on eager attention, as the official code's score layers do
        eager = set(self.needs.eager_layers)
        past = self.needs.prune_past_cache and cache is not None
        past_from = self.needs.past_cache_from  # the first layer whose cache an llm stage prunes
        segments: list[_DecodeSegment] = []
        for s in range(len(bounds) - 1):
            a, z = bounds[s], bounds[s + 1]
            if s > 0:
                ctx.clock.mark("stage_start")
                ctx.subblocks = rec.take() if rec is not None else {}
                if rows.ds is not None and a >= rows.ds.rows.shape[1]:
                    rows.ds = None  # every DeepStack level was added before this stage
                plan, dropped, src_rows = self._llm_stage(ctx, plan, rows, s - 1, a, keep_rows=past)
                if self.env.reindex:
                    rows.shift = rows.shift + dropped
                if past:  # the layers before the stage keep the kept rows only: those segments now have this layout
                    segments[:] = _past_segments(segments, past_from, a, rows.mask, rows.shift)
                    _gather_past(cache, a, src_rows, past_from)
                ctx.clock.mark("stage_end")
            h, mask, pos, ds = rows.h, rows.mask, rows.pos, rows.ds
            segments.append(_DecodeSegment(start=a, mask=mask, shift=rows.shift.clone()))
            masks = decoder_masks(self.adapter, lm, h, mask, cache, pos, a, z)
            pe = lm.rotary_emb(h, position_ids=pos)
            swap = {i: partial(self._eager_layer, i, mask=mask, cache=cache, pos=pos, pe=pe, use_cache=use_cache,
                               **kwargs) for i in eager if a <= i < z}
            # positions travel in `pe`; no position_ids, so no attention backend reads their gaps
            # (FastV keeps original positions) as packed sequences
            rows.h, rows.prev = run_layers(lm, h, masks, pe, range(a, z), ds, swap, past_key_values=cache,
                                           use_cache=use_cache, **kwargs)
        return plan, segments

    def _eager_layer(self, i, h, mask, cache, pos, pe, use_cache, **kwargs):
        """Decoder layer ``i`` on transformers' eager attention (q k^T scaled in the model's dtype, the softmax in
        fp32 cast back, then · v), with its own eager causal mask: what an official code that asks that layer for
        its attention map (``output_attentions=True``) runs (``Method.eager_layers``)."""
        attn = self.lm.layers[i].self_attn
        cfg = copy.copy(attn.config)
        cfg._attn_implementation_internal = "eager"
        m = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=mask, past_key_values=cache,
                               position_ids=self.adapter.mask_positions(pos), layer_idx=i)
        old, attn.config = attn.config, cfg
        try:
            return self.lm.layers[i](h, attention_mask=m, position_embeddings=pe, past_key_values=cache,
                                     use_cache=use_cache, **kwargs)
        finally:
            attn.config = old

    def _llm_stage(self, ctx: _Prefill, plan: PrefillPlan, rows: "_Rows", stage: int, layer_idx: int,
                   keep_rows: bool = False):
        """One llm stage on the padded batch: ``rows`` replaced by the stage's outputs, laid out by one gather
        (:func:`llava.plan.stage_rows`, as the captured executor's; pad rows read a zero row). Returns ``plan``
        advanced by the stage, (B,) the rows each sample dropped and, with ``keep_rows``, (B, L') the row of the old
        ``h`` each new row came from (a merged token: its target's; padding: row 0) for ``_gather_past``, else None."""
        h, mask, pos, layouts, ds = rows.h, rows.mask, rows.pos, rows.layouts, rows.ds
        B, L, D = h.shape
        dev = h.device
        spans = [text_spans(lay.ids, lay.visual, self.env.prompt_spec) for lay in layouts]
        moved = _to_device([t for lay, (after, q) in zip(layouts, spans) for t in (lay.real, lay.visual, after, q)], dev)
        placed, outs, new_org, new_ent = [], [], [], []
        deep_in = ds.rows.split([int(lay.visual.numel()) for lay in layouts]) if ds is not None else None
        deep_out = []
        kv = cached_kv(ctx.cache, self.lm, layer_idx - 1, L)  # layer K-1 ran on these rows: its keys / values
        for b, lay in enumerate(layouts):
            real, vis, after, question = moved[4 * b:4 * b + 4]
            nv = int(lay.visual.numel())
            one = StageRows(x=h[b, real], p=pos[..., b, real],
                            prev=rows.prev[b, real] if rows.prev is not None else None, vis=vis, origin=rows.origin[b],
                            entry=rows.entry[b],
                            kv=CachedRows(kv, b, real) if kv is not None else None)
            sig = stage_signals(self.lm, layer_idx, one, ctx.entry[b], text_after=after, question=question,
                                subblocks={i: st.rows((b, real)) for i, st in ctx.subblocks.items()},
                                _grad_fn=self._grad_fn(layer_idx, one))
            sel = self.env.select((stage, b), lambda: ask_llm(self.method, stage, sig)) if nv else None
            if sel is None or sel.check(nv):
                sel = Selection(keep=torch.arange(nv, device=dev))
            out = llm_step(sel, one, deep_in[b] if deep_in is not None else None)  # DeepStack rows follow it
            r, perm = place_outputs(lay, None, out.src, dev)  # the visual tokens are the candidates
            if perm is not None:
                out = out.permuted(perm)
            if deep_in is not None:
                deep_out.append(out.deep)
            # a merged token takes its target's position (and, for _gather_past, its row)
            outs.append((out.rows, out.pos, real[vis[out.src]]))
            placed.append(r)
            new_org.append(out.origin)
            new_ent.append(out.entry)
        plan, new_layouts, g = stage_rows(plan, layer_idx, layouts, placed, L, compact=True)
        new_L, m2_h = g.width, g.mask
        dropped = [int(lay.real.numel()) - r.n for lay, r in zip(layouts, placed)]
        ds_at = [g.vis_at] if deep_in is not None else []  # what only DeepStack / reindex read
        renum = [g.ar, g.first] if self.env.reindex else []
        moved = _to_device([g.src, g.take, m2_h.to(mask.dtype), torch.tensor(dropped)] + ds_at + renum, dev)
        src, take, m2, dropped = moved[:4]
        h2 = regathered([h.reshape(-1, D).index_select(0, take)] + [vx for vx, _, _ in outs], src).view(B, new_L, D)
        R = pos.shape[:-2]  # () or (3,) (M-RoPE)
        p2 = regathered([pos.reshape(*R, -1).index_select(-1, take)] + [vp for _, vp, _ in outs], src, -1)
        p2 = p2.view(*R, B, new_L)
        if self.env.reindex:  # renumbered from each row's first position (1-D positions); pads 0
            ar, first = moved[-2:]
            p2 = torch.where(m2.bool(), ar + p2.reshape(-1)[first][:, None], 0)
        src_rows = None
        if keep_rows:
            # each old row's position in its sample's row
            src_rows = regathered([take % L] + [o for _, _, o in outs], src).view(B, new_L)
        if deep_in is not None:
            ds = _deepstack(torch.cat(deep_out), moved[4], B, new_L)
        rows.h, rows.mask, rows.pos, rows.layouts, rows.origin, rows.entry, rows.ds = \
            h2, m2, p2, new_layouts, new_org, new_ent, ds
        return plan, dropped, src_rows

    def _grad_fn(self, layer_idx: int, one: StageRows):
        """TRIO's proxy-loss gradient of a sample's rows ``one`` entering decoder ``layer_idx``
        (``LLMSignals.grad_saliency``), eager only."""
        lm = self.lm

        def grad_fn(rows, which):
            i = layer_idx if which == "next" else layer_idx - 1
            if which not in ("next", "prev"):
                raise ValueError(f"layer must be 'next' or 'prev', got {which!r}")
            head = getattr(self.model, "lm_head", None)
            head = self.model.get_output_embeddings() if head is None else head

            def mask_fn(h, pp):  # layer i's causal mask of this one unpadded sequence without a cache; no 2-D mask
                # and no positions, so transformers reads nothing back (padding / packed-sequence checks)
                return create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                                          position_ids=None)

            return proxy_loss_grad(lm.layers[i], lm.norm, head, lm.rotary_emb, one.x, one.p, rows, mask_fn)

        return grad_fn

    def decode(self, st, embeds, attention_mask, position_ids, cache, use_cache, **kwargs):
        """One decode call: the one decode step (:func:`llava.decode.decode_step`) on the decode shape the prefill
        left (``st.shape``: its segments, 2-D padding masks) with generate's mask / positions mapped onto each
        segment's cache (:meth:`step_inputs`). ``st``: the engine's decode state (``llava.engine._State``)."""
        masks, positions = self.step_inputs(st, embeds, attention_mask, position_ids, cache)
        return decode_step(self.lm, self.adapter, st.shape, embeds, masks, positions, cache, use_cache, **kwargs)

    def step_inputs(self, st, embeds, attention_mask, position_ids, cache) -> tuple[list, list]:
        """Each segment's 2-D mask and positions of one decode call (lists, one entry per segment of ``st.shape``;
        one without llm stages), mapped from generate's original-space mask / positions onto each segment's cache.

        ``attention_mask`` is generate's 2-D mask in the original space (the prompt as generate sees it,
        then the generated part), or, with a static cache, the engine's own (segments, B, max_cache_len)
        masks in LLM space (``PruningEngine._generate_mask``, built outside the step). With those the call
        is traceable as ONE graph by transformers' compiled decode step: no Python integer that changes per
        step (or per prompt) is read or written here; the tokens decoded so far come from the cache (a
        tensor in a static cache)."""
        B, q = embeds.shape[:2]
        own = attention_mask is not None and attention_mask.ndim == 3  # the engine's per-segment masks
        gen_mask = attention_mask[:, st.orig_len:] if attention_mask is not None and not own else None
        if position_ids is not None:
            position_ids = position_ids - st.pos_shift[:, None]  # original -> LLM space
        if position_ids is None and st.pos_base is not None:  # M-RoPE: continue after the last prompt position
            position_ids = st.pos_base[..., None] + self._first_len(st, cache) + torch.arange(q, device=embeds.device)
        if st.segments is None:  # no llm stage: the stock decoder on the (possibly shortened) cache
            if own:
                mask = attention_mask[0]
            else:
                mask = attention_mask
                if st.llm_mask is not None:
                    if gen_mask is None:  # generate() drops an all-ones mask; the pruned prompt may still have padding
                        gen_mask = self._gen_ones(cache, 0, B, q, st.llm_len, embeds.device)
                    mask = torch.cat([st.llm_mask, gen_mask.to(st.llm_mask.dtype)], 1)
            return [mask], [position_ids]
        if position_ids is None:  # the stock rule: continue after layer 0's cache
            position_ids = (self._first_len(st, cache) + torch.arange(q, device=embeds.device))[None].expand(B, q)
        bounds = [s.start for s in st.segments] + [len(self.lm.layers)]
        masks, positions = [], []
        for s, seg in enumerate(st.segments):
            if own:
                mask = attention_mask[s]
            else:  # always explicit (see prefill)
                gm = gen_mask
                if gm is None:  # as wide as the segment's first attention layer's cache (hybrid: not a linear one)
                    full = first_full_layer(self.adapter, seg.start, bounds[s + 1])
                    gm = (torch.ones(B, q, dtype=torch.long, device=embeds.device) if full is None  # linear layers
                          else self._gen_ones(cache, full, B, q, seg.mask.shape[1], embeds.device))  # read q columns
                mask = torch.cat([seg.mask, gm.to(seg.mask.dtype)], 1)
            masks.append(mask)
            positions.append(position_ids - seg.shift[:, None])
        return masks, positions

    def _first_len(self, st, cache) -> int:
        """Tokens in the cache of the first segment (layer 0's, or on a hybrid model its first attention layer's:
        linear-attention layers keep a state, not a length)."""
        segs = st.segments
        stop = segs[1].start if segs is not None and len(segs) > 1 else len(self.lm.layers)
        full = first_full_layer(self.adapter, 0, stop)
        if full is None:
            raise ValueError("a decode step without position ids on a hybrid model whose first llm stage comes before "
                             "any attention layer: pass position_ids (generate() does)")
        # earlier-cache pruning (Method.prune_past_cache; eager engine, dynamic caches) left layer 0's cache as short as
        # the first segment's prompt: add back the rows it dropped from the prompt that entered layer 0. Read only
        # then: a compiled decode step (static cache) must not read the prompt's length
        drop = 0
        if segs and self.needs.prune_past_cache:
            drop = st.llm_len - segs[0].mask.shape[1]
        return cache.get_seq_length(full) + drop

    @staticmethod
    def _gen_ones(cache, layer, B, q, prompt_len, device):
        """The generated part of a 2-D decode mask when generate() passed none (all ones): as wide as layer
        ``layer``'s cache will be after this step (its length + q) minus its prompt part."""
        kv_len, _ = cache.get_mask_sizes(q, layer)
        return torch.ones(B, kv_len - prompt_len, dtype=torch.long, device=device)


def _past_segments(segments: list, start: int, upto: int, mask, shift) -> list:
    """The decode segments after an llm stage before layer ``upto`` pruned the caches of layers ``start``..upto-1
    (``Method.past_cache_from``): a segment that begins before ``start`` keeps its own layout, one that begins at
    or after it takes the stage's (``mask``, ``shift``), and the segment that holds layer ``start`` is split there
    (IVC-Prune's official LLaVA code leaves layer 0's cache whole and prunes layers 1..K-1)."""
    out = [sg for sg in segments if sg.start < start]
    if start < upto:
        out.append(_DecodeSegment(start=start, mask=mask, shift=shift.clone()))
    out += [_DecodeSegment(start=sg.start, mask=mask, shift=shift.clone())
            for sg in segments if start < sg.start < upto]
    return out


def _gather_past(cache, upto: int, rows: torch.Tensor, start: int = 0) -> None:
    """Keep in the caches of decoder layers start..upto-1 only the rows an llm stage kept (``rows`` (B, L'): the old
    row of each new one), as the official codes of PriorTR and CLSE do from layer 0 (``Method.prune_past_cache``)
    and IVC-Prune's LLaVA code from layer 1 (``Method.past_cache_from``): a decode step then attends to the kept
    tokens alone in those layers. Dynamic caches of attention layers only."""
    for i in range(start, upto):
        layer = cache.layers[i]
        if not isinstance(layer, DynamicLayer) or not getattr(layer, "is_initialized", True):
            raise ValueError(f"pruning the earlier layers' caches needs a dynamic cache of attention layers; decoder "
                             f"layer {i} has a {type(layer).__name__} (a static cache, or a linear-attention layer)")
        k = layer.keys
        idx = rows[:, None, :, None].expand(k.shape[0], k.shape[1], rows.shape[1], k.shape[3])
        layer.keys = k.gather(2, idx)
        layer.values = layer.values.gather(2, idx)

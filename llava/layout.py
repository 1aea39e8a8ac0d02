"""The vision stage, planned on the host: from the spliced prompt to each sample's ``VisionSignals``, and
from the method's selections back to re-spliced, re-padded rows.

:class:`VisionStage`, the first part of the eager executor, built by :class:`llava.engine.PruningEngine` from what
it fixed at attach (:class:`llava.prefill.EngineEnv`). The layout of every row is worked out on the host from ONE
copy of ``input_ids`` and the mask per prefill (:class:`llava.plan.RowLayout`: real positions, visual indices, ids,
the captured plan's record too); the device only gathers and scatters with those indices, and a rebuilt row is laid
out by :mod:`llava.plan`'s row arithmetic (:func:`place_outputs`, :func:`llava.plan.vision_rows`, as the captured
executor's, which also starts the prefill's :class:`llava.plan.PrefillPlan`). The staged decoder
(:mod:`llava.staged`) re-uses them at its llm stages.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .attention_rows import sample_probe
from .candidates import gather_tokens, vision_signals, with_cls
from .families.base import TokenTable, cls_rows, join_units, sample_units, visual_ids
from .families.base import to_device as _to_device
from .layers import decoder_masks, entering
from .plan import (PrefillPlan, RowLayout, RowMap, rebuilt_row, row_layouts, run_ids, run_spans, sample_key, text_spans,
                   vision_rows)
from .positions import first_positions, prompt_positions, renumbered
from .pre_tower import pixel_stage
from .prefill import EngineEnv, VisionOut, _Prefill
from .selection import Selection
from .selection_rows import _deepstack, regathered
from .signals import VisionSignals
from .stage_step import ask_vision, vision_outputs

#: the engine's one logger: users (and tests) configure "llava.engine"
log = logging.getLogger("llava.engine")


class VisionStage:
    """The vision stage of the eager executor: signals per sample, the method's selection, re-splicing /
    re-padding; the probe that lets a vision stage look into the LLM."""

    def __init__(self, env: EngineEnv):
        self.env = env
        self.adapter, self.lm, self.method, self.needs = env.adapter, env.lm, env.method, env.needs

    # ------------------------------------------------------------------ prefill inputs (vision stage)
    def run(self, ctx: _Prefill, input_ids, visual: dict, attention_mask, position_ids):
        """The LLM's prefill inputs (embeds, mask, positions) after the vision stage, and what it tells the rest of
        the prefill (:class:`llava.prefill.VisionOut`)."""
        ctx.clock.mark("vision_start")
        method = self.method
        position_ids, deltas = prompt_positions(self.adapter, input_ids, attention_mask, position_ids, visual)
        if deltas is not None:
            self.adapter.keep_rope_deltas(deltas)
        needs = self.needs
        kinds = self.adapter.layout(visual)  # host metadata only
        if not kinds:
            raise ValueError("no visual input")
        stock = host = None
        if needs.pixel_stage:  # the tokens the tower runs, from the pixels; the prompt without the others
            pre = pixel_stage(self.env, input_ids, attention_mask, position_ids, visual, kinds)
            input_ids, attention_mask, position_ids, kinds, stock = pre[:5]
            host = pre.ids_h, pre.valid_h  # the host copies it made: no second read
        tabs = self.adapter.encode(visual, kinds, self.env.tower)
        embeds = self.lm.embed_tokens(input_ids)
        B, L = input_ids.shape
        dev = input_ids.device
        # The prompt's layout (placeholders, question, padding) is worked out on the host from ONE copy
        # of the ids and the mask; the device only sees gathers / scatters with ready-made indices.
        if host is None:
            ids_h = input_ids.cpu()
            valid_h = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        else:
            ids_h, valid_h = host
        src_h = visual_ids(ids_h, kinds, self.adapter.placeholder_name)  # per position: the visual token feeding it
        tables: list[TokenTable] = []
        unit_tables: list[TokenTable] = []  # each unit's [CLS] rows (extra candidates)
        for vl, tab in zip(kinds, tabs):
            units, n_feat = vl.units, int(vl.units.src.numel())
            if tab.cls is not None:
                unit_tables.append(tab.cls)
            if units.rows == n_feat and torch.equal(units.src, torch.arange(n_feat)):  # host: in the LLM's order
                tokens = tab.without_cls()
            else:  # one gather into the LLM's order (LLaVA-NeXT's crops, newline rows)
                newline = self.adapter.newline() if bool((units.src < 0).any()) else None
                tokens = gather_tokens(tab, _to_device([units.src], dev)[0], newline)
            embeds = embeds.masked_scatter((input_ids == vl.token_id)[..., None], tokens.features.to(embeds.dtype))
            tables.append(tokens)
        ctx.clock.mark("vision_end")
        ctx.probe_inputs = (embeds, attention_mask, position_ids)
        table = TokenTable.cat(tables)
        utable = TokenTable.cat(unit_tables) if unit_tables else None
        stock_ds = None
        if table.deepstack is not None:  # each visual position's rows, row-major (the stock model's order)
            at = (src_h.reshape(-1) >= 0).nonzero().flatten()  # host
            idx, gid = _to_device([at, src_h.reshape(-1)[at]], dev)
            stock_ds = ctx.probe_deepstack = _deepstack(table.deepstack[gid], idx, B, L)
        need_signals = needs.vision_signals
        layouts = row_layouts(ids_h, valid_h, src_h >= 0)
        per_sample: list[VisionSignals | None] = []
        if need_signals:
            units_all = join_units([vl.units for vl in kinds])  # every token in the order of src_h's ids
            extras = needs.include_cls_candidates and utable is not None
            crows = cls_rows(kinds) if extras else None  # each unit's [CLS] row (not video frames): candidate T + i
            # per sample its candidates' host record (VisualSample) and question; uploaded: the names' tensors
            names = ("real", "vis", "at", "unit", "after", "question", "qmask", "patch", "unit_pos", "cls")
            samples, up = [], []
            for b, lay in enumerate(layouts):
                at = src_h[b, lay.real[lay.visual]]
                su = sample_units(units_all, at, crows)
                after, question = text_spans(lay.ids, lay.visual, self.env.prompt_spec)
                samples.append((su, question))
                up += [lay.real, lay.visual, at, su.unit, after, question, torch.isin(after, question).long(), su.patch,
                       su.unit_pos, su.cls]
            moved = _to_device(up, dev)
            for b, (lay, (su, question_h)) in enumerate(zip(layouts, samples)):
                d = dict(zip(names, moved[len(names) * b:len(names) * (b + 1)]))
                c = gather_tokens(table, d["at"])  # features: as spliced into embeds (the same cast)
                c.features = c.features.to(embeds.dtype)
                if extras:  # append each unit's [CLS] rows
                    cls = utable.rows(d["cls"])
                    cls.features = cls.features.to(embeds.dtype)
                    c = with_cls(c, cls)
                sig = vision_signals(
                    c, unit=d["unit"], patch=d["patch"], unit_kind=kinds[-1].kind, grid=self.adapter.grid(),
                    text_embeds=embeds[b, d["real"][d["after"]]], question_mask=d["qmask"].bool(),
                    question_ids=lay.ids[question_h], key=sample_key(ctx.sample_keys, b, lay.ids),
                    num_stock=int(lay.visual.numel()), unit_pos=d["unit_pos"], unit_grid=list(su.grid),
                    _probe_fn=self._make_probe(ctx, b, d["real"], d["vis"], d["after"], d["question"]),
                    _unit_host=su.unit)
                per_sample.append(sig)
        else:  # e.g. the unpruned model or an llm-stage-only method: the layout suffices
            per_sample = [None] * B
        ctx.vision_sigs = per_sample
        selections, noop = [], []
        for b, sig in enumerate(per_sample):
            sel = self.env.select(("vision", b), lambda: ask_vision(method, sig)) if needs.vision_stage else None
            noop.append(sel is None or sel.check(sig.num_tokens, sig.num_stock))
            selections.append(sel)
        if needs.vision_stage and any(noop) and method.budget is not None:
            log.info("%s: budget %s >= visual tokens in %d/%d sample(s): nothing pruned there",
                     method.name, method.budget, sum(noop), B)
        if all(noop):  # identical to the stock model: same tensors, nothing re-laid out, at the caller's width
            plan = PrefillPlan.start("eager", len(self.lm.layers), stock or [lay.tokens for lay in layouts],
                                     [int(lay.real.numel()) for lay in layouts], [lay.tokens for lay in layouts], L)
            return embeds, attention_mask, position_ids, VisionOut(
                plan, noop, layouts, torch.zeros(B, dtype=torch.long, device=dev), deepstack=stock_ds)
        out = self._respliced(embeds, attention_mask, position_ids, layouts, per_sample, selections, noop)
        if stock is not None:  # the plan counts each sample's stock tokens, before the pre-tower stage
            out[3].plan = replace(out[3].plan, candidates=tuple(stock))
        return out

    def _respliced(self, embeds, attention_mask, position_ids, layouts, sigs, selections, noop):
        """Rebuild each row as [text before, kept/merged visual tokens per run, text after], re-pad left.

        The new layout of every row is computed on the host (text tokens keep their order; each
        placeholder run is replaced by the outputs whose source token lies in it, in output order);
        the device only gathers and scatters. One host read per sample at most: the number of outputs
        per run, when a sample has several runs (images)."""
        B, L, D = embeds.shape
        dev = embeds.device
        rows, outs = [], []  # per sample: its RowMap; its outputs (features, sources, DeepStack rows) in run order
        sizes = [] if self.env.needs.attention_bias else None  # per sample: the stock tokens each output stands for
        for b, (lay, sig, sel) in enumerate(zip(layouts, sigs, selections)):
            if sel is None or noop[b]:
                sel = Selection(keep=torch.arange(sig.num_stock, device=dev))
            self._check_newlines(sig, sel)
            out_feats, out_src, out_deep = vision_outputs(sig, sel, self.adapter.project, sig.deepstack)
            out_size = sel.sizes(sig.num_tokens) if sizes is not None else None
            run_h = None  # the run of each candidate (host): the visual tokens' own (place_outputs), unless
            if sig.num_tokens > sig.num_stock:  # extra [CLS] candidates go to their unit's first run
                run_h = run_ids(lay.visual)
                u = sig._unit_host[:sig.num_stock]
                big = sig.num_stock
                first = torch.full((int(u.max()) + 1,), big, dtype=torch.long)
                first.scatter_reduce_(0, u.clamp(min=0), torch.where(u >= 0, torch.arange(big), big), "amin")
                run_h = torch.cat([run_h, run_h[first[sig._unit_host[sig.num_stock:]]]])
            row, perm = place_outputs(lay, run_h, out_src, dev)
            if perm is not None:  # the outputs in run order
                out_feats, out_src = out_feats[perm], out_src[perm]
                out_deep = out_deep[perm] if out_deep is not None else None
                out_size = out_size[perm] if out_size is not None else None
            if sizes is not None:
                sizes.append(out_size)
            rows.append(row)
            outs.append((out_feats, out_src, out_deep))
        plan, new_layouts, g = vision_rows("eager", len(self.lm.layers), layouts, rows, L, compact=True)
        new_L, new_mask_h = g.width, g.mask
        keep_pos = (self.env.needs.vision_positions == "keep"
                    or (self.adapter.keeps_positions and position_ids is not None))
        if keep_pos and position_ids is None:  # the stock default: an arange over the padded row
            position_ids = torch.arange(L, device=dev)[None].expand(B, L)
        deep = bool(outs) and outs[0][2] is not None  # DeepStack rows: the outputs' new places
        dropped = torch.tensor([int(lay.real.numel()) - r.n for lay, r in zip(layouts, rows)])  # per sample (host)
        moved = _to_device([g.src, g.take, new_mask_h, dropped] + ([g.vis_at] if deep else [])
                           + ([lay.real[lay.visual] for lay in layouts] if keep_pos else []), dev)
        src_d, take, new_mask, shift = moved[:4]
        # one gather from [the text rows kept, every sample's outputs, a zero row for the pads]
        kept = embeds.reshape(-1, D).index_select(0, take)
        new_embeds = regathered([kept] + [x.to(embeds.dtype) for x, _, _ in outs], src_d).view(B, new_L, D)
        origin = [src for _, src, _ in outs]
        if keep_pos:  # kept tokens keep their positions (M-RoPE): gathered the same way, padding gets 0
            R = position_ids.shape[:-2]
            vps = [position_ids[..., b, moved[4 + deep + b][src]] for b, (_, src, _) in enumerate(outs)]
            new_pos = regathered([position_ids.reshape(*R, -1).index_select(-1, take)] + vps, src_d, -1)
            new_pos = new_pos.view(*R, B, new_L)
        if keep_pos:
            shift = torch.zeros_like(shift)  # decode positions need no mapping
        elif position_ids is not None:  # numbered on from each row's first real position
            valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool,
                                                                                        device=dev)
            new_pos = renumbered(new_mask, first_positions(position_ids, valid))
        else:
            new_pos = None
        ds = None
        if deep:  # the kept / merged tokens' rows at their new places
            ds = _deepstack(torch.cat([d for _, _, d in outs]), moved[4], B, new_L)
        return new_embeds, new_mask, new_pos, VisionOut(plan, noop, new_layouts, shift, origin, ds, sizes)

    def _make_probe(self, ctx: _Prefill, b, real, vis, after, question):
        """Sample ``b``'s probe (:func:`llava.attention_rows.sample_probe`) over the unpruned prompt: ``real`` the row
        positions of its real tokens; ``vis`` / ``after`` / ``question`` indices among them."""
        rows = {"question": question, "all_post_image": after, "text_after": after, "last": after[-1:]}

        def rows_at(k):
            if ctx.probe_inputs is None:
                raise RuntimeError("probe_attention is only available while the engine selects (during the prefill)")
            h = self._probe_hidden(ctx, k)
            pos = ctx.probe_inputs[2]
            return h[b, real], (pos[..., b, real] if pos is not None else real.clone())  # no ids: arange over the row

        def query_rows(queries):
            if queries not in rows:
                raise ValueError(f"probe queries must be question / all_post_image / last, got {queries!r}")
            return rows[queries]

        return sample_probe(self.lm, rows_at, query_rows, vis)

    def _probe_hidden(self, ctx: _Prefill, k: int) -> torch.Tensor:
        """Hidden states entering decoder layer k for the full (unpruned) spliced batch; no cache."""
        lm = self.lm
        if not (0 <= k < len(lm.layers)):
            raise ValueError(f"probe layer {k} outside 0..{len(lm.layers) - 1}")
        if k in self.adapter.linear_layers:
            full = [i for i in range(len(lm.layers)) if i not in self.adapter.linear_layers]
            raise ValueError(f"probe layer {k} is a linear-attention (Gated DeltaNet) layer of this hybrid "
                             f"{self.adapter.family} model: it has no attention to read; its full-attention layers "
                             f"are {full}")
        if k not in ctx.probe_cache:
            embeds, mask, pos = ctx.probe_inputs
            h = embeds
            if k > 0:
                B, L = h.shape[:2]
                if pos is None:
                    pos = torch.arange(L, device=h.device)[None].expand(B, -1)
                if mask is None:  # an explicit mask: never let transformers read position gaps as packing
                    mask = torch.ones(B, L, dtype=torch.long, device=h.device)
                masks = decoder_masks(self.adapter, lm, h, mask, None, pos, 0, k)
                pe = lm.rotary_emb(h, position_ids=pos)
                h = entering(lm, h, masks, pe, (k,), ctx.probe_deepstack)[k]  # Qwen3-VL: its DeepStack rows
            ctx.probe_cache[k] = h
        return ctx.probe_cache[k]

    @staticmethod
    def _check_newlines(sig: VisionSignals, sel: Selection) -> None:
        """Refuse a vision-space merge of LLaVA-NeXT's newline tokens (one host read where a sample has them)."""
        if (sel.values is None and sel.targets is not None and sel.targets.numel() and sel.space == "vision"
                and sig.num_stock and bool(sig._unit_host.lt(0).any())):  # NeXT newline tokens (host check)
            tg, asg = sel.targets.to(sig.unit.device), sel.assign.to(sig.unit.device)
            if bool(sig.is_newline[tg].any() | (sig.is_newline & (asg >= 0)).any()):
                raise ValueError("cannot merge LLaVA-NeXT newline tokens in vision-feature space")


def place_outputs(lay: RowLayout, run_h: torch.Tensor | None, out_src: torch.Tensor,
                  dev) -> tuple[RowMap, torch.Tensor | None]:
    """The :class:`RowMap` of a row rebuilt from a selection's outputs, and the permutation that sorts the outputs
    by run (None when they are in run order already, e.g. a single run).

    run_h: run index (host) of every candidate token (the visual tokens' ``run_ids``, then any extra candidates'),
    read only when the row has several runs; None: the visual tokens' own. out_src: (m,) each output's source
    candidate (device). One host read when the row has several runs: how many outputs land in each."""
    m = int(out_src.numel())
    runs = run_spans(lay.visual)
    if len(runs) <= 1:
        counts, perm = [m] * len(runs), None
    else:
        run_h = run_ids(lay.visual) if run_h is None else run_h
        out_run = run_h.to(dev, non_blocking=True)[out_src]
        counts = torch.bincount(out_run, minlength=len(runs)).tolist()
        perm = torch.sort(out_run, stable=True).indices
    return rebuilt_row(int(lay.ids.numel()), runs, counts), perm

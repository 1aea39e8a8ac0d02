"""The one pruning engine every method runs on.

`attach(model, method)` replaces the *instance's* ``forward`` (the class and the transformers
code are untouched) so that the model's normal ``forward`` / ``generate`` prune:

prefill (a call that carries ``pixel_values`` / ``pixel_values_videos``)
  1. vision tower once for all images / crops / frames, with the select layer's [CLS] row and keys
     recomputed from that layer's own q/k (the tower stays on SDPA);
  2. projector (+ LLaVA-NeXT packing) and the usual splice into ``inputs_embeds`` - identical to
     the unmodified model;
  3. ``vision`` stage: the method's selection per sample, kept/merged tokens re-spliced, rows
     re-padded on the left, positions renumbered contiguously;
  4. the decoder: the stock language model if the method has no ``llm`` stage, otherwise a short
     staged loop over the decoder layers that, before each stage layer K, asks the method for a
     selection, gathers hidden states / positions / the 2-D mask and builds layer K's causal mask
     against the cache of layer K (every layer keeps its own KV length).
decode (later calls of the same ``generate``)
  ``generate`` still holds the original prompt's mask and positions; the engine maps them onto
  each segment of layers (kept prompt mask + generated part; positions shifted by what each
  stage dropped when the method re-indexes).

A call without visual input and without engine state (text-only prompts) goes straight to the
original forward: untouched.
"""

from __future__ import annotations

import inspect
import logging
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .families import NEXT_LAYOUTS, FamilyAdapter, adapter_for, model_family  # noqa: F401
from .families.base import to_device as _to_device
from .method import Method, Selection, get_method
from .ops import merge_tokens
from .signals import LayerQK, LLMSignals, VisionSignals, causal_attention_rows, llm_qk

log = logging.getLogger(__name__)

@dataclass
class PromptSpec:
    """How to find the question among the text tokens after the image (for query-aware signals).

    sep_ids:  token ids that may open the text after the image (the newline separator); stripped.
    tail_ids: the token ids that end the prompt (the role tag, e.g. `` ASSISTANT:``); stripped.
    """

    sep_ids: tuple[int, ...] = ()
    tail_ids: tuple[int, ...] = ()


@dataclass
class SampleStats:
    """Token accounting of one sample (one row of the batch) for the last prefill."""

    visual_candidates: int  # visual tokens the unpruned model would feed to the LLM
    visual_per_layer: list[int]  # visual tokens in the input of each decoder layer
    vision_noop: bool = False  # the vision stage kept everything (budget >= tokens)

    @property
    def visual_entering_llm(self) -> int:
        return self.visual_per_layer[0]

    @property
    def visual_layer_avg(self) -> float:
        return sum(self.visual_per_layer) / len(self.visual_per_layer)

    def as_dict(self) -> dict[str, Any]:
        return {
            "visual_candidates": self.visual_candidates,
            "visual_entering_llm": self.visual_entering_llm,
            "visual_layer_avg": self.visual_layer_avg,
            "visual_per_layer": list(self.visual_per_layer),
            "vision_noop": self.vision_noop,
        }


@dataclass
class PrefillStats:
    samples: list[SampleStats]
    seq_len_per_layer: list[int]  # padded sequence length each decoder layer ran on (= its KV length)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, selection, llm

    @property
    def visual_entering_llm(self) -> float:
        return sum(s.visual_entering_llm for s in self.samples) / len(self.samples)

    @property
    def visual_layer_avg(self) -> float:
        return sum(s.visual_layer_avg for s in self.samples) / len(self.samples)


@dataclass
class _Segment:
    start: int  # first decoder layer of the segment
    mask: torch.Tensor  # (B, L_s) 2-D mask of the prompt part of this segment's cache
    shift: torch.Tensor  # (B,) subtract from LLM-space decode positions (reindex mode)


@dataclass
class _State:
    orig_len: int  # padded prompt length as generate sees it
    llm_mask: torch.Tensor | None  # (B, L') prompt mask in LLM space
    pos_shift: torch.Tensor  # (B,) original position - LLM-space position, for decode
    segments: list[_Segment] | None  # None when the stock language model runs
    gen_len: int = 0  # tokens decoded so far (after the prompt)
    next_pos: torch.Tensor | None = None  # (rows..., B) first decode position when generate passes none (M-RoPE)


@dataclass
class _Prefill:
    """Per-prefill scratch, passed through the stages and dropped with the prefill (the engine keeps
    no tensor of a finished prefill)."""

    probe_inputs: tuple | None = None  # (embeds, mask, positions) of the unpruned spliced batch
    probe_cache: dict = field(default_factory=dict)  # decoder layer k -> hidden states entering it (probe)
    vision_sigs: list = field(default_factory=list)  # per sample: VisionSignals (or None)
    entry: list | None = None  # per sample: (visual tokens', text-after tokens') inputs to layer 0
    llm_state: list | None = None  # per sample: the method's scratch shared by its llm stages


@dataclass
class _Layout:
    """Host-side layout of one sample's row (decided on the host, so the device never waits)."""

    real: torch.Tensor  # (n,) row positions of the sample's real (non-padding) tokens
    visual: torch.Tensor  # (nv,) indices among them of the visual tokens, ascending
    ids: torch.Tensor  # (n,) their token ids (-1 for a visual token after re-splicing)


def _runs(visual: torch.Tensor) -> torch.Tensor:
    """Run index (0-based) of each visual token: consecutive indices form one run (host)."""
    if not visual.numel():
        return visual.clone()
    new = torch.ones_like(visual, dtype=torch.long)
    new[1:] = (visual[1:] != visual[:-1] + 1).long()
    new[0] = 0
    return new.cumsum(0)


def _renumber_units(gunit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global unit ids (host, -1 = newline) -> per-sample ids 0..U-1 in order of first appearance, and
    the global id of each local unit."""
    ok = gunit >= 0
    present = gunit[ok]
    if not present.numel():
        return torch.full_like(gunit, -1), present
    uniq, inv = torch.unique(present, return_inverse=True)
    first = torch.full((uniq.numel(),), present.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(present.numel()), "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    local = torch.full_like(gunit, -1)
    local[ok] = rank[inv]
    return local, uniq[order]


class _Timer:
    """The phase clock of ``PrefillStats.timings``: seconds (synchronised on CUDA), or ``clock()`` when
    the engine has one (e.g. eval.efficiency counts ops per phase with it)."""

    def __init__(self, device: torch.device, clock=None):
        self.cuda = device.type == "cuda"
        self.clock = clock

    def now(self) -> float:
        if self.clock is not None:
            return self.clock()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class PruningEngine:
    """Applies one :class:`Method` to one loaded LLaVA-family model. Use :func:`attach`."""

    def __init__(self, model: torch.nn.Module, method: Method, next_layout: str = "spatial_unpad",
                 prompt_spec: PromptSpec | None = None, family_options: dict | None = None):
        self.model = model
        if next_layout not in NEXT_LAYOUTS:
            raise ValueError(f"next_layout must be one of {NEXT_LAYOUTS}, got {next_layout!r}")
        self.next_layout = next_layout
        #: what the core asks the model family (tower, packing, projector, positions)
        self.adapter: FamilyAdapter = adapter_for(model, next_layout=next_layout, **(family_options or {}))
        self.family = self.adapter.family
        self.method = method
        self.adapter.tower_method = method if getattr(method, "tower_stage", False) else None  # in-tower stage (CLIP)
        if prompt_spec is None and method.query_aware:
            raise ValueError(
                f"{method.name} reads the question, and without a prompt spec the engine would count the "
                "separator and the role tag (e.g. ' ASSISTANT:') as question tokens. Attach through "
                "Runtime.prune / llava.prune(runtime, ...), or pass prompt_spec=llava.models.prompt_spec_for("
                "tokenizer, template) (or llava.prune(model, ..., tokenizer=tok, template='vicuna_v1')).")
        self.prompt_spec = prompt_spec or PromptSpec()
        other = method.__dict__.get("_bound_model")
        other = other() if other is not None else None
        if other is not None and other is not model and getattr(
                getattr(other, "_pruning_engine", None), "method", None) is method:
            raise ValueError(f"this {method.name} instance is attached to another model, and setup() has bound it "
                             "to that model's layers: create one method instance per model (or remove the other "
                             "engine first)")
        method._bound_model = weakref.ref(model)
        if not method.supports(self.family):
            raise ValueError(f"{method.name} does not support {self.family} models (it runs on "
                             f"{', '.join(method.families)}): {method.unsupported_reason}")
        self.lm = self.adapter.lm
        n_layers = len(self.lm.layers)
        method.setup(num_layers=n_layers, num_vision_layers=self.adapter.num_vision_layers, family=self.family)
        ks = tuple(method.llm_layers)
        if any(not (1 <= k < n_layers) for k in ks) or list(ks) != sorted(set(ks)):
            raise ValueError(f"{method.name}: llm stage layers {ks} must be ascending, in 1..{n_layers - 1}")
        self.llm_layers = ks
        # "reindex" renumbers positions after an llm stage; M-RoPE positions have no contiguous count to
        # renumber (an image spans max(h, w) / 2 positions), so those families keep them (documented)
        self._reindex = method.position_mode == "reindex" and not self.adapter.keeps_positions
        self.stats: PrefillStats | None = None
        self.prefills = 0  # number of visual prefills handled (a check that the engine really ran)
        #: selections of the last prefill, keyed (stage, sample); stage "vision" or the llm stage index
        self.selections: dict[tuple, Selection] = {}
        #: when True, later prefills reuse ``selections`` instead of asking the method (e.g. to check
        #: cached decoding against a full recompute with the same kept set)
        self.replay = False
        #: what ``stats.timings`` is measured with: None = seconds; a callable = its readings (one per phase edge)
        self.clock = None
        #: optional per-row keys (e.g. question ids) for the next prefill; consumed by it
        self.sample_keys: list | None = None
        self._state: _State | None = None
        self._orig_forward = None
        self._pruned_caches = weakref.WeakSet()  # caches a pruned prefill wrote (a 2nd turn on them is refused)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "PruningEngine":
        if getattr(self.model, "_pruning_engine", None) is not None:
            self.model._pruning_engine.remove()
        self._orig_forward = self.model.forward
        engine = self

        def forward(model_self, *args, **kwargs):
            return engine.forward(*args, **kwargs)

        # Without `mm_encoder_outputs` in the signature, transformers' generate() does not pre-encode
        # the images itself but hands pixel_values to forward() at prefill, where the engine needs them.
        sig = inspect.signature(self._orig_forward)
        forward.__signature__ = sig.replace(
            parameters=[p for n, p in sig.parameters.items() if n != "mm_encoder_outputs"])
        self.model.forward = types.MethodType(forward, self.model)
        orig_generate = self.model.generate

        def generate(model_self, *args, **kwargs):
            engine._state = None
            try:
                return orig_generate(*args, **kwargs)
            finally:
                engine._state = None

        # With a compilable (static) cache, generate() would turn the 2-D mask into a 4-D one for the
        # stock prompt length; the engine builds its own masks from the 2-D mask, so hand that over.
        def create_masks_for_generate(model_self, *args, attention_mask=None, **kwargs):
            return attention_mask

        self.model.create_masks_for_generate = types.MethodType(create_masks_for_generate, self.model)
        generate.__signature__ = inspect.signature(orig_generate)
        generate.__doc__ = orig_generate.__doc__
        self.model.generate = types.MethodType(generate, self.model)
        self.model._pruning_engine = self
        return self

    def remove(self) -> None:
        for attr in ("forward", "generate", "create_masks_for_generate", "_pruning_engine"):
            self.model.__dict__.pop(attr, None)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, labels=None, **kwargs):
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pre-encoded mm_encoder_outputs cannot be pruned: pass pixel_values / pixel_values_videos")
        kwargs.pop("mm_encoder_outputs", None)
        # the family's visual inputs (pixels, sizes, grids, token types): never handed to the language model
        visual = {k: kwargs.pop(k) for k in self.adapter.visual_keys if k in kwargs}
        has_visual = any(visual.get(k) is not None for k in self.adapter.pixel_keys)
        if not has_visual and self._state is not None and past_key_values is not None:
            cache_len = 1  # a decode step after our prefill: no need to ask the cache (a device read when static)
        else:
            cache_len = past_key_values.get_seq_length() if past_key_values is not None else 0
            if torch.is_tensor(cache_len):  # static caches keep their length on the device
                cache_len = int(cache_len)
        if not has_visual and cache_len and self._state is None:  # e.g. generate() called again on a cache
            if past_key_values in self._pruned_caches:
                raise ValueError(
                    "continuing a pruned KV cache with new text (a second turn) is not supported: the cache "
                    "holds fewer prompt tokens than the conversation's ids, so transformers would misalign "
                    "them. Re-run the whole conversation (image + all turns) as one new prompt.")
        if not has_visual and (self._state is None or cache_len == 0):
            self._state = None  # a text-only prompt: the stock forward, untouched
            return self._orig_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                logits_to_keep=logits_to_keep, labels=labels, **visual, **kwargs)
        if labels is not None:
            raise ValueError("labels are not supported while a pruning method is attached (logits cover kept tokens only)")
        if use_cache is None:
            use_cache = self.lm.config.use_cache
        if has_visual:
            if cache_len:
                raise ValueError("a visual prompt on top of a non-empty KV cache (multi-turn cache reuse) is not supported")
            if input_ids is None:
                raise ValueError("the pruning engine needs input_ids to locate the image placeholders")
            timer = _Timer(input_ids.device, self.clock)
            t0 = timer.now()
            ctx = _Prefill()
            embeds, mask, pos, info = self._prefill_inputs(ctx, input_ids, visual, attention_mask, position_ids, timer)
            t1 = timer.now()
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.lm.config)
            if past_key_values is not None:
                self._pruned_caches.add(past_key_values)
            hidden, seq_lens, per_layer, sel_time = self._prefill_llm(ctx, embeds, mask, pos, past_key_values,
                                                                       use_cache, info, **kwargs)
            t2 = timer.now()
            self.prefills += 1
            ctx.probe_inputs = ctx.entry = ctx.llm_state = None  # nothing of this prefill outlives it
            ctx.probe_cache.clear()
            ctx.vision_sigs = []
            # vision = tower + projector + splice; selection = signals, the method, re-splicing / re-padding
            # and the in-LLM stages' scoring; llm = the decoder layers (+ norm). They sum to prefill_total.
            self.stats = PrefillStats(
                samples=[SampleStats(info["candidates"][b], per_layer[b], info["noop"][b]) for b in range(len(per_layer))],
                seq_len_per_layer=seq_lens,
                timings={"vision": info["t_vision"], "selection": (t1 - t0 - info["t_vision"]) + sel_time,
                         "llm": (t2 - t1) - sel_time, "prefill_total": t2 - t0},
            )
        else:
            if input_ids is not None and inputs_embeds is None:
                inputs_embeds = self.lm.embed_tokens(input_ids)
            position_ids = self.adapter.decode_positions(position_ids)
            hidden = self._decode_llm(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, **kwargs)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.model.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values if use_cache else None)

    # ------------------------------------------------------------------ prefill inputs (vision stage)
    def _prefill_inputs(self, ctx: _Prefill, input_ids, visual: dict, attention_mask, position_ids, timer):
        t0 = timer.now()
        method = self.method
        position_ids = self.adapter.prefill_positions(input_ids, attention_mask, position_ids, visual)
        extra_layers = tuple(getattr(method, "vision_attention_layers", ()) or ()) + tuple(
            ("fw", v) for v in (getattr(method, "vision_fullwidth_layers", ()) or ())) + tuple(
            ("cls", v) for v in (getattr(method, "vision_cls_layers", ()) or ()))
        blocks = self.adapter.encode(visual, method.needs_vision_attention, getattr(method, "vision_layer", None),
                                     extra_layers)
        if not blocks:
            raise ValueError("no visual input")
        embeds = self.lm.embed_tokens(input_ids)
        B, L = input_ids.shape
        dev = input_ids.device
        # The prompt's layout (placeholders, question, padding) is worked out on the host from ONE copy
        # of the ids and the mask; the device only sees gathers / scatters with ready-made indices.
        ids_h = input_ids.cpu()
        valid_h = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        src_h = torch.full((B, L), -1, dtype=torch.long)  # per position: global id of the visual token feeding it
        tables: dict[str, list] = {}
        unit_tables: dict[str, list] = {}
        units_h, cls_rows = [], []  # per block: global unit of each token; row of each unit in the [CLS] table
        offset = unit_offset = n_cls_rows = 0
        kind = None
        for token_id, flat, sizes in blocks:
            where_h = ids_h == token_id
            n_slots, n_feat = int(where_h.sum()), int(flat["unit_h"].numel())
            if n_slots != n_feat:
                kname = self.adapter.placeholder_name(token_id)
                raise ValueError(
                    f"the prompt has {n_slots} {kname} placeholder tokens but the {len(sizes)} {kname}(s) give "
                    f"{n_feat} visual tokens: each {kname} needs exactly one <{kname}> in the prompt, expanded "
                    f"by the processor for this model (use llava.preprocess / the model's processor)")
            rows = where_h.nonzero()[:, 0]
            start = 0
            for i, size in enumerate(sizes):  # every block must land inside one sample
                r = rows[start:start + size]
                start += size
                if r.numel() and r.min() != r.max():
                    raise ValueError(f"{flat['kind']} {i} is split across batch rows: placeholder counts per prompt do not match the images")
            embeds = embeds.masked_scatter((input_ids == token_id)[..., None], flat["features"].to(embeds.dtype))
            src_h[where_h] = torch.arange(n_feat) + offset
            offset += n_feat
            u = flat["unit_h"]
            units_h.append(torch.where(u >= 0, u + unit_offset, u))
            n_u = int(flat["unit_pos"].shape[0])
            cls_rows.append(torch.arange(n_u) + n_cls_rows if "cls" in flat else torch.full((n_u,), -1))
            n_cls_rows += n_u if "cls" in flat else 0
            unit_offset += n_u
            for k, v in flat.items():
                if k in ("kind", "unit", "unit_h"):
                    continue
                if k == "cls":
                    for ck, cv in v.items():
                        unit_tables.setdefault(ck, []).append(cv)
                elif k in ("unit_pos", "unit_grid"):
                    unit_tables.setdefault(k, []).append(v)
                else:
                    tables.setdefault(k, []).append(v)
            kind = flat["kind"]
        t1 = timer.now()
        ctx.probe_inputs = (embeds, attention_mask, position_ids)
        table = {k: torch.cat(v) for k, v in tables.items()}
        utable = {k: torch.cat(v) for k, v in unit_tables.items()}
        unit_all_h = torch.cat(units_h)
        cls_row_h = torch.cat(cls_rows)
        extras = bool(method.include_cls_candidates) and "vision_features" in utable
        need_signals = method.vision_stage or method.needs_vision_attention
        layouts = []
        for b in range(B):
            real = valid_h[b].nonzero().flatten()
            lay = _Layout(real=real, visual=(src_h[b, real] >= 0).nonzero().flatten(), ids=ids_h[b, real])
            layouts.append(lay)
        per_sample: list[VisionSignals | None] = []
        if need_signals:
            host = []
            for b, lay in enumerate(layouts):
                src = src_h[b, lay.real[lay.visual]]
                unit, gu = _renumber_units(unit_all_h[src])
                after, question = self._text_spans(lay.ids, lay.visual)
                row = [lay.real, lay.visual, src, unit, gu, after, question, torch.isin(after, question).long()]
                if extras:  # the units of this sample that have a [CLS] row (not video frames)
                    has = cls_row_h[gu] >= 0
                    row += [cls_row_h[gu][has], torch.arange(gu.numel())[has]]
                host.append(row)
            width = len(host[0]) if host else 0
            moved = _to_device([t for h in host for t in h], dev)
            for b, lay in enumerate(layouts):
                real, vis, src, unit, gu, after, question, qmask = moved[width * b:width * b + 8]
                n_units = int(host[b][4].numel())
                fields = {
                    "features": embeds[b, real[vis]], "vision_features": table["vision_features"][src],
                    "unit": unit, "patch": table["patch"][src],
                    "cls_attn": table["cls_attn"][src] if "cls_attn" in table else None,
                    "keys": table["keys"][src] if "keys" in table else None,
                    "extra": {k: table[k][src] for k in table if k.startswith(("recv:", "fwa:", "fwk:", "clsl:"))},
                }
                n_cls = 0
                if extras:  # append each unit's [CLS] as candidate T + i
                    crow, cunit = moved[width * b + 8:width * b + 10]
                    n_cls = int(host[b][8].numel())
                    fields["features"] = torch.cat([fields["features"], utable["features"][crow].to(embeds.dtype)])
                    fields["vision_features"] = torch.cat([fields["vision_features"], utable["vision_features"][crow]])
                    fields["unit"] = torch.cat([unit, cunit])
                    fields["patch"] = torch.cat([fields["patch"], torch.full((n_cls,), -1, device=dev, dtype=torch.long)])
                    if fields["cls_attn"] is not None:
                        fields["cls_attn"] = torch.cat([fields["cls_attn"], utable["cls_attn"][crow]])
                        fields["keys"] = torch.cat([fields["keys"], utable["keys"][crow]])
                    for k in fields["extra"]:
                        fields["extra"][k] = torch.cat([fields["extra"][k], utable[k][crow]])
                sig = VisionSignals(
                    features=fields["features"], vision_features=fields["vision_features"], unit=fields["unit"],
                    patch=fields["patch"], unit_kind=kind, grid=self.adapter.grid(),
                    text_embeds=embeds[b, real[after]], question_mask=qmask.bool(),
                    question_ids=lay.ids[host[b][6]],
                    cls_attn=fields["cls_attn"].T.contiguous() if fields["cls_attn"] is not None else None,
                    keys=fields["keys"], key=self._sample_key(b, lay.ids),
                    received_attn={int(k[5:]): r.T.contiguous() for k, r in fields["extra"].items() if k[:5] == "recv:"},
                    fullwidth_cls_attn={int(k[4:]): r for k, r in fields["extra"].items() if k[:4] == "fwa:"},
                    fullwidth_keys={int(k[4:]): r for k, r in fields["extra"].items() if k[:4] == "fwk:"},
                    cls_attn_layers={int(k[5:]): r.T.contiguous() for k, r in fields["extra"].items() if k[:5] == "clsl:"},
                    num_stock=int(lay.visual.numel()), unit_pos=utable["unit_pos"][gu],
                    unit_grid=[tuple(g) for g in utable["unit_grid"][host[b][4]].tolist()] if "unit_grid" in utable else None,
                    _probe_fn=self._make_probe(ctx, b, real, vis, after, question),
                    _unit_host=torch.cat([host[b][3], host[b][9]]) if n_cls else host[b][3],
                )
                if "in_tower_kept" in table:  # in-tower stage: the stock tokens that survived the tower
                    sig.in_tower_kept = torch.cat([table["in_tower_kept"][src], torch.ones(n_cls, dtype=torch.bool, device=dev)])
                per_sample.append(sig)
        else:  # e.g. the unpruned model or an llm-stage-only method: the layout suffices
            per_sample = [None] * B
        ctx.vision_sigs = per_sample
        selections, noop = [], []
        for b, sig in enumerate(per_sample):
            sel = self._select(("vision", b), lambda: method.select_vision(sig)) if method.vision_stage else None
            noop.append(sel is None or sel.check(sig.num_tokens, sig.num_stock))
            selections.append(sel)
        if method.vision_stage and any(noop) and method.budget is not None:
            log.info("%s: budget %s >= visual tokens in %d/%d sample(s): nothing pruned there",
                     method.name, method.budget, sum(noop), B)
        self.sample_keys = None
        info = {"candidates": [int(lay.visual.numel()) for lay in layouts], "noop": noop, "t_vision": t1 - t0}
        if all(noop):  # identical to the stock model: same tensors, nothing re-laid out
            info["layouts"] = layouts
            self._state = _State(orig_len=L, llm_mask=attention_mask,
                                 pos_shift=torch.zeros(B, dtype=torch.long, device=dev), segments=None,
                                 next_pos=self._next_positions(position_ids))
            return embeds, attention_mask, position_ids, info
        return self._respliced(embeds, attention_mask, position_ids, layouts, per_sample, selections, info)

    def _respliced(self, embeds, attention_mask, position_ids, layouts, sigs, selections, info):
        """Rebuild each row as [text before, kept/merged visual tokens per run, text after], re-pad left.

        The new layout of every row is computed on the host (text tokens keep their order; each
        placeholder run is replaced by the outputs whose source token lies in it, in output order);
        the device only gathers and scatters. One host read per sample at most: the number of outputs
        per run, when a sample has several runs (images)."""
        B, L, D = embeds.shape
        dev = embeds.device
        rows = []
        for b, (lay, sig, sel) in enumerate(zip(layouts, sigs, selections)):
            if sel is None or info["noop"][b]:
                sel = Selection(keep=torch.arange(sig.num_stock, device=dev))
            out_feats, out_src = self._materialize_vision(sig, sel)
            run_h = _runs(lay.visual)  # run index of each visual token (host)
            if sig.num_tokens > sig.num_stock:  # extra [CLS] candidates go to their unit's first run
                u = sig._unit_host[:sig.num_stock]
                big = sig.num_stock
                first = torch.full((int(u.max()) + 1,), big, dtype=torch.long)
                first.scatter_reduce_(0, u.clamp(min=0), torch.where(u >= 0, torch.arange(big), big), "amin")
                run_h = torch.cat([run_h, run_h[first[sig._unit_host[sig.num_stock:]]]])
            rows.append(self._place_outputs(lay, run_h, out_src, dev))
            rows[-1]["x"] = out_feats
        new_L = max(r["n"] for r in rows)
        new_embeds = embeds.new_zeros(B, new_L, D)
        new_mask_h = torch.zeros(B, new_L, dtype=torch.long)
        new_layouts = []
        for b, (lay, r) in enumerate(zip(layouts, rows)):
            pad = new_L - r["n"]
            new_mask_h[b, pad:] = 1
            ids = torch.full((r["n"],), -1, dtype=lay.ids.dtype)
            ids[r["text_dst"]] = lay.ids[r["text_src"]]
            new_layouts.append(_Layout(real=torch.arange(pad, new_L), visual=r["vis_dst"], ids=ids))
        moved = _to_device([t for lay, r in zip(layouts, rows) for t in (lay.real[r["text_src"]], r["text_dst"])]
                           + [new_mask_h], dev)
        new_mask = moved[-1]
        keep_pos = self.adapter.keeps_positions and position_ids is not None
        if keep_pos:  # kept tokens keep their positions (M-RoPE): gather them, padding gets 0
            new_pos = position_ids.new_zeros(*position_ids.shape[:-2], B, new_L)
            vis_rows = _to_device([lay.real[lay.visual] for lay in layouts], dev)
        origin = []
        for b, r in enumerate(rows):
            pad = new_L - r["n"]
            text_src, text_dst = moved[2 * b], moved[2 * b + 1]
            new_embeds[b, pad + text_dst] = embeds[b, text_src]
            x, src = r["x"], r["src"]
            vd = r["vis_dst_d"]
            src = src[r["perm"]] if r["perm"] is not None else src
            new_embeds[b, pad + vd] = x[r["perm"]] if r["perm"] is not None else x
            origin.append(src)
            if keep_pos:
                new_pos[..., b, pad + text_dst] = position_ids[..., b, text_src]
                new_pos[..., b, pad + vd] = position_ids[..., b, vis_rows[b][src]]
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        orig_valid = valid.long().sum(1)
        shift = orig_valid - new_mask.sum(1)
        if keep_pos:
            shift = torch.zeros_like(shift)  # decode positions need no mapping
        elif position_ids is not None:
            base = (position_ids * valid).amax(1) - (orig_valid - 1)  # first real position per row
            new_pos = (new_mask.cumsum(1) - 1).clamp(min=0) + base[:, None] * new_mask
        else:
            new_pos = None
        info.update(layouts=new_layouts, origin=origin)
        self._state = _State(orig_len=L, llm_mask=new_mask, pos_shift=shift, segments=None,
                             next_pos=self._next_positions(new_pos))
        return new_embeds, new_mask, new_pos, info

    def _next_positions(self, pos):
        """(rows..., B) the position of the first generated token when generate() passes none: the last
        prompt token's + 1 (rows are left-padded, so the last column is real). Families whose
        positions are not a contiguous count (M-RoPE) need it; 1-D families continue after the cache."""
        if pos is None or not self.adapter.keeps_positions:
            return None
        return pos[..., -1] + 1

    @staticmethod
    def _place_outputs(lay: "_Layout", run_h: torch.Tensor, out_src: torch.Tensor, dev) -> dict:
        """Host layout of a rebuilt row: text tokens in order, each run's outputs at the run's place.

        run_h: run index (host) of every candidate token (the visual tokens' ``_runs``, then any extra
        candidates'); out_src: (m,) each output's source candidate
        (device). Returns the new row length, the text tokens' old / new indices (among the row's real
        tokens), the outputs' new indices (host and device, run by run) and the permutation that sorts
        the outputs by run (None when the outputs are already in run order, e.g. a single run)."""
        m = int(out_src.numel())
        nv = int(lay.visual.numel())
        old_run = run_h[:nv]
        n_runs = int(old_run[-1]) + 1 if nv else 0
        if n_runs <= 1:
            counts = [m] if n_runs else []
            perm = None
        else:  # one host read: how many outputs land in each run
            out_run = run_h.to(dev, non_blocking=True)[out_src]
            counts = torch.bincount(out_run, minlength=n_runs).tolist()
            perm = torch.sort(out_run, stable=True).indices
        n_real = int(lay.ids.numel())
        is_vis = torch.zeros(n_real, dtype=torch.bool)
        is_vis[lay.visual] = True
        text_src = (~is_vis).nonzero().flatten()
        vis_before = torch.cumsum(is_vis.long(), 0)  # visual tokens at or before each index
        run_start = torch.zeros(n_runs, dtype=torch.long)
        run_len = torch.zeros(n_runs, dtype=torch.long)
        if n_runs:
            run_start.scatter_reduce_(0, old_run, lay.visual, "amin", include_self=False)
            run_len = torch.bincount(old_run, minlength=n_runs)
        cnt = torch.tensor(counts, dtype=torch.long)
        old_cum = torch.cat([torch.zeros(1, dtype=torch.long), run_len.cumsum(0)])
        new_cum = torch.cat([torch.zeros(1, dtype=torch.long), cnt.cumsum(0)])
        runs_before = torch.searchsorted(run_start, text_src, right=True)  # runs that start before the token
        text_dst = text_src - vis_before[text_src] + new_cum[runs_before]
        new_start = run_start - old_cum[:-1] + new_cum[:-1]
        vis_dst = (torch.repeat_interleave(new_start, cnt, output_size=m)
                   + (torch.arange(m) - torch.repeat_interleave(new_cum[:-1], cnt, output_size=m)))
        return {"n": n_real - nv + m, "text_src": text_src, "text_dst": text_dst,
                "vis_dst": vis_dst, "vis_dst_d": _to_device([vis_dst], dev)[0], "perm": perm, "src": out_src}

    def _make_probe(self, ctx: _Prefill, b, real, vis, after, question):
        def probe(layer: int, queries: str = "question") -> torch.Tensor:
            if ctx.probe_inputs is None:
                raise RuntimeError("probe_attention is only available while the engine selects (during the prefill)")
            return self._probe_rows(ctx, b, real, vis, after, question, layer, queries)
        return probe

    def _probe_hidden(self, ctx: _Prefill, k: int) -> torch.Tensor:
        """Hidden states entering decoder layer k for the full (unpruned) spliced batch; no cache."""
        if k not in ctx.probe_cache:
            embeds, mask, pos = ctx.probe_inputs
            lm = self.lm
            h = embeds
            if k > 0:
                B, L = h.shape[:2]
                if pos is None:
                    pos = torch.arange(L, device=h.device)[None].expand(B, -1)
                if mask is None:  # an explicit mask: never let transformers read position gaps as packing
                    mask = torch.ones(B, L, dtype=torch.long, device=h.device)
                causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                            past_key_values=None, position_ids=self.adapter.mask_positions(pos))
                pe = lm.rotary_emb(h, position_ids=pos)
                for i in range(k):
                    h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe)
            ctx.probe_cache[k] = h
        return ctx.probe_cache[k]

    def _probe_rows(self, ctx: _Prefill, b, real, vis, after, question, k, queries):
        """Layer k's causal attention (H, Q, T) from the chosen text queries to the sample's visual tokens.

        real: row positions of the sample's real tokens; vis / after / question: indices among them."""
        lm = self.lm
        if not (0 <= k < len(lm.layers)):
            raise ValueError(f"probe layer {k} outside 0..{len(lm.layers) - 1}")
        h = self._probe_hidden(ctx, k)
        embeds, mask, pos = ctx.probe_inputs
        p = pos[..., b, real] if pos is not None else real.clone()  # without ids: arange over the row, as above
        rows = {"question": question, "all_post_image": after, "text_after": after,
                "last": after[-1:]}.get(queries)
        if rows is None:
            raise ValueError(f"probe queries must be question / all_post_image / last, got {queries!r}")
        q, kk = llm_qk(lm.layers[k], h[b, real], lm.rotary_emb, p, rows)
        attn = causal_attention_rows(q, kk, rows, lm.layers[k].self_attn.scaling)
        return attn[:, :, vis]

    def _sample_key(self, b: int, ids: torch.Tensor) -> int:
        if self.sample_keys is not None:
            return stable_hash(str(self.sample_keys[b]).encode())
        return stable_hash(ids.cpu().numpy().astype("int64").tobytes())

    def _select(self, key, ask):
        if self.replay:
            if key not in self.selections:
                raise RuntimeError(f"replay: no recorded selection for {key}; run a prefill with replay=False first")
            return self.selections[key]
        sel = ask()
        self.selections[key] = sel
        return sel

    def _materialize_vision(self, sig: VisionSignals, sel: Selection):
        """Output features (m, D) and each output's source token index (m,)."""
        keep = sel.keep.to(sig.features.device)
        feats = [sig.features[keep]]
        src = [keep]
        if sel.values is not None:  # the method computed every output itself (e.g. PruMerge's k-NN sums)
            if sel.targets is not None:
                src.append(sel.targets.to(keep.device))
            v = sel.values.to(sig.features.device)
            if sel.space == "vision":
                v = self.adapter.project(v.to(sig.vision_features.dtype))
            feats = [v.to(sig.features.dtype)]
        elif sel.targets is not None and sel.targets.numel():
            space = sel.space
            if space == "vision" and sig.num_stock and bool(sig._unit_host.lt(0).any()):  # NeXT newline tokens
                tg, asg = sel.targets.to(keep.device), sel.assign.to(keep.device)
                if bool(sig.is_newline[tg].any() | (sig.is_newline & (asg >= 0)).any()):
                    raise ValueError("cannot merge LLaVA-NeXT newline tokens in vision-feature space")
            x = sig.vision_features if space == "vision" else sig.features
            merged = merge_tokens(x, sel)
            if space == "vision":
                merged = self.adapter.project(merged.to(x.dtype))
            feats.append(merged.to(sig.features.dtype))
            src.append(sel.targets.to(keep.device))
        feats, src = torch.cat(feats), torch.cat(src)
        if sel.order is not None:
            o = sel.order.to(feats.device)
            feats, src = feats[o], src[o]
        return feats, src

    def _text_spans(self, ids: torch.Tensor, vis: torch.Tensor):
        """Host indices (among the sample's real tokens, ``ids`` their host token ids) of the text after
        the last visual token (``vis``: indices of the visual tokens, ascending), and of the question."""
        n = int(ids.numel())
        last_vis = int(vis[-1]) if vis.numel() else -1
        after = torch.arange(last_vis + 1, n)
        spec = self.prompt_spec
        toks = ids[last_vis + 1:].tolist()
        i = 0
        while i < len(toks) and toks[i] in spec.sep_ids:
            i += 1
        j = len(toks)
        tail = list(spec.tail_ids)
        if tail and toks[-len(tail):] == tail:
            j = len(toks) - len(tail)
        return after, (after[i:j] if j > i else after)

    # ------------------------------------------------------------------ decoder
    def _prefill_llm(self, ctx: _Prefill, embeds, mask, pos, cache, use_cache, info, **kwargs):
        """Run the decoder on the prompt. Returns hidden, per-layer padded lengths, per-sample per-layer visual counts, selection time."""
        n_layers = len(self.lm.layers)
        B, L = embeds.shape[:2]
        layouts = info["layouts"]
        if not self.llm_layers:
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=use_cache, **kwargs)
            per_layer = [[int(lay.visual.numel())] * n_layers for lay in layouts]
            return out.last_hidden_state, [L] * n_layers, per_layer, 0.0
        lm = self.lm
        dev = embeds.device
        if pos is None:  # what the stock model does without position ids
            pos = torch.arange(L, device=dev)[None].expand(B, L)
        if mask is None:  # always an explicit mask: transformers must never read position gaps as packing
            mask = torch.ones(B, L, dtype=torch.long, device=dev)
        origin = info.get("origin") or [torch.arange(lay.visual.numel(), device=dev) for lay in layouts]
        entry = [torch.arange(lay.visual.numel(), device=dev) for lay in layouts]  # index at layer-0 entry
        moved = _to_device([t for lay in layouts for t in
                            (lay.real[lay.visual], lay.real[self._text_spans(lay.ids, lay.visual)[0]])], dev)
        # per sample: (visual tokens' layer-0 inputs, text-after tokens' layer-0 inputs)
        ctx.entry = [(embeds[b, moved[2 * b]], embeds[b, moved[2 * b + 1]]) for b in range(B)]
        ctx.llm_state = [{} for _ in range(B)]  # per-sample scratch of the method's stages, this prefill
        bounds = [0, *self.llm_layers, n_layers]
        h = embeds
        prev_in = None
        segments: list[_Segment] = []
        seq_lens: list[int] = []
        per_layer = [[] for _ in range(B)]
        shift = torch.zeros(B, dtype=torch.long, device=dev)
        sel_time = 0.0
        timer = _Timer(dev, self.clock)
        for s in range(len(bounds) - 1):
            a, z = bounds[s], bounds[s + 1]
            if s > 0:
                t0 = timer.now()
                h, mask, pos, layouts, origin, entry, dropped = self._llm_stage(
                    ctx, s - 1, a, h, prev_in, mask, pos, layouts, origin, entry)
                if self._reindex:
                    shift = shift + dropped
                sel_time += timer.now() - t0
            segments.append(_Segment(start=a, mask=mask, shift=shift.clone()))
            causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask, past_key_values=cache,
                                        position_ids=self.adapter.mask_positions(pos), layer_idx=a)
            pe = lm.rotary_emb(h, position_ids=pos)
            counts = [int(lay.visual.numel()) for lay in layouts]
            for i in range(a, z):
                prev_in = h
                # positions travel in `pe`; no position_ids, so no attention backend reads their gaps
                # (FastV keeps original positions) as packed sequences
                h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe,
                                 past_key_values=cache, use_cache=use_cache, **kwargs)
                seq_lens.append(h.shape[1])
                for b in range(B):
                    per_layer[b].append(counts[b])
        self._state.segments = segments
        return lm.norm(h), seq_lens, per_layer, sel_time

    def _llm_stage(self, ctx: _Prefill, stage, layer_idx, h, prev_in, mask, pos, layouts, origin, entry):
        B, L, D = h.shape
        dev = h.device
        spans = [self._text_spans(lay.ids, lay.visual) for lay in layouts]
        moved = _to_device([t for lay, (after, q) in zip(layouts, spans) for t in (lay.real, lay.visual, after, q)], dev)
        outs = []
        for b, lay in enumerate(layouts):
            real, vis, after, question = moved[4 * b:4 * b + 4]
            nv = int(lay.visual.numel())
            x, p = h[b, real], pos[..., b, real]
            sig = self._llm_signals(ctx, layer_idx, b, x, p, prev_in[b, real] if prev_in is not None else None,
                                    vis, origin[b], entry[b], after, question)
            sel = self._select((stage, b), lambda: self.method.select_llm(stage, sig)) if nv else None
            if sel is not None and sel.values is not None:
                raise ValueError("Selection.values is for the vision stage only; an llm stage merges with assign")
            if sel is None or sel.check(nv):
                sel = Selection(keep=torch.arange(nv, device=dev))
            keep = sel.keep.to(dev)
            src, out_x = [keep], [x[vis[keep]]]
            if sel.targets is not None and sel.targets.numel():
                tg = sel.targets.to(dev)
                src.append(tg)
                out_x.append(merge_tokens(x[vis], sel).to(x.dtype))
            src, vx = torch.cat(src), torch.cat(out_x)
            if sel.order is not None:
                o = sel.order.to(dev)
                src, vx = src[o], vx[o]
            r = self._place_outputs(lay, _runs(lay.visual), src, dev)
            perm = r["perm"]
            if perm is not None:
                vx, src = vx[perm], src[perm]
            vp = p[..., vis[src]]  # a merged token takes its target's position
            outs.append((r, x, p, vx, vp, src))
        new_L = max(r["n"] for r, *_ in outs)
        h2 = h.new_zeros(B, new_L, D)
        p2 = torch.zeros(*pos.shape[:-2], B, new_L, dtype=pos.dtype, device=dev)
        m2_h = torch.zeros(B, new_L, dtype=torch.long)
        new_layouts, dropped = [], []
        for b, (lay, (r, *_)) in enumerate(zip(layouts, outs)):
            pad = new_L - r["n"]
            m2_h[b, pad:] = 1
            ids = torch.full((r["n"],), -1, dtype=lay.ids.dtype)
            ids[r["text_dst"]] = lay.ids[r["text_src"]]
            new_layouts.append(_Layout(real=torch.arange(pad, new_L), visual=r["vis_dst"], ids=ids))
            dropped.append(int(lay.real.numel()) - r["n"])
        moved = _to_device([t for r, *_ in outs for t in (r["text_src"], r["text_dst"])]
                           + [m2_h.to(mask.dtype), torch.tensor(dropped)], dev)
        new_org, new_ent = [], []
        for b, (r, x, p, vx, vp, src) in enumerate(outs):
            pad = new_L - r["n"]
            ts, td = moved[2 * b], moved[2 * b + 1]
            vd = r["vis_dst_d"]
            h2[b, pad + td] = x[ts]
            h2[b, pad + vd] = vx
            p2[..., b, pad + td] = p[..., ts]
            p2[..., b, pad + vd] = vp
            if self._reindex:
                p2[b, pad:] = torch.arange(r["n"], device=dev) + p2[b, pad]
            new_org.append(origin[b][src])
            new_ent.append(entry[b][src])
        return h2, moved[-2], p2, new_layouts, new_org, new_ent, moved[-1]

    def _llm_signals(self, ctx: _Prefill, layer_idx, b, x, p, x_prev, vis, origin, entry, after, question) -> LLMSignals:
        lm = self.lm

        qks: dict[str, LayerQK] = {}  # per layer asked for: its q / k pieces, computed once this stage

        def pick(which) -> LayerQK:
            if which not in ("next", "prev"):
                raise ValueError(f"layer must be 'next' or 'prev', got {which!r}")
            if which not in qks:
                qks[which] = LayerQK(lm.layers[layer_idx] if which == "next" else lm.layers[layer_idx - 1],
                                     x if which == "next" else x_prev, lm.rotary_emb, p)
            return qks[which]

        def attn_fn(rows, which):
            qk = pick(which)
            return causal_attention_rows(qk.queries(rows), qk.keys(), rows, qk.attn.scaling)

        def keys_fn(which, rope):
            return pick(which).keys(rope).transpose(0, 1)

        vis_in, text_in = ctx.entry[b]
        return LLMSignals(layer=layer_idx, hidden=x, position_ids=p, visual=vis, origin=origin,
                          text_after=after, question=question, visual_embeds=vis_in[entry],
                          text_embeds=text_in, num_visual_entry=int(vis_in.shape[0]), entry_visual_embeds=vis_in,
                          state=ctx.llm_state[b], vision=ctx.vision_sigs[b], _attn_fn=attn_fn, _keys_fn=keys_fn,
                          _norm=lm.norm)

    def _decode_llm(self, embeds, attention_mask, position_ids, cache, use_cache, **kwargs):
        """One decode call: map generate's original-space mask / positions onto each segment's cache."""
        st = self._state
        B, q = embeds.shape[:2]
        gen_mask = attention_mask[:, st.orig_len:] if attention_mask is not None else None
        if position_ids is not None:
            position_ids = position_ids - st.pos_shift[:, None]  # original -> LLM space
        if gen_mask is None:  # generate() drops an all-ones mask; the pruned prompt may still have padding
            gen_mask = torch.ones(B, st.gen_len + q, dtype=torch.long, device=embeds.device)
        if position_ids is None and st.next_pos is not None:  # M-RoPE: continue after the last prompt position
            position_ids = st.next_pos[..., None] + st.gen_len + torch.arange(q, device=embeds.device)
        st.gen_len += q
        if st.segments is None:  # no llm stage: the stock decoder on the (possibly shortened) cache
            mask = attention_mask
            if st.llm_mask is not None:
                mask = torch.cat([st.llm_mask, gen_mask.to(st.llm_mask.dtype)], 1)
            return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=use_cache, **kwargs).last_hidden_state
        lm = self.lm
        if position_ids is None:  # the stock rule: continue after layer 0's cache
            position_ids = (cache.get_seq_length(0) + torch.arange(q, device=embeds.device))[None].expand(B, q)
        h = embeds
        bounds = [s.start for s in st.segments] + [len(lm.layers)]
        for s, seg in enumerate(st.segments):
            mask = torch.cat([seg.mask, gen_mask.to(seg.mask.dtype)], 1)  # always explicit (see _prefill_llm)
            pos = position_ids - seg.shift[:, None]
            causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask, past_key_values=cache,
                                        position_ids=self.adapter.mask_positions(pos), layer_idx=seg.start)
            pe = lm.rotary_emb(h, position_ids=pos)
            for i in range(seg.start, bounds[s + 1]):
                h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe,
                                 past_key_values=cache, use_cache=use_cache, **kwargs)
        return lm.norm(h)


def stable_hash(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)


def attach(model: torch.nn.Module, method: str | Method = "none", budget: int | None = None, *,
           next_layout: str = "spatial_unpad", prompt_spec: PromptSpec | None = None,
           family_options: dict | None = None, **options) -> PruningEngine:
    """Apply ``method`` with ``budget`` to ``model``; afterwards ``model.generate()`` / ``model()`` prune.

    ``family_options`` go to the model family's adapter (e.g. ``{"qwen_saliency": "pooled_query"}``);
    ``options`` to the method. Returns the engine (``engine.stats`` holds the last prefill's token
    accounting and timings; ``engine.remove()`` restores the model). Attaching again replaces the
    previous method.
    """
    m = get_method(method, budget, **options)
    return PruningEngine(model, m, next_layout=next_layout, prompt_spec=prompt_spec,
                         family_options=family_options).install()

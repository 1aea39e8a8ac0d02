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
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .method import Method, Selection, get_method
from .signals import LLMSignals, VisionSignals, causal_attention_rows, llm_qk

log = logging.getLogger(__name__)

FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "VideoLlavaForConditionalGeneration": "video_llava",
}
NEXT_LAYOUTS = ("spatial_unpad", "spatial")


def model_family(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name not in FAMILIES:
        raise TypeError(f"unsupported model class {name}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


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


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class PruningEngine:
    """Applies one :class:`Method` to one loaded LLaVA-family model. Use :func:`attach`."""

    def __init__(self, model: torch.nn.Module, method: Method, next_layout: str = "spatial_unpad",
                 prompt_spec: PromptSpec | None = None):
        self.model = model
        self.family = model_family(model)
        self.method = method
        if next_layout not in NEXT_LAYOUTS:
            raise ValueError(f"next_layout must be one of {NEXT_LAYOUTS}, got {next_layout!r}")
        self.next_layout = next_layout
        self.prompt_spec = prompt_spec or PromptSpec()
        self.core = model.model
        self.lm = self.core.language_model
        n_layers = len(self.lm.layers)
        tower = self.core.video_tower if self.family == "video_llava" else self.core.vision_tower
        method.setup(num_layers=n_layers, num_vision_layers=len(tower.encoder.layers), family=self.family)
        ks = tuple(method.llm_layers)
        if any(not (1 <= k < n_layers) for k in ks) or list(ks) != sorted(set(ks)):
            raise ValueError(f"{method.name}: llm stage layers {ks} must be ascending, in 1..{n_layers - 1}")
        self.llm_layers = ks
        self.stats: PrefillStats | None = None
        self.prefills = 0  # number of visual prefills handled (a check that the engine really ran)
        #: selections of the last prefill, keyed (stage, sample); stage "vision" or the llm stage index
        self.selections: dict[tuple, Selection] = {}
        #: when True, later prefills reuse ``selections`` instead of asking the method (e.g. to check
        #: cached decoding against a full recompute with the same kept set)
        self.replay = False
        #: optional per-row keys (e.g. question ids) for the next prefill; consumed by it
        self.sample_keys: list | None = None
        self._state: _State | None = None
        self._orig_forward = None

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

        generate.__signature__ = inspect.signature(orig_generate)
        generate.__doc__ = orig_generate.__doc__
        self.model.generate = types.MethodType(generate, self.model)
        self.model._pruning_engine = self
        return self

    def remove(self) -> None:
        for attr in ("forward", "generate", "_pruning_engine"):
            self.model.__dict__.pop(attr, None)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, logits_to_keep=0,
                labels=None, image_sizes=None, pixel_values_videos=None, **kwargs):
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pre-encoded mm_encoder_outputs cannot be pruned: pass pixel_values / pixel_values_videos")
        kwargs.pop("mm_encoder_outputs", None)
        has_visual = pixel_values is not None or pixel_values_videos is not None
        cache_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if not has_visual and (self._state is None or cache_len == 0):
            self._state = None  # a text-only prompt: the stock forward, untouched
            return self._orig_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                logits_to_keep=logits_to_keep, labels=labels, **kwargs)
        if labels is not None:
            raise ValueError("labels are not supported while a pruning method is attached (logits cover kept tokens only)")
        if use_cache is None:
            use_cache = self.lm.config.use_cache
        if has_visual:
            if cache_len:
                raise ValueError("a visual prompt on top of a non-empty KV cache (multi-turn cache reuse) is not supported")
            if input_ids is None:
                raise ValueError("the pruning engine needs input_ids to locate the image placeholders")
            timer = _Timer(input_ids.device)
            t0 = timer.now()
            embeds, mask, pos, info = self._prefill_inputs(input_ids, pixel_values, pixel_values_videos,
                                                           image_sizes, attention_mask, position_ids, timer)
            t1 = timer.now()
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.lm.config)
            hidden, seq_lens, per_layer, sel_time = self._prefill_llm(embeds, mask, pos, past_key_values,
                                                                       use_cache, info, **kwargs)
            t2 = timer.now()
            self.prefills += 1
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
            hidden = self._decode_llm(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, **kwargs)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.model.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values if use_cache else None)

    # ------------------------------------------------------------------ vision side
    def _vision_attention_layer(self, tower) -> int:
        v = getattr(self.method, "vision_layer", None)
        if v is None:
            v = self.model.config.vision_feature_layer
        if not isinstance(v, int):
            raise ValueError("vision signals need a single vision_feature_layer")
        n = len(tower.encoder.layers)
        idx = (v % (n + 1)) - 1  # hidden_states[v] is the output of encoder layer idx
        if idx < 0:
            raise ValueError(f"vision layer {v} is the embedding output: it has no attention")
        return idx

    def _run_tower(self, tower, pixels: torch.Tensor, want_attn: bool):
        """Run the tower once; return (select-layer hidden states (n, S, Dv), cls_attn (n, H, S), keys (n, S, d))."""
        captured = {}
        handle = None
        if want_attn:
            layer = tower.encoder.layers[self._vision_attention_layer(tower)]

            def pre_hook(module, args, kwargs):
                captured["h"] = args[0] if args else kwargs["hidden_states"]

            handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            out = tower(pixels, output_hidden_states=True, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        hs = out.hidden_states[self.model.config.vision_feature_layer]
        cls_attn = keys = None
        if want_attn:
            attn = layer.self_attn
            xn = layer.layer_norm1(captured["h"])
            n, s, _ = xn.shape
            heads, d = attn.num_heads, attn.head_dim
            k = attn.k_proj(xn).view(n, s, heads, d).float()
            q = attn.q_proj(xn[:, :1]).view(n, 1, heads, d).float()
            scores = torch.einsum("nqhd,nshd->nhqs", q, k) * attn.scale
            cls_attn = scores.softmax(-1)[:, :, 0]  # (n, H, S)
            keys = k.mean(2)  # (n, S, d)
        return hs, cls_attn, keys

    def _encode(self, pixel_values, pixel_values_videos, image_sizes, want_attn):
        """Visual blocks of the batch: per modality (token id), flat per-token tensors in masked-scatter order."""
        cfg = self.model.config
        strategy = cfg.vision_feature_select_strategy
        proj = self.core.multi_modal_projector
        blocks = []  # (token_id, dict of per-token tensors, [tokens per block])
        if pixel_values is not None:
            tower = self.core.image_tower if self.family == "video_llava" else self.core.vision_tower
            if self.family == "llava_next":
                blocks.append((cfg.image_token_id,) + self._encode_next(tower, pixel_values, image_sizes, want_attn))
            else:
                hs, ca, ks = self._run_tower(tower, pixel_values, want_attn)
                blocks.append((cfg.image_token_id,) + self._flatten_units(hs, ca, ks, proj, drop_cls=strategy == "default", kind="image"))
        if pixel_values_videos is not None:
            if self.family != "video_llava":
                raise ValueError(f"{self.family} does not take pixel_values_videos")
            b, t = pixel_values_videos.shape[:2]
            hs, ca, ks = self._run_tower(self.core.video_tower, pixel_values_videos.flatten(0, 1), want_attn)
            flat, sizes = self._flatten_units(hs, ca, ks, proj, drop_cls=False, kind="frame")
            sizes = [sum(sizes[i * t:(i + 1) * t]) for i in range(b)]  # one block per video
            blocks.append((cfg.video_token_id, flat, sizes))
        return blocks

    @staticmethod
    def _flatten_units(hs, ca, ks, proj, drop_cls: bool, kind: str):
        n, s, dv = hs.shape
        sel = hs[:, 1:] if drop_cls else hs
        feats = proj(sel)  # one projector call over all units, as the stock model does
        m = sel.shape[1]
        off = 1 if drop_cls else 0
        patch = torch.arange(off, off + m, device=hs.device) - 1  # [CLS] -> -1
        flat = {
            "features": feats.reshape(n * m, -1),
            "vision_features": sel.reshape(n * m, dv),
            "unit": torch.arange(n, device=hs.device).repeat_interleave(m),
            "patch": patch.repeat(n),
            "kind": kind,
        }
        if ca is not None:
            flat["cls_attn"] = ca[:, :, off:].permute(0, 2, 1).reshape(n * m, -1)
            flat["keys"] = ks[:, off:].reshape(n * m, -1)
        if drop_cls:  # each unit's [CLS], offered to methods as an extra candidate (VisionZip / VisionDrop)
            cls = {"features": proj(hs[:, :1])[:, 0], "vision_features": hs[:, 0]}
            if ca is not None:
                cls["cls_attn"] = ca[:, :, 0]
                cls["keys"] = ks[:, 0]
            flat["cls"] = cls
        flat["unit_pos"] = torch.full((n, 2), -1, dtype=torch.long, device=hs.device)
        return flat, [m] * n

    def _encode_next(self, tower, pixel_values, image_sizes, want_attn):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes")
        crops = [image_size_to_num_patches(image_size=sz, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) for sz in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)], 0)
        hs, ca, ks = self._run_tower(tower, pixel_values, want_attn)
        drop = cfg.vision_feature_select_strategy == "default"
        flat, per_crop = self._flatten_units(hs, ca, ks, self.core.multi_modal_projector, drop_cls=drop, kind="crop")
        m = per_crop[0]
        # per image: index of each LLM-input token into `flat` (-1 = image_newline), via our layout map
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        idx_all, sizes, start, unit_pos = [], [], 0, []
        for sz, c in zip(image_sizes, crops):
            unit_pos.append([-1, -1])
            if c > 1:
                gh, gw = get_anyres_image_grid_shape(sz, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                unit_pos.extend([i // gw, i % gw] for i in range(c - 1))
            idx = next_token_layout(sz, cfg, c, m, self.next_layout)
            idx_all.append(torch.where(idx >= 0, idx + start, idx))
            sizes.append(int(idx.numel()))
            start += c * m
        idx = torch.cat(idx_all).to(hs.device)
        newline = idx < 0
        safe = idx.clamp(min=0)
        per_unit = {k: flat.pop(k) for k in ("cls", "unit_pos") if k in flat}
        out = {k: (v[safe] if torch.is_tensor(v) else v) for k, v in flat.items()}
        out.update(per_unit)
        out["unit_pos"] = torch.tensor(unit_pos, dtype=torch.long, device=hs.device)
        out["features"] = out["features"].clone()
        out["features"][newline] = self.core.image_newline.to(out["features"].dtype)
        out["vision_features"] = out["vision_features"].masked_fill(newline[:, None], 0)
        out["unit"] = out["unit"].masked_fill(newline, -1)
        out["patch"] = out["patch"].masked_fill(newline, -1)
        if "cls_attn" in out:
            out["cls_attn"] = out["cls_attn"].masked_fill(newline[:, None], 0)
            out["keys"] = out["keys"].masked_fill(newline[:, None], 0)
        return out, sizes

    # ------------------------------------------------------------------ prefill inputs (vision stage)
    def _prefill_inputs(self, input_ids, pixel_values, pixel_values_videos, image_sizes, attention_mask,
                        position_ids, timer):
        t0 = timer.now()
        method = self.method
        want_attn = method.needs_vision_attention
        blocks = self._encode(pixel_values, pixel_values_videos, image_sizes, want_attn)
        embeds = self.lm.embed_tokens(input_ids)
        B, L = input_ids.shape
        is_visual = torch.zeros_like(input_ids, dtype=torch.bool)
        # per position: which block-token feeds it (global id over all blocks of all modalities)
        token_src = torch.full_like(input_ids, -1)
        tables: dict[str, list] = {}
        unit_tables: dict[str, list] = {}
        offset = 0
        unit_offset = 0
        for token_id, flat, sizes in blocks:
            where = input_ids == token_id
            n_slots, n_feat = int(where.sum()), int(flat["unit"].numel())
            if n_slots != n_feat:
                kind = "video" if token_id == getattr(self.model.config, "video_token_id", None) else "image"
                raise ValueError(
                    f"the prompt has {n_slots} {kind} placeholder tokens but the {len(sizes)} {kind}(s) give "
                    f"{n_feat} visual tokens: each {kind} needs exactly one <{kind}> in the prompt, expanded "
                    f"by the processor for this model (use llava.preprocess / the model's processor)")
            # every block must land inside one sample
            rows = torch.nonzero(where)[:, 0]
            bounds = torch.tensor([0] + sizes).cumsum(0)
            for i in range(len(sizes)):
                r = rows[bounds[i]:bounds[i + 1]]
                if r.numel() and r.min() != r.max():
                    raise ValueError(f"{flat['kind']} {i} is split across batch rows: placeholder counts per prompt do not match the images")
            embeds = embeds.masked_scatter(where[..., None], flat["features"].to(embeds.dtype))
            is_visual |= where
            token_src[where] = torch.arange(n_feat, device=input_ids.device) + offset
            offset += n_feat
            for k, v in flat.items():
                if k == "kind":
                    continue
                if k == "cls":
                    for ck, cv in v.items():
                        unit_tables.setdefault(ck, []).append(cv)
                    continue
                if k == "unit_pos":
                    unit_tables.setdefault("unit_pos", []).append(v)
                    continue
                if k == "unit":
                    v = torch.where(v >= 0, v + unit_offset, v)
                tables.setdefault(k, []).append(v)
            unit_offset += int(flat["unit"].max()) + 1 if flat["unit"].numel() else 0
            kind = flat["kind"]
        t1 = timer.now()
        if not blocks:
            raise ValueError("no visual input")
        self._probe_inputs = (embeds, attention_mask, position_ids)
        self._probe_cache = {}
        table = {k: torch.cat(v) for k, v in tables.items()}
        utable = {k: torch.cat(v) for k, v in unit_tables.items()}
        extras = getattr(method, "include_cls_candidates", False) and "vision_features" in utable
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_visual)
        candidates, noop, per_sample = [], [], []
        grid = self._grid()
        need_signals = method.vision_stage or method.needs_vision_attention
        for b in range(B):
            vis_pos = torch.nonzero(is_visual[b] & valid[b]).flatten()
            if not need_signals:  # e.g. the unpruned model or an llm-stage-only method: counts suffice
                candidates.append(int(vis_pos.numel()))
                per_sample.append((vis_pos, None))
                continue
            src = token_src[b, vis_pos]
            unit = table["unit"][src]
            # renumber units 0..U-1 per sample in prompt order (newline stays -1)
            uniq = []
            for u in unit.tolist():
                if u >= 0 and (not uniq or uniq[-1] != u) and u not in uniq:
                    uniq.append(u)
            remap = {u: i for i, u in enumerate(uniq)}
            unit = torch.tensor([remap.get(u, -1) for u in unit.tolist()], device=unit.device, dtype=torch.long)
            text_after, question = self._text_spans(input_ids[b], valid[b], vis_pos)
            gu = torch.tensor(uniq, dtype=torch.long, device=unit.device)
            fields = {
                "features": embeds[b, vis_pos], "vision_features": table["vision_features"][src],
                "unit": unit, "patch": table["patch"][src],
                "cls_attn": table["cls_attn"][src] if "cls_attn" in table else None,
                "keys": table["keys"][src] if "keys" in table else None,
            }
            if extras:  # append each unit's [CLS] as candidate T + u
                fields["features"] = torch.cat([fields["features"], utable["features"][gu].to(embeds.dtype)])
                fields["vision_features"] = torch.cat([fields["vision_features"], utable["vision_features"][gu]])
                fields["unit"] = torch.cat([unit, torch.arange(len(uniq), device=unit.device)])
                fields["patch"] = torch.cat([fields["patch"], torch.full((len(uniq),), -1, device=unit.device)])
                if fields["cls_attn"] is not None:
                    fields["cls_attn"] = torch.cat([fields["cls_attn"], utable["cls_attn"][gu]])
                    fields["keys"] = torch.cat([fields["keys"], utable["keys"][gu]])
            sig = VisionSignals(
                features=fields["features"], vision_features=fields["vision_features"], unit=fields["unit"],
                patch=fields["patch"], unit_kind=kind, grid=grid,
                text_embeds=embeds[b, text_after], question_mask=torch.isin(text_after, question),
                cls_attn=fields["cls_attn"].T.contiguous() if fields["cls_attn"] is not None else None,
                keys=fields["keys"], key=self._sample_key(b, input_ids[b][valid[b]]),
                num_stock=int(vis_pos.numel()), unit_pos=utable["unit_pos"][gu],
                _probe_fn=self._make_probe(b, vis_pos, text_after, question),
            )
            candidates.append(int(vis_pos.numel()))
            per_sample.append((vis_pos, sig))
        self._vision_sigs = [sig for _, sig in per_sample]
        selections = []
        for b, (vis_pos, sig) in enumerate(per_sample):
            sel = self._select(("vision", b), lambda: method.select_vision(sig)) if method.vision_stage else None
            if sel is not None:
                sel.validate(sig.num_tokens)
            noop.append(sel is None or sel.is_identity(sig.num_stock))
            selections.append(sel)
        if method.vision_stage and any(noop) and method.budget is not None:
            log.info("%s: budget %s >= visual tokens in %d/%d sample(s): nothing pruned there",
                     method.name, method.budget, sum(noop), B)
        self.sample_keys = None
        info = {"candidates": candidates, "noop": noop, "t_vision": t1 - t0}
        if all(noop):  # identical to the stock model: same tensors, nothing re-laid out
            info["visual"] = [vp for vp, _ in per_sample]
            info["origin"] = [torch.arange(vp.numel(), device=vp.device) for vp, _ in per_sample]
            info["input_ids"] = input_ids
            info["valid"] = valid
            self._state = _State(orig_len=L, llm_mask=attention_mask, pos_shift=torch.zeros(B, dtype=torch.long, device=input_ids.device), segments=None)
            return embeds, attention_mask, position_ids, info
        return self._respliced(embeds, input_ids, valid, attention_mask, position_ids, per_sample, selections, info)

    def _respliced(self, embeds, input_ids, valid, attention_mask, position_ids, per_sample, selections, info):
        """Rebuild each row as [text before, kept/merged visual tokens per run, text after], re-pad left."""
        B, L, D = embeds.shape
        dev = embeds.device
        rows, idrows, visual, origin = [], [], [], []
        for b, ((vis_pos, sig), sel) in enumerate(zip(per_sample, selections)):
            if sel is None or sel.is_identity(sig.num_stock):
                sel = Selection(keep=torch.arange(sig.num_stock))
            out_feats, out_src = self._materialize_vision(sig, sel)
            valid_pos = torch.nonzero(valid[b]).flatten()
            # place outputs in the placeholder run their source token belongs to
            is_vis = torch.zeros(L, dtype=torch.bool, device=dev)
            is_vis[vis_pos] = True
            starts = is_vis & ~torch.cat([torch.zeros(1, dtype=torch.bool, device=dev), is_vis[:-1]])
            run_id = starts.long().cumsum(0)  # run number at each visual position (1-based)
            tok_run = run_id[vis_pos]  # (T,)
            if sig.num_tokens > sig.num_stock:  # extra [CLS] candidates go to their unit's run
                first_of_unit = torch.stack([tok_run[sig.unit_indices(u)[0]] for u in range(sig.num_units)])
                tok_run = torch.cat([tok_run, first_of_unit[sig.unit[sig.num_stock:]]])
            out_run = tok_run[out_src.to(dev)]
            pieces, ids, vis_new, org = [], [], [], []
            new_len = 0
            for p in valid_pos.tolist():
                if is_vis[p]:
                    if starts[p]:
                        r = int(run_id[p])
                        sel_r = torch.nonzero(out_run == r).flatten()
                        pieces.append(out_feats[sel_r])
                        ids.append(torch.full((sel_r.numel(),), -1, dtype=torch.long, device=dev))
                        vis_new.append(torch.arange(new_len, new_len + sel_r.numel(), device=dev))
                        org.append(out_src.to(dev)[sel_r])
                        new_len += sel_r.numel()
                    continue
                pieces.append(embeds[b, p:p + 1])
                ids.append(input_ids[b, p:p + 1])
                new_len += 1
            rows.append(torch.cat(pieces))
            idrows.append(torch.cat(ids))
            visual.append(torch.cat(vis_new) if vis_new else torch.zeros(0, dtype=torch.long, device=dev))
            origin.append(torch.cat(org) if org else torch.zeros(0, dtype=torch.long, device=dev))
        new_L = max(r.shape[0] for r in rows)
        new_embeds = embeds.new_zeros(B, new_L, D)
        new_mask = torch.zeros(B, new_L, dtype=torch.long, device=dev)
        new_ids = torch.full((B, new_L), -1, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            pad = new_L - r.shape[0]
            new_embeds[b, pad:] = r
            new_mask[b, pad:] = 1
            new_ids[b, pad:] = idrows[b]
            visual[b] = visual[b] + pad
        orig_valid = valid.long().sum(1)
        shift = orig_valid - new_mask.sum(1)
        if position_ids is not None:
            base = (position_ids * valid).amax(1) - (orig_valid - 1)  # first real position per row
            new_pos = (new_mask.cumsum(1) - 1).clamp(min=0) + base[:, None] * new_mask
        else:
            new_pos = None
        info.update(visual=visual, origin=origin, input_ids=new_ids, valid=new_mask.bool())
        self._state = _State(orig_len=L, llm_mask=new_mask, pos_shift=shift, segments=None)
        return new_embeds, new_mask, new_pos, info

    def _make_probe(self, b, vis_pos, text_after, question):
        def probe(layer: int, queries: str = "question") -> torch.Tensor:
            return self._probe_rows(b, vis_pos, text_after, question, layer, queries)
        return probe

    def _probe_hidden(self, k: int) -> torch.Tensor:
        """Hidden states entering decoder layer k for the full (unpruned) spliced batch; no cache."""
        if k not in self._probe_cache:
            embeds, mask, pos = self._probe_inputs
            lm = self.lm
            h = embeds
            if k > 0:
                if pos is None:
                    pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
                causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                            past_key_values=None, position_ids=pos)
                pe = lm.rotary_emb(h, position_ids=pos)
                for i in range(k):
                    h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe, position_ids=pos)
            self._probe_cache[k] = h
        return self._probe_cache[k]

    def _probe_rows(self, b, vis_pos, text_after, question, k, queries):
        """Layer k's causal attention (H, Q, T) from the chosen text queries to the sample's visual tokens."""
        lm = self.lm
        if not (0 <= k < len(lm.layers)):
            raise ValueError(f"probe layer {k} outside 0..{len(lm.layers) - 1}")
        h = self._probe_hidden(k)
        embeds, mask, pos = self._probe_inputs
        L = h.shape[1]
        real = torch.nonzero(mask[b]).flatten() if mask is not None else torch.arange(L, device=h.device)
        p = pos[b, real] if pos is not None else real.clone()  # without ids: arange over the row, as above
        rows = {"question": question, "all_post_image": text_after, "text_after": text_after,
                "last": real[-1:]}.get(queries)
        if rows is None:
            raise ValueError(f"probe queries must be question / all_post_image / last, got {queries!r}")
        rows = torch.searchsorted(real, rows)
        q, kk = llm_qk(lm.layers[k], h[b, real], lm.rotary_emb, p, rows)
        attn = causal_attention_rows(q, kk, rows, lm.layers[k].self_attn.scaling)
        return attn[:, :, torch.searchsorted(real, vis_pos)]

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
        if sel.targets is not None and sel.targets.numel():
            space = sel.space
            if space == "vision" and bool(sig.is_newline[sel.targets].any() | sig.is_newline[sel.assign >= 0].any()):
                raise ValueError("cannot merge LLaVA-NeXT newline tokens in vision-feature space")
            x = sig.vision_features if space == "vision" else sig.features
            merged = merge_tokens(x, sel)
            if space == "vision":
                merged = self.core.multi_modal_projector(merged[None].to(x.dtype))[0]
            feats.append(merged.to(sig.features.dtype))
            src.append(sel.targets.to(keep.device))
        feats, src = torch.cat(feats), torch.cat(src)
        if sel.order is not None:
            o = sel.order.to(feats.device)
            feats, src = feats[o], src[o]
        return feats, src

    def _grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        g = vc.image_size // vc.patch_size
        return (g, g)

    def _text_spans(self, ids: torch.Tensor, valid: torch.Tensor, vis_pos: torch.Tensor):
        """Indices (into the row) of the text after the last visual token, and of the question part."""
        real = torch.nonzero(valid).flatten()
        last_vis = int(vis_pos.max()) if vis_pos.numel() else -1
        after = real[real > last_vis]
        q = after
        spec = self.prompt_spec
        toks = ids[q].tolist()
        i = 0
        while i < len(toks) and toks[i] in spec.sep_ids:
            i += 1
        j = len(toks)
        tail = list(spec.tail_ids)
        if tail and toks[-len(tail):] == tail:
            j = len(toks) - len(tail)
        if j > i:
            q = q[i:j]
        return after, q

    # ------------------------------------------------------------------ decoder
    def _prefill_llm(self, embeds, mask, pos, cache, use_cache, info, **kwargs):
        """Run the decoder on the prompt. Returns hidden, per-layer padded lengths, per-sample per-layer visual counts, selection time."""
        n_layers = len(self.lm.layers)
        B, L = embeds.shape[:2]
        visual = info["visual"]
        if not self.llm_layers:
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=use_cache, **kwargs)
            per_layer = [[int(v.numel())] * n_layers for v in visual]
            return out.last_hidden_state, [L] * n_layers, per_layer, 0.0
        lm = self.lm
        if pos is None:  # what the stock model does without position ids
            pos = torch.arange(L, device=embeds.device)[None].expand(B, L)
        origin = info["origin"]
        entry = [torch.arange(v.numel(), device=embeds.device) for v in visual]  # index at layer-0 entry
        self._entry = []  # per sample: (visual tokens' layer-0 inputs, text-after tokens' layer-0 inputs)
        self._llm_state = [{} for _ in range(B)]  # per-sample scratch of the method's stages, this prefill
        for b in range(B):
            real = torch.nonzero(mask[b]).flatten() if mask is not None else torch.arange(L, device=embeds.device)
            last = int(visual[b].max()) if visual[b].numel() else -1
            self._entry.append((embeds[b, visual[b]], embeds[b, real[real > last]]))
        ids = info["input_ids"]
        bounds = [0, *self.llm_layers, n_layers]
        h = embeds
        prev_in = None
        segments: list[_Segment] = []
        seq_lens: list[int] = []
        per_layer = [[] for _ in range(B)]
        shift = torch.zeros(B, dtype=torch.long, device=embeds.device)
        sel_time = 0.0
        timer = _Timer(embeds.device)
        for s in range(len(bounds) - 1):
            a, z = bounds[s], bounds[s + 1]
            if s > 0:
                t0 = timer.now()
                h, mask, pos, ids, visual, origin, entry, dropped = self._llm_stage(
                    s - 1, a, h, prev_in, mask, pos, ids, visual, origin, entry)
                if self.method.position_mode == "reindex":
                    shift = shift + dropped
                sel_time += timer.now() - t0
            segments.append(_Segment(start=a, mask=mask, shift=shift.clone()))
            causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                        past_key_values=cache, position_ids=pos, layer_idx=a)
            pe = lm.rotary_emb(h, position_ids=pos)
            for i in range(a, z):
                prev_in = h
                h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe, position_ids=pos,
                                 past_key_values=cache, use_cache=use_cache, **kwargs)
                seq_lens.append(h.shape[1])
                for b in range(B):
                    per_layer[b].append(int(visual[b].numel()))
        self._state.segments = segments
        return lm.norm(h), seq_lens, per_layer, sel_time

    def _llm_stage(self, stage, layer_idx, h, prev_in, mask, pos, ids, visual, origin, entry):
        B, L, D = h.shape
        dev = h.device
        valid = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        new_rows, new_pos, new_ids, new_vis, new_org, new_ent, dropped = [], [], [], [], [], [], []
        for b in range(B):
            real = torch.nonzero(valid[b]).flatten()
            vis = torch.searchsorted(real, visual[b])  # row positions -> index among real tokens
            x, p, tok = h[b, real], pos[b, real], ids[b, real]
            after = torch.arange(int(vis.max()) + 1 if vis.numel() else 0, real.numel(), device=dev)
            question = self._text_spans(tok, torch.ones_like(tok, dtype=torch.bool), vis)[1]
            sig = self._llm_signals(layer_idx, b, x, p, prev_in[b, real] if prev_in is not None else None,
                                    vis, origin[b], entry[b], after, question)
            sel = self._select((stage, b), lambda: self.method.select_llm(stage, sig)) if vis.numel() else None
            if sel is None or sel.is_identity(vis.numel()):
                sel = Selection(keep=torch.arange(vis.numel(), device=dev))
            sel.validate(vis.numel())
            keep = sel.keep.to(dev)
            out_x = [x[vis[keep]]]
            out_p = [p[vis[keep]]]
            out_o = [origin[b][keep]]
            out_e = [entry[b][keep]]
            if sel.targets is not None and sel.targets.numel():
                tg = sel.targets.to(dev)
                out_x.append(merge_tokens(x[vis], sel).to(x.dtype))
                out_p.append(p[vis[tg]])
                out_o.append(origin[b][tg])
                out_e.append(entry[b][tg])
            vx, vp = torch.cat(out_x), torch.cat(out_p)
            if sel.order is not None:
                o = sel.order.to(dev)
                vx, vp = vx[o], vp[o]
                out_o, out_e = [torch.cat(out_o)[o]], [torch.cat(out_e)[o]]
            first = int(vis.min()) if vis.numel() else 0
            last = int(vis.max()) + 1 if vis.numel() else 0
            row = torch.cat([x[:first], vx, x[last:]])
            prow = torch.cat([p[:first], vp, p[last:]])
            irow = torch.cat([tok[:first], torch.full((vx.shape[0],), -1, device=dev, dtype=tok.dtype), tok[last:]])
            new_rows.append(row)
            new_pos.append(prow)
            new_ids.append(irow)
            new_vis.append(torch.arange(first, first + vx.shape[0], device=dev))
            new_org.append(torch.cat(out_o))
            new_ent.append(torch.cat(out_e))
            dropped.append(real.numel() - row.shape[0])
        new_L = max(r.shape[0] for r in new_rows)
        h2 = h.new_zeros(B, new_L, D)
        m2 = torch.zeros(B, new_L, dtype=torch.long if mask is None else mask.dtype, device=dev)
        p2 = torch.zeros(B, new_L, dtype=pos.dtype, device=dev)
        i2 = torch.full((B, new_L), -1, dtype=ids.dtype, device=dev)
        for b in range(B):
            n = new_rows[b].shape[0]
            padn = new_L - n
            h2[b, padn:] = new_rows[b]
            m2[b, padn:] = 1
            i2[b, padn:] = new_ids[b]
            p2[b, padn:] = new_pos[b] if self.method.position_mode == "keep" else torch.arange(n, device=dev) + new_pos[b][0]
            new_vis[b] = new_vis[b] + padn
        if mask is None and bool(m2.all()):
            m2 = None  # no padding needed: keep the stock no-mask path (SDPA is_causal)
        return h2, m2, p2, i2, new_vis, new_org, new_ent, torch.tensor(dropped, device=dev)

    def _llm_signals(self, layer_idx, b, x, p, x_prev, vis, origin, entry, after, question) -> LLMSignals:
        lm = self.lm

        def pick(which):
            if which == "next":
                return lm.layers[layer_idx], x
            if which == "prev":
                return lm.layers[layer_idx - 1], x_prev
            raise ValueError(f"layer must be 'next' or 'prev', got {which!r}")

        def attn_fn(rows, which):
            layer, inp = pick(which)
            q, k = llm_qk(layer, inp, lm.rotary_emb, p, rows)
            return causal_attention_rows(q, k, rows, layer.self_attn.scaling)

        def keys_fn(which, rope):
            layer, inp = pick(which)
            return llm_qk(layer, inp, lm.rotary_emb, p, None, rope=rope)[1].transpose(0, 1)

        vis_in, text_in = self._entry[b]
        return LLMSignals(layer=layer_idx, hidden=x, position_ids=p, visual=vis, origin=origin,
                          text_after=after, question=question, visual_embeds=vis_in[entry],
                          text_embeds=text_in, num_visual_entry=int(vis_in.shape[0]), entry_visual_embeds=vis_in,
                          state=self._llm_state[b], vision=self._vision_sigs[b], _attn_fn=attn_fn, _keys_fn=keys_fn,
                          _norm=lm.norm)

    def _decode_llm(self, embeds, attention_mask, position_ids, cache, use_cache, **kwargs):
        """One decode call: map generate's original-space mask / positions onto each segment's cache."""
        st = self._state
        B, q = embeds.shape[:2]
        gen_mask = attention_mask[:, st.orig_len:] if attention_mask is not None else None
        if position_ids is not None:
            position_ids = position_ids - st.pos_shift[:, None]  # original -> LLM space
        if st.segments is None:  # no llm stage: the stock decoder on the (possibly shortened) cache
            mask = attention_mask
            if attention_mask is not None and st.llm_mask is not None:
                mask = torch.cat([st.llm_mask, gen_mask], 1)
            return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=use_cache, **kwargs).last_hidden_state
        lm = self.lm
        if position_ids is None:  # the stock rule: continue after layer 0's cache
            position_ids = (cache.get_seq_length(0) + torch.arange(q, device=embeds.device))[None].expand(B, q)
        h = embeds
        bounds = [s.start for s in st.segments] + [len(lm.layers)]
        for s, seg in enumerate(st.segments):
            mask = None
            if seg.mask is not None or gen_mask is not None:
                prompt = seg.mask if seg.mask is not None else torch.ones(
                    B, cache.get_seq_length(seg.start), dtype=torch.long, device=embeds.device)
                gen = gen_mask if gen_mask is not None else torch.ones(
                    B, cache.get_seq_length(seg.start) + q - prompt.shape[1], dtype=prompt.dtype, device=embeds.device)
                mask = torch.cat([prompt, gen.to(prompt.dtype)], 1)
            pos = position_ids - seg.shift[:, None]
            causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                        past_key_values=cache, position_ids=pos, layer_idx=seg.start)
            pe = lm.rotary_emb(h, position_ids=pos)
            for i in range(seg.start, bounds[s + 1]):
                h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe, position_ids=pos,
                                 past_key_values=cache, use_cache=use_cache, **kwargs)
        return lm.norm(h)


def stable_hash(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)


def merge_tokens(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Merged (contextual) tokens of ``sel`` from rows of ``x`` (n, D), computed in fp32."""
    tg = sel.targets.to(x.device)
    assign = sel.assign.to(x.device).clone()
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    taken[sel.keep.to(x.device)] = True
    taken[tg] = True
    assign[taken] = -1
    c = tg.numel()
    xf = x.float()
    sums = torch.zeros(c, x.shape[1], device=x.device, dtype=torch.float32)
    counts = torch.zeros(c, device=x.device, dtype=torch.float32)
    m = assign >= 0
    sums.index_add_(0, assign[m], xf[m])
    counts.index_add_(0, assign[m], torch.ones(int(m.sum()), device=x.device))
    if sel.rule == "target_plus_mean":
        return xf[tg] + sums / counts.clamp(min=1)[:, None]
    if sel.rule == "mean":
        return (xf[tg] + sums) / (counts + 1)[:, None]
    raise ValueError(f"unknown merge rule {sel.rule!r}")


def next_token_layout(image_size, config, num_crops: int, tokens_per_crop: int, layout: str) -> torch.Tensor:
    """For one LLaVA-NeXT image: the source of each LLM-input token as an index into the image's
    crop-major token list (crop * tokens_per_crop + patch), or -1 for an ``image_newline`` token.

    ``spatial`` (LLaVA's ``mm_patch_merge_type = spatial``): the base crop, then the grid crops'
    tokens in row-major order over the full (rows x side) x (cols x side) patch grid; exactly
    crops * tokens_per_crop tokens, no newlines.
    ``spatial_unpad``: transformers' packing (base crop, then the grid re-assembled, unpadded,
    with one newline per row) - computed with transformers' own unpad function on index maps.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = int(round(tokens_per_crop ** 0.5))
    if side * side != tokens_per_crop:
        raise ValueError("LLaVA-NeXT layouts need a square patch grid per crop")
    base = torch.arange(tokens_per_crop)
    if num_crops == 1:
        return base if layout == "spatial" else torch.cat([base, torch.tensor([-1])])
    gh, gw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    if layout == "spatial":  # (gh, gw, side, side) -> (gh, side, gw, side): full-grid raster
        grid = torch.arange(tokens_per_crop, num_crops * tokens_per_crop).view(gh, gw, side, side)
        return torch.cat([base, grid.permute(0, 2, 1, 3).flatten()])
    grid = torch.arange(tokens_per_crop, num_crops * tokens_per_crop, dtype=torch.float64)
    grid = grid.view(gh, gw, side, side, 1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (1, gh*side, gw*side)
    grid = unpad_image(grid, image_size)
    grid = torch.cat([grid, torch.full((1, grid.shape[1], 1), -1.0, dtype=grid.dtype)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1).flatten().long()])


def attach(model: torch.nn.Module, method: str | Method = "none", budget: int | None = None, *,
           next_layout: str = "spatial_unpad", prompt_spec: PromptSpec | None = None, **options) -> PruningEngine:
    """Apply ``method`` with ``budget`` to ``model``; afterwards ``model.generate()`` / ``model()`` prune.

    Returns the engine (``engine.stats`` holds the last prefill's token accounting and timings;
    ``engine.remove()`` restores the model). Attaching again replaces the previous method.
    """
    m = get_method(method, budget, **options)
    return PruningEngine(model, m, next_layout=next_layout, prompt_spec=prompt_spec).install()

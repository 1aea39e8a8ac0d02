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
    gen_len: int = 0  # tokens decoded so far (after the prompt)


@dataclass
class _Layout:
    """Host-side layout of one sample's row (decided on the host, so the device never waits)."""

    real: torch.Tensor  # (n,) row positions of the sample's real (non-padding) tokens
    visual: torch.Tensor  # (nv,) indices among them of the visual tokens, ascending
    ids: torch.Tensor  # (n,) their token ids (-1 for a visual token after re-splicing)


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move host index tensors to ``device`` in one copy (no host synchronisation)."""
    device = torch.device(device)
    if device.type == "cpu" or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).to(device, non_blocking=True)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


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
        self._pruned_caches = weakref.WeakSet()  # caches a pruned prefill wrote (a 2nd turn on them is refused)
        self._release_scratch()

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
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, logits_to_keep=0,
                labels=None, image_sizes=None, pixel_values_videos=None, **kwargs):
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pre-encoded mm_encoder_outputs cannot be pruned: pass pixel_values / pixel_values_videos")
        kwargs.pop("mm_encoder_outputs", None)
        has_visual = pixel_values is not None or pixel_values_videos is not None
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
            if past_key_values is not None:
                self._pruned_caches.add(past_key_values)
            hidden, seq_lens, per_layer, sel_time = self._prefill_llm(embeds, mask, pos, past_key_values,
                                                                       use_cache, info, **kwargs)
            t2 = timer.now()
            self.prefills += 1
            self._release_scratch()
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

    def _release_scratch(self) -> None:
        """Drop the per-prefill tensors (probe inputs, signals, entry embeddings, stage scratch)."""
        self._probe_inputs = self._probe_cache = self._vision_sigs = self._entry = self._llm_state = None

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
            "unit_h": torch.arange(n).repeat_interleave(m),  # host: the layout is planned on the host
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
        if torch.is_tensor(image_sizes):
            image_sizes = image_sizes.tolist()  # one host read; the crop arithmetic is host work
        image_sizes = [tuple(int(v) for v in sz) for sz in image_sizes]
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
        idx_h = torch.cat(idx_all)
        idx = _to_device([idx_h], hs.device)[0]
        newline = idx < 0
        safe = idx.clamp(min=0)
        per_unit = {k: flat.pop(k) for k in ("cls", "unit_pos") if k in flat}
        unit_h = flat.pop("unit_h")
        out = {k: (v[safe] if torch.is_tensor(v) else v) for k, v in flat.items()}
        out.update(per_unit)
        out["unit_h"] = torch.where(idx_h >= 0, unit_h[idx_h.clamp(min=0)], -1)
        out["unit_pos"] = torch.tensor(unit_pos, dtype=torch.long, device=hs.device)
        nl = newline[:, None]
        out["features"] = torch.where(nl, self.core.image_newline.to(out["features"].dtype), out["features"])
        out["vision_features"] = out["vision_features"].masked_fill(nl, 0)
        out["patch"] = out["patch"].masked_fill(newline, -1)
        if "cls_attn" in out:
            out["cls_attn"] = out["cls_attn"].masked_fill(nl, 0)
            out["keys"] = out["keys"].masked_fill(nl, 0)
        return out, sizes

    # ------------------------------------------------------------------ prefill inputs (vision stage)
    def _prefill_inputs(self, input_ids, pixel_values, pixel_values_videos, image_sizes, attention_mask,
                        position_ids, timer):
        t0 = timer.now()
        method = self.method
        blocks = self._encode(pixel_values, pixel_values_videos, image_sizes, method.needs_vision_attention)
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
                kname = "video" if token_id == getattr(self.model.config, "video_token_id", None) else "image"
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
                elif k == "unit_pos":
                    unit_tables.setdefault("unit_pos", []).append(v)
                else:
                    tables.setdefault(k, []).append(v)
            kind = flat["kind"]
        t1 = timer.now()
        self._probe_inputs = (embeds, attention_mask, position_ids)
        self._probe_cache = {}
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
                sig = VisionSignals(
                    features=fields["features"], vision_features=fields["vision_features"], unit=fields["unit"],
                    patch=fields["patch"], unit_kind=kind, grid=self._grid(),
                    text_embeds=embeds[b, real[after]], question_mask=qmask.bool(),
                    cls_attn=fields["cls_attn"].T.contiguous() if fields["cls_attn"] is not None else None,
                    keys=fields["keys"], key=self._sample_key(b, lay.ids),
                    num_stock=int(lay.visual.numel()), unit_pos=utable["unit_pos"][gu],
                    _probe_fn=self._make_probe(b, real, vis, after, question),
                    _unit_host=torch.cat([host[b][3], host[b][9]]) if n_cls else host[b][3],
                )
                per_sample.append(sig)
        else:  # e.g. the unpruned model or an llm-stage-only method: the layout suffices
            per_sample = [None] * B
        self._vision_sigs = per_sample
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
                                 pos_shift=torch.zeros(B, dtype=torch.long, device=dev), segments=None)
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
        origin = []
        for b, r in enumerate(rows):
            pad = new_L - r["n"]
            text_src, text_dst = moved[2 * b], moved[2 * b + 1]
            new_embeds[b, pad + text_dst] = embeds[b, text_src]
            x, src = r["x"], r["src"]
            vd = r["vis_dst_d"]
            new_embeds[b, pad + vd] = x[r["perm"]] if r["perm"] is not None else x
            origin.append(src[r["perm"]] if r["perm"] is not None else src)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        orig_valid = valid.long().sum(1)
        shift = orig_valid - new_mask.sum(1)
        if position_ids is not None:
            base = (position_ids * valid).amax(1) - (orig_valid - 1)  # first real position per row
            new_pos = (new_mask.cumsum(1) - 1).clamp(min=0) + base[:, None] * new_mask
        else:
            new_pos = None
        info.update(layouts=new_layouts, origin=origin)
        self._state = _State(orig_len=L, llm_mask=new_mask, pos_shift=shift, segments=None)
        return new_embeds, new_mask, new_pos, info

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
        vis_dst = torch.repeat_interleave(new_start, cnt) + (torch.arange(m) - torch.repeat_interleave(new_cum[:-1], cnt))
        return {"n": n_real - nv + m, "text_src": text_src, "text_dst": text_dst,
                "vis_dst": vis_dst, "vis_dst_d": _to_device([vis_dst], dev)[0], "perm": perm, "src": out_src}

    def _make_probe(self, b, real, vis, after, question):
        def probe(layer: int, queries: str = "question") -> torch.Tensor:
            return self._probe_rows(b, real, vis, after, question, layer, queries)
        return probe

    def _probe_hidden(self, k: int) -> torch.Tensor:
        """Hidden states entering decoder layer k for the full (unpruned) spliced batch; no cache."""
        if k not in self._probe_cache:
            embeds, mask, pos = self._probe_inputs
            lm = self.lm
            h = embeds
            if k > 0:
                B, L = h.shape[:2]
                if pos is None:
                    pos = torch.arange(L, device=h.device)[None].expand(B, -1)
                if mask is None:  # an explicit mask: never let transformers read position gaps as packing
                    mask = torch.ones(B, L, dtype=torch.long, device=h.device)
                causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                            past_key_values=None, position_ids=pos)
                pe = lm.rotary_emb(h, position_ids=pos)
                for i in range(k):
                    h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe)
            self._probe_cache[k] = h
        return self._probe_cache[k]

    def _probe_rows(self, b, real, vis, after, question, k, queries):
        """Layer k's causal attention (H, Q, T) from the chosen text queries to the sample's visual tokens.

        real: row positions of the sample's real tokens; vis / after / question: indices among them."""
        lm = self.lm
        if not (0 <= k < len(lm.layers)):
            raise ValueError(f"probe layer {k} outside 0..{len(lm.layers) - 1}")
        h = self._probe_hidden(k)
        embeds, mask, pos = self._probe_inputs
        p = pos[b, real] if pos is not None else real.clone()  # without ids: arange over the row, as above
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
        if sel.targets is not None and sel.targets.numel():
            space = sel.space
            if space == "vision" and sig.num_stock and bool(sig._unit_host.lt(0).any()):  # NeXT newline tokens
                tg, asg = sel.targets.to(keep.device), sel.assign.to(keep.device)
                if bool(sig.is_newline[tg].any() | (sig.is_newline & (asg >= 0)).any()):
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
    def _prefill_llm(self, embeds, mask, pos, cache, use_cache, info, **kwargs):
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
        self._entry = [(embeds[b, moved[2 * b]], embeds[b, moved[2 * b + 1]]) for b in range(B)]
        self._llm_state = [{} for _ in range(B)]  # per-sample scratch of the method's stages, this prefill
        bounds = [0, *self.llm_layers, n_layers]
        h = embeds
        prev_in = None
        segments: list[_Segment] = []
        seq_lens: list[int] = []
        per_layer = [[] for _ in range(B)]
        shift = torch.zeros(B, dtype=torch.long, device=dev)
        sel_time = 0.0
        timer = _Timer(dev)
        for s in range(len(bounds) - 1):
            a, z = bounds[s], bounds[s + 1]
            if s > 0:
                t0 = timer.now()
                h, mask, pos, layouts, origin, entry, dropped = self._llm_stage(
                    s - 1, a, h, prev_in, mask, pos, layouts, origin, entry)
                if self.method.position_mode == "reindex":
                    shift = shift + dropped
                sel_time += timer.now() - t0
            segments.append(_Segment(start=a, mask=mask, shift=shift.clone()))
            causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                        past_key_values=cache, position_ids=pos, layer_idx=a)
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

    def _llm_stage(self, stage, layer_idx, h, prev_in, mask, pos, layouts, origin, entry):
        B, L, D = h.shape
        dev = h.device
        spans = [self._text_spans(lay.ids, lay.visual) for lay in layouts]
        moved = _to_device([t for lay, (after, q) in zip(layouts, spans) for t in (lay.real, lay.visual, after, q)], dev)
        outs = []
        for b, lay in enumerate(layouts):
            real, vis, after, question = moved[4 * b:4 * b + 4]
            nv = int(lay.visual.numel())
            x, p = h[b, real], pos[b, real]
            sig = self._llm_signals(layer_idx, b, x, p, prev_in[b, real] if prev_in is not None else None,
                                    vis, origin[b], entry[b], after, question)
            sel = self._select((stage, b), lambda: self.method.select_llm(stage, sig)) if nv else None
            if sel is None or sel.check(nv):
                sel = Selection(keep=torch.arange(nv, device=dev))
            keep = sel.keep.to(dev)
            src, out_x, out_p = [keep], [x[vis[keep]]], [p[vis[keep]]]
            if sel.targets is not None and sel.targets.numel():
                tg = sel.targets.to(dev)
                src.append(tg)
                out_x.append(merge_tokens(x[vis], sel).to(x.dtype))
                out_p.append(p[vis[tg]])
            src, vx, vp = torch.cat(src), torch.cat(out_x), torch.cat(out_p)
            if sel.order is not None:
                o = sel.order.to(dev)
                src, vx, vp = src[o], vx[o], vp[o]
            r = self._place_outputs(lay, _runs(lay.visual), src, dev)
            perm = r["perm"]
            if perm is not None:
                vx, vp, src = vx[perm], vp[perm], src[perm]
            outs.append((r, x, p, vx, vp, src))
        new_L = max(r["n"] for r, *_ in outs)
        h2 = h.new_zeros(B, new_L, D)
        p2 = torch.zeros(B, new_L, dtype=pos.dtype, device=dev)
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
            p2[b, pad + td] = p[ts]
            p2[b, pad + vd] = vp
            if self.method.position_mode == "reindex":
                p2[b, pad:] = torch.arange(r["n"], device=dev) + p2[b, pad]
            new_org.append(origin[b][src])
            new_ent.append(entry[b][src])
        return h2, moved[-2], p2, new_layouts, new_org, new_ent, moved[-1]

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
        if gen_mask is None:  # generate() drops an all-ones mask; the pruned prompt may still have padding
            gen_mask = torch.ones(B, st.gen_len + q, dtype=torch.long, device=embeds.device)
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
            causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                        past_key_values=cache, position_ids=pos, layer_idx=seg.start)
            pe = lm.rotary_emb(h, position_ids=pos)
            for i in range(seg.start, bounds[s + 1]):
                h = lm.layers[i](h, attention_mask=causal, position_embeddings=pe,
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
    m = assign >= 0  # tokens merged somewhere; the others add zero (no data-dependent shapes)
    slot = assign.clamp(min=0)
    sums = torch.zeros(c, x.shape[1], device=x.device, dtype=torch.float32)
    counts = torch.zeros(c, device=x.device, dtype=torch.float32)
    if c:
        sums.index_add_(0, slot, xf * m[:, None])
        counts.index_add_(0, slot, m.float())
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

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

This file is the core (install / remove, ``forward``, the decode state; the stats and the phase clock of
``PrefillStats.timings`` are in :mod:`llava.stats`). The eager executor has two parts, each built here from what the
engine fixes at attach (:class:`llava.prefill.EngineEnv`, which the fast path reads too): steps 1-3 are planned on
the host by :class:`llava.layout.VisionStage` (``engine.vision``), step 4 and decode run in
:class:`llava.staged.StagedDecoder` (``engine.decoder``).
"""

from __future__ import annotations

import inspect
import logging
import time
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention_bias import check_attach, prompt_keys
from .attention_bias import install as install_bias
from .attention_bias import uninstall as uninstall_bias
from .decode import DecodeShape, MaskLayout
from .families import NEXT_LAYOUTS, FamilyAdapter, adapter_for, registry
from .layout import VisionStage
from .method import Method, get_method
from .needs import TowerCall
from .plan import PromptSpec
from .prefill import EngineEnv, VisionOut, _Prefill
from .selection import Selection
from .staged import StagedDecoder, _DecodeSegment
from .stats import PrefillStats, _PhaseClock
from .tp_shards import sharded_module

log = logging.getLogger(__name__)

@dataclass
class _State:
    orig_len: int  # padded prompt length as generate sees it
    llm_mask: torch.Tensor | None  # (B, L') prompt mask in LLM space
    pos_shift: torch.Tensor  # (B,) original position - LLM-space position, for decode
    segments: list[_DecodeSegment] | None  # None when the stock language model runs
    llm_len: int = 0  # padded prompt length in LLM space entering layer 0 (= layer 0's prompt part of the cache)
    #: (rows..., B) when generate passes no decode positions (M-RoPE): the first generated token's position
    #: minus ``llm_len``, so that a step's position is this + layer 0's cache length (no Python int involved)
    pos_base: torch.Tensor | None = None
    #: (segments, B, max_cache_len) the decode masks handed over by generate with a static cache when it
    #: passes no 2-D mask: the same every step, built once (see PruningEngine._generate_mask)
    dec_masks: torch.Tensor | None = None
    # No per-step counter lives here: a decode step may run inside transformers' compiled decode
    # (generate(cache_implementation="static")), where every Python int the traced code reads becomes a guard,
    # so a counter that changes per step would recompile the step every time. The tokens decoded so
    # far are read from the cache (a tensor in a static cache) and the masks have the cache's fixed width.
    fast: Any = None  # the fast path's decode state (llava.fast.path.FastState) after a fast prefill

    @property
    def shape(self) -> DecodeShape:
        """The decode step's shape (llava.decode.decode_step): the segments' first layers (none: the stock language
        model), 2-D padding masks."""
        return DecodeShape(tuple(seg.start for seg in self.segments or ()), MaskLayout.PADDING)


class HybridRefusal(ValueError):
    """A method that reads the attention of a hybrid model's linear-attention layer, refused at attach (the message
    names the layer and the model's full-attention layers)."""


class PruningEngine:
    """Applies one :class:`Method` to one loaded LLaVA-family model. Use :func:`attach`.

    The core: install / remove, ``forward`` (prefill or decode), the decode state, replayed selections.
    The vision stage (``vision``, :mod:`llava.layout`) and the decoder (``decoder``, staged or stock,
    :mod:`llava.staged`) are parts it holds."""

    def __init__(self, model: torch.nn.Module, method: Method, next_layout: str = "spatial_unpad",
                 prompt_spec: PromptSpec | None = None, family_options: dict | None = None,
                 fast: dict | None = None):
        self.model = model
        if next_layout not in NEXT_LAYOUTS:
            raise ValueError(f"next_layout must be one of {NEXT_LAYOUTS}, got {next_layout!r}")
        self.next_layout = next_layout
        #: what the core asks the model family (tower, packing, projector, positions)
        self.adapter: FamilyAdapter = adapter_for(model, next_layout=next_layout, **(family_options or {}))
        self.family = self.adapter.family
        self.method = method
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
        if not method.runs_on(self.family):
            raise ValueError(f"{method.name} does not support {self.family} models (it runs on "
                             f"{', '.join(method.families)}): {method.unsupported_reason}")
        self.lm = self.adapter.lm
        n_layers = len(self.lm.layers)
        method.setup(num_layers=n_layers, num_vision_layers=self.adapter.num_vision_layers, family=self.family)
        #: what the method asks of the engine, read once here (llava.needs.Needs)
        self.needs = needs = method.needs()
        if needs.pixel_stage:
            fam = registry.get(self.family)
            if not fam.pre_tower or self.adapter.pixel_norm is None:
                raise ValueError(f"{method.name}: its pre-tower stage (select_pixels) does not run on {fam.name} models: "
                                 f"{fam.pre_tower_reason}")
        check_attach(method.name, needs, self.adapter.lm, method.include_cls_candidates)
        if needs.attention_logits != "fp32" and not self.adapter.tower_logits:
            raise ValueError(f"{method.name}: the official tower attention arithmetic (vision_attention_logits="
                             f"{needs.attention_logits!r}) is computed for the CLIP towers only, not {self.family}")
        ks = needs.llm_layers
        if any(not (1 <= k < n_layers) for k in ks) or list(ks) != sorted(set(ks)):
            raise ValueError(f"{method.name}: llm stage layers {ks} must be ascending, in 1..{n_layers - 1}")
        self.llm_layers = ks
        sub = needs.llm_subblock_layers
        if sub and (not ks or any(not (0 <= i < ks[-1]) for i in sub)):
            raise ValueError(f"{method.name}: sub-block states of decoder layers {sub} are read by llm stages before "
                             f"layers {ks}: each must run before the last stage (0..{ks[-1] - 1 if ks else -1})")
        self._check_hybrid(method)
        self._check_grad(method)
        # "reindex" renumbers positions after an llm stage; M-RoPE positions have no contiguous count to
        # renumber (an image spans max(h, w) / 2 positions), so those families keep them (documented)
        reindex = needs.position_mode == "reindex" and not self.adapter.keeps_positions
        #: what both executors read of this engine (the captured one: self.fast, below), and the eager one's two parts
        self.env = EngineEnv(model=model, family=self.family, adapter=self.adapter, method=method, needs=needs,
                            tower=TowerCall.of(needs, method), prompt_spec=self.prompt_spec, reindex=reindex,
                            select=self._select)
        self.vision = VisionStage(self.env)
        self.decoder = StagedDecoder(self.env)
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
        self._bias = None  # the slot of the prompt's attention bias (llava.attention_bias), while installed
        self._orig_forward = None
        self._pruned_caches = weakref.WeakSet()  # caches a pruned prefill wrote (a 2nd turn on them is refused)
        #: the fast path (llava.fast.path.FastPath) when attached with ``fast=``; None = eager only
        self.fast = None
        if fast:
            from .fast.path import FastPath

            self.fast = FastPath(self.env, **fast)

    def _check_hybrid(self, method) -> None:
        """Refuse, with the reason, a method whose llm stage reads the attention of a decoder layer that has none
        (a linear-attention layer of a hybrid model such as Qwen3.5)."""
        linear = self.adapter.linear_layers
        if not linear:
            return
        full = [i for i in range(len(self.lm.layers)) if i not in linear]
        for layer in self.needs.probe_layers:
            if layer in linear:
                raise HybridRefusal(
                    f"{method.name}: its vision stage reads the attention of decoder layer {layer} (probe), a "
                    f"linear-attention (Gated DeltaNet) layer of this hybrid {self.family} model, which has no attention "
                    f"map; its full-attention layers are {full}")
        for k in self.llm_layers:
            for which in self.needs.llm_reads:
                layer = k - 1 if which == "prev" else k
                if layer in linear:
                    raise HybridRefusal(
                        f"{method.name}: its llm stage before decoder layer {k} reads the attention of layer {layer}, "
                        f"a linear-attention (Gated DeltaNet) layer of this hybrid {self.family} model, which has no "
                        f"attention map; its full-attention layers are {full}. Choose the stage layer so that the layer "
                        f"it reads is one of them (see the method's options), or use a pre-LLM method")

    def _check_grad(self, method) -> None:
        """Refuse, with the reason, a method that takes a gradient inside the prefill (``Method.llm_grad``) on a
        tensor-parallel model: DeepSpeed AutoTP's all-reduce linears are inference-only (no backward)."""
        if not self.needs.llm_grad or not self.llm_layers:
            return
        where = sharded_module([self.lm])
        if where is not None:
            raise ValueError(f"{method.name}: its llm stages take a gradient through a decoder layer, and this model's "
                             f"language model is sharded by tensor parallelism (DeepSpeed AutoTP, e.g. {where}), whose "
                             "all-reduce linears have no backward: run it without tensor parallelism (TP=1)")

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
        if self.needs.attention_bias:  # every decoder attention layer reads the prompt's bias while attached
            self._bias, self._bias_saved = install_bias(self.lm)
        orig_generate = self.model.generate

        def generate(model_self, *args, **kwargs):
            engine._state = None
            try:
                return orig_generate(*args, **kwargs)
            finally:
                engine._state = None

        # With a compilable (static) cache, generate() would turn the 2-D mask into a 4-D one for the
        # stock prompt length; the engine builds its own masks: at a decode step after a pruned prefill one
        # (B, max_cache_len) mask per segment of layers, outside the compiled step (see _generate_mask).
        def create_masks_for_generate(model_self, *args, attention_mask=None, past_key_values=None,
                                      inputs_embeds=None, **kwargs):
            return engine._generate_mask(attention_mask, past_key_values, inputs_embeds)

        self.model.create_masks_for_generate = types.MethodType(create_masks_for_generate, self.model)
        generate.__signature__ = inspect.signature(orig_generate)
        generate.__doc__ = orig_generate.__doc__
        self.model.generate = types.MethodType(generate, self.model)
        self.model._pruning_engine = self
        return self

    def remove(self) -> None:
        for attr in ("forward", "generate", "create_masks_for_generate", "_pruning_engine"):
            self.model.__dict__.pop(attr, None)
        if self._bias is not None:
            uninstall_bias(self._bias_saved)
            self._bias = None

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
            if self._bias is not None:
                self._bias.set(None)
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
            reason = ""
            if self.fast is not None:
                out, reason = self._fast_prefill(input_ids, attention_mask, visual, position_ids)
                if out is not None:
                    if past_key_values is not None:  # generate() continues on the fast path's static cache
                        self._pruned_caches.add(past_key_values)
                    self._pruned_caches.add(out.past_key_values)
                    return out
            ctx = _Prefill(clock=_PhaseClock(input_ids.device, self.clock), sample_keys=self.sample_keys)
            ctx.clock.mark("start")
            embeds, mask, pos, info = self.vision.run(ctx, input_ids, visual, attention_mask, position_ids)
            self.sample_keys = None  # consumed by this prefill
            # the decode state: generate's original-space mask / positions are mapped onto these rows
            self._state = _State(orig_len=input_ids.shape[1], llm_mask=mask, pos_shift=info.pos_shift,
                                 segments=None, llm_len=embeds.shape[1], pos_base=self._decode_pos_base(pos))
            if self._bias is not None:  # the method's bias on these rows, read by every attention layer (none when
                self._bias.set(None if all(info.noop) else self.method.attention_bias(prompt_keys(  # nothing pruned)
                    embeds, mask, pos, info.layouts, info.sizes, info.noop, self.lm, self._bias.inv_freq,
                    input_ids.shape[1])))
            ctx.clock.mark("inputs_end")
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.lm.config)
            if past_key_values is not None:
                self._pruned_caches.add(past_key_values)
            hidden, plan, segments = self.decoder.prefill(ctx, embeds, mask, pos, past_key_values, use_cache, info,
                                                          **kwargs)
            self._state.segments = segments
            if self._bias is not None:
                self._bias.decoding()
            ctx.clock.mark("end")
            self.prefills += 1
            ctx.release()  # nothing outlives it
            self.stats = PrefillStats.of(plan, noop=info.noop, path_reason=reason,
                                         timings=ctx.clock.timings())  # resolved once, here (on CUDA: one sync)
        elif self._state.fast is not None:  # a decode step after a fast prefill: one graph
            if input_ids is None:
                raise ValueError("the fast path decodes from input_ids")
            return CausalLMOutputWithPast(logits=self.fast.decode(self._state.fast, input_ids),
                                          past_key_values=self._state.fast.cache)
        else:
            if input_ids is not None and inputs_embeds is None:
                inputs_embeds = self.lm.embed_tokens(input_ids)
            position_ids = self.adapter.decode_positions(position_ids)
            hidden = self.decoder.decode(self._state, inputs_embeds, attention_mask, position_ids, past_key_values,
                                         use_cache, **kwargs)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.model.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values if use_cache else None)

    def vision_inputs(self, input_ids: torch.Tensor, visual: dict, attention_mask: torch.Tensor | None = None):
        """The vision stage alone, for a host that runs its own decoder (the vLLM plugin,
        ``integrations/vllm``): the LLM's prefill inputs after the method's vision stage, exactly as a prefill
        hands them to the decoder (embeds (B, L', D), mask, positions; the kept / merged visual rows in the
        placeholders' place), and ``info`` (:class:`llava.prefill.VisionOut`). The method's selections are in
        :attr:`selections` as after a prefill. Nothing is cached and no decode state is kept; the eager
        engine runs (the fast path's captured prefill includes the decoder). Methods with llm stages are the
        caller's to refuse: their stages run inside the decoder."""
        visual = {k: v for k, v in visual.items() if k in self.adapter.visual_keys}
        if not any(visual.get(k) is not None for k in self.adapter.pixel_keys):
            raise ValueError("vision_inputs needs the visual inputs (pixel_values / pixel_values_videos)")
        ctx = _Prefill(clock=_PhaseClock(input_ids.device, self.clock), sample_keys=self.sample_keys)
        ctx.clock.mark("start")
        try:
            embeds, mask, pos, info = self.vision.run(ctx, input_ids, visual, attention_mask, None)
            self.sample_keys = None  # consumed by this call
        finally:  # nothing outlives the call
            ctx.release()
        return embeds, mask, pos, info

    def visual_runs(self, input_ids: torch.Tensor, info: VisionOut,
                    attention_mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, list[int]]]:
        """Per sample of a :meth:`vision_inputs` call: its kept visual rows in the pruned row and the kept count of
        each placeholder run of ``input_ids`` (:func:`llava.runs.visual_runs`)."""
        from .runs import visual_runs

        return visual_runs(self.adapter.config, input_ids, info, attention_mask)

    def _fast_prefill(self, input_ids, attention_mask, visual, position_ids):
        """The prefill on the fast path: (output, "") or (None, why it runs eagerly); the caller's ``position_ids``
        are honoured (none: the stock default, as the eager executor)."""
        from .fast.refusals import NotPlanned

        reason = self.fast.refusal_for(input_ids, visual, self.replay)
        if reason:
            return None, reason
        t0 = time.perf_counter()
        try:
            logits, cache, fstate, info = self.fast.prefill(input_ids, attention_mask, visual, position_ids,
                                                            stock_default=True, sample_keys=self.sample_keys)
        except NotPlanned as e:
            return None, str(e)
        self.sample_keys = None  # consumed by this prefill
        B, L = input_ids.shape
        self._state = _State(orig_len=L, llm_mask=None, pos_shift=torch.zeros(B, dtype=torch.long, device=input_ids.device),
                             segments=None, fast=fstate)
        self.prefills += 1
        self.stats = PrefillStats.of(info.plan, timings={**info.timings, "prefill_total": time.perf_counter() - t0},
                                     path="fast", bucket=info.bucket, new_graph=info.new_graph, graphs=info.graphs)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache), ""

    # ------------------------------------------------------------------ decode state, sample keys, replay
    def _generate_mask(self, attention_mask, cache, inputs_embeds):
        """The mask generate() hands to a step when its cache is compilable (static); called outside the
        compiled step, from ``prepare_inputs_for_generation``. At a decode step after an eager pruned
        prefill: a (segments, B, max_cache_len) tensor, per segment of layers (one without llm stages) the
        LLM-space prompt mask of that segment's cache, generate's generated columns, zeros up to the cache's
        width; all ones after the prompt when generate passed no mask (then the same every step: built once).
        One shape for the whole decode and no prompt length on the traced path, so a compiled decode step
        compiles once (generate's 2-D mask grows one column per step). Slots after the query's are
        hidden by the causal mask. Any other call (prefill, dynamic cache, fast path, a cache too short):
        the mask unchanged."""
        st = self._state
        if (st is None or st.fast is not None or cache is None or not getattr(cache, "is_compileable", False)
                or not getattr(cache, "layers", None) or (attention_mask is not None and attention_mask.ndim != 2)):
            return attention_mask
        width = max(layer.get_max_length() for layer in cache.layers)
        if attention_mask is None and st.dec_masks is not None and st.dec_masks.shape[-1] == width:
            return st.dec_masks
        prompts = [seg.mask for seg in st.segments] if st.segments else [st.llm_mask]
        gen = attention_mask[:, st.orig_len:] if attention_mask is not None else None
        rows = []
        for p in prompts:
            if p is None:  # the stock prompt without a mask (nothing pruned): all real
                p = torch.ones(inputs_embeds.shape[0], st.llm_len, dtype=torch.long, device=inputs_embeds.device)
            free = width - p.shape[1]  # slots of this segment's cache after its prompt
            if gen is None:
                g = torch.ones(p.shape[0], free, dtype=torch.long, device=p.device)
            elif gen.shape[1] <= free:
                g = torch.nn.functional.pad(gen.to(device=p.device, dtype=torch.long), (0, free - gen.shape[1]))
            else:  # more tokens than the cache holds: let the cache say so
                return attention_mask
            rows.append(torch.cat([p.to(torch.long), g], 1))
        masks = torch.stack(rows)
        if attention_mask is None:
            st.dec_masks = masks
        return masks

    def _decode_pos_base(self, pos):
        """(rows..., B) for families whose positions are not a contiguous count (M-RoPE), whose decode steps
        may come without positions: the first generated token's position (the last prompt token's + 1;
        rows are left-padded, so the last column is real) minus the LLM-space prompt length, so that a
        step's position is this + layer 0's cache length. None for 1-D families (they continue after the
        cache)."""
        if pos is None or not (self.adapter.keeps_positions or self.needs.vision_positions == "keep"):
            return None
        return pos[..., -1] + 1 - pos.shape[-1]

    def _select(self, key, ask):
        if self.replay:
            if key not in self.selections:
                raise RuntimeError(f"replay: no recorded selection for {key}; run a prefill with replay=False first")
            return self.selections[key]
        sel = ask()
        self.selections[key] = sel
        return sel


def attach(model: torch.nn.Module, method: str | Method = "none", budget: int | None = None, *,
           next_layout: str = "spatial_unpad", prompt_spec: PromptSpec | None = None,
           family_options: dict | None = None, fast: dict | None = None, **options) -> PruningEngine:
    """Apply ``method`` with ``budget`` to ``model``; afterwards ``model.generate()`` / ``model()`` prune.

    ``family_options`` go to the model family's adapter (e.g. ``{"qwen_saliency": "pooled_query"}``);
    ``fast`` (e.g. ``{"backend": "auto", "max_new_tokens": 256}``) adds the fast path (:mod:`llava.fast.path`);
    ``options`` to the method. Returns the engine (``engine.stats`` holds the last prefill's token
    accounting and timings; ``engine.remove()`` restores the model). Attaching again replaces the
    previous method.
    """
    m = get_method(method, budget, **options)
    return PruningEngine(model, m, next_layout=next_layout, prompt_spec=prompt_spec,
                         family_options=family_options, fast=fast).install()

"""The fast path: a pruned prefill planned on the host, then run as one static-shape function per
length bucket (captured: ``torch.compile(fullgraph=True)``, CUDA graphs on a GPU), and a decode step
with one graph.

Why: at batch 1 on a current GPU a 7B prefill is bound by kernel launches, not FLOPs, so the eager
engine's pruned prefill is *slower* than the unpruned one (docs/results/efficiency-h100.md). Here
everything that depends on the prompt is decided on the host first, from the host copy of the ids,
and handed to the captured function as index tensors:

``tower`` (device, started before most of the plan)
    the host ids read once, the family's visual layout planned (:meth:`plan_tower`), the tower run as a captured
    function of its own (the family adapter's static-shape run of its plan, ``encode_static``: e.g. the CLIP tower
    with the projector and the [CLS] signals the method reads): the device runs it while the host plans the rest
    (1-3 ms of host work a prefill on the GPUs measured, which the device otherwise waited for); a piecewise prefill
    runs its tower inside graph 1;
``plan`` (host, no device op)
    the placeholder run of every row, the unit layouts (:class:`llava.ops.UnitLayout`) and the
    method's host draws (:meth:`Method.plan_vision`, e.g. random's picks), the number of outputs of the
    selection (from a dry run of the method on ``meta`` tensors, once per unit signature), the length
    bucket, the new row of every sample ([pad, text before, outputs, text after], left-padded to the
    bucket), its positions and its pad rows (the 4-D mask against a :class:`~transformers.StaticCache` is built
    from them on the device);
``prefill`` (device, static shapes, no host read)
    the tower's outputs -> the method's selection (``sig.captured``) ->
    merges -> one gather into the bucket -> the language model into the static cache (with llm stages:
    segment by segment, each stage's rows laid out by a planned gather, :mod:`llava.fast.llm`; its attention
    over the bucket the 4-D mask or SDPA's causal kernel on rolled rows, :mod:`llava.fast.attention`) -> the
    last row's logits, and one validity flag of every selection (read once, after the prefill); an in-tower
    stage (FlowCut) runs the CLIP tower masked (:func:`llava.families.clip.run_tower_masked`: every unit at its
    full token count, the survivors a device mask, each layer's attention masked to them, the method's
    ``select_tower_masked``), its final count per unit planned on the host;
``probe`` (a vision stage that reads the LLM's attention on the unpruned prompt: ConsensusDrop's ``probe_mode="attn"``)
    the unpruned rows planned in their own bucket, decoder layers 0..K-1 run on them inside the same captured
    prefill, layer K's rows of the padded text block handed to the selection (:mod:`llava.fast.probe`);
``piecewise`` (a vision stage whose output count depends on the image: ``capture_kind() == "piecewise"``)
    graph 1 = the tower, signals and the selection padded to a static size, its real count on the device
    (``Selection.count``) -> one host read of the counts -> the host plans the rows from them (the same
    :meth:`plan_rows`) -> graph 2 = the gather and the language model in the bucket the counts pick. Graph 1
    is keyed by the sample structure, graph 2 by the bucket: a new count compiles nothing;
``decode`` (device, one graph for every step)
    one token against a mask of fixed width ``max_cache_len`` per segment of layers, updated in place,
    positions continuing after each row's last prompt position (per segment): the eager engine's decode step
    (:func:`llava.decode.decode_step`) on slot masks (``MaskLayout.SLOTS``).

Scope (everything else runs on the eager engine, and ``engine.stats.path`` / ``.path_reason`` say
why): the families whose record says ``fast`` (:mod:`llava.families.registry`; every built-in family): LLaVA-1.5,
LLaVA-NeXT (anyres crops, one unit per crop, newline tokens), Video-LLaVA (images; videos of 8 frames, one unit per
frame), Qwen2-VL and Qwen2.5-VL (images; videos, one unit per temporal slice), Qwen3-VL (images; its DeepStack rows
follow the kept tokens), LLaVA-OneVision (images: anyres_max_9 packed inside the captured function from a host plan
of ``image_sizes``; videos), InternVL (images: a unit per tile, each prompt's tiles counted from its host ids) and
Qwen3.5 (its hybrid decoder's Gated DeltaNet states in the static cache, a mask per layer type: pre-LLM methods),
with exactly one image or one video per prompt, laid out by the family adapter's
:meth:`~llava.families.base.FamilyAdapter.visual_layout`; methods that declare ``capturable = "full"`` or
``"piecewise"`` (:attr:`llava.method.Method.capturable`; piecewise: a vision stage only, not query-aware, not
on M-RoPE families); no replay.
The Qwen towers run inside the captured function with every grid-dependent index planned on the host
(:meth:`~llava.families.base.FamilyAdapter.encode_static`, :func:`llava.families.qwen_vision.run_static`);
their 3-D M-RoPE positions are the eager engine's (the model's own ``get_rope_index`` on the host ids,
:meth:`~llava.families.base.FamilyAdapter.rope_positions` on the host copies): the text rows keep theirs, each visual
output takes its source candidate's inside the graph, decoding continues at the last prompt position + 1 on all
three axes.
Greedy tokens equal the eager engine's; logits may differ in the last bits (the bucket's padding
changes GEMM shapes). A graph is keyed by the bucket, the batch and every sample's visual structure:
LLaVA-1.5 and Video-LLaVA have one structure, LLaVA-NeXT one per crop grid and unpadded layout (image
aspect ratio; the ``spatial`` layout: one per grid), the Qwen models one per set of image grids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import attention as fast_attention
from ..decode import DecodeShape, MaskLayout, decode_step
from ..families import registry
from ..families.base import to_device
from ..plan import PrefillPlan
from ..prefill import EngineEnv
from ..selection_rows import DeepStack
from .inputs import PrefillInputs
from .llm import Entry, prompt_mask, run_segments
from .compile import REGIONAL_BACKENDS, add_cache_slots, layer_lists, mark_regions, use_cache_dir, vec_isa
from .precompile import compile_function, precompile_folder, wanted as precompile_wanted
from .plan import BUCKETS, DECODE_STEP, TEXT_BUCKETS, HostPlanner, _Spec, bucket_for
from .refusals import REPLAY, captured_refusal
from .vision import CapturedVision

__all__ = ["BUCKETS", "TEXT_BUCKETS", "DECODE_STEP", "BACKENDS", "bucket_for",
           "FastPath", "FastState", "FastInfo"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "inductor", "cudagraphs", "eager", "aot_eager", "none")


@dataclass
class FastState:
    """Decode state of a fast prefill (lives on ``engine._state.fast``)."""

    cache: object
    mask: torch.Tensor  # (S, B, 1, 1, C) bool per segment of layers, slots the next token may see (in place)
    next_pos: torch.Tensor  # (S, B, 1) per segment, position of the first generated token ((S, 3, B, 1) M-RoPE)
    buckets: torch.Tensor  # (S,) per segment, the slot of the first generated token
    shape: DecodeShape  # the decode step's (llava.decode): the segments' first layers (S > 1), slot masks
    room: int  # generated tokens the cache holds
    step: int = 0


@dataclass
class FastInfo:
    """Which path one prefill took, for ``PrefillStats``."""

    path: str  # "fast" or "eager"
    reason: str = ""  # why eager
    bucket: int | None = None
    cache_len: int | None = None
    new_graph: bool = False  # this prefill's bucket / signature had not run before (compile / capture)
    timings: dict = field(default_factory=dict)
    plan: PrefillPlan | None = None  # what the prefill ran, segment by segment of decoder layers
    graphs: int = 2  # captured functions the prefill ran: the tower, then the rest (piecewise: graph 1, a host
    # read of the counts, graph 2)


def _upload(host, dev):
    """Host tensors on ``dev``, in the same structure (a pytree: a record of tensors, dicts, tuples, ...): the
    index (long) tensors in one copy, the others (float, bool) each."""
    leaves, tree = tree_flatten(host)
    at = [i for i, t in enumerate(leaves) if t is not None and t.dtype == torch.long]
    moved = [t if t is None or t.dtype == torch.long else t.to(dev, non_blocking=True) for t in leaves]
    for i, t in zip(at, to_device([leaves[i] for i in at], dev)):
        moved[i] = t
    return tree_unflatten(moved, tree)


class FastPath:
    """The fast path of one :class:`llava.engine.PruningEngine` (``engine.fast``): its host planner
    (:class:`llava.fast.plan.HostPlanner`), the captured vision stage (:class:`llava.fast.vision.CapturedVision`) and
    the compiled functions of a prefill and a decode step."""

    def __init__(self, env: EngineEnv, backend: str = "auto", max_new_tokens: int = 256, buckets=BUCKETS,
                 regional: bool = True, cache: str | None = None, attention: str = "auto",
                 precompile: bool | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"fast backend must be one of {BACKENDS}, got {backend!r}")
        fast_attention.wants(attention, 0, torch.device("cpu"))  # a bad choice: one clear error now
        self.attention = attention  # the prompt's attention: the causal kernel over the bucket or the 4-D mask
        if attention != "masked":
            fast_attention.install()
        self.env = env  # what it reads of the attached engine (llava.prefill.EngineEnv)
        # the host plan of every prefill: the length buckets, the decode slots, whether the vision stage is piecewise
        self.planner = HostPlanner(env, tuple(buckets), int(max_new_tokens), env.needs.capture_kind == "piecewise")
        dev = next(env.model.parameters()).device
        if backend == "auto":
            backend = "inductor" if dev.type == "cuda" else "eager"
        self.backend = backend
        self.cuda_graphs = dev.type == "cuda" and backend in ("inductor", "cudagraphs")
        # each repeated layer class traced and compiled once (llava.fast.compile): compile time flat in depth
        self.regional = bool(regional) and backend in REGIONAL_BACKENDS
        # Inductor's compile cache in a folder reused across processes (fast_cache= / VTPRUNE_COMPILE_CACHE, else
        # ~/.cache/vtprune/compile)
        self.cache_dir = use_cache_dir(cache) if backend in ("inductor", "aot_eager") else None
        if backend == "inductor" and dev.type == "cpu":  # Inductor's CPU vector-ISA check (~1 s a process), its
            vec_isa()  # verdicts kept in its cache folder under what they depend on (llava.fast.compile.vec_isa)
        # each function saved / loaded ahead of time (llava.fast.precompile): a later process traces nothing; None
        # when not requested, or on a torch without the capture (one warning; the regular compile)
        self.precompile_requested = precompile_wanted(precompile)
        self.precompile = precompile_folder(precompile, backend, self.cache_dir, self.regional)
        self._pool = None  # cudagraphs: one CUDA-graph memory pool for the four functions
        self.cudagraph_skips: list = []  # Inductor + CUDA graphs: the functions it did not capture, and why
        self._tower = self._compile(self._tower_fn)  # a prefill: the tower, then the rest (the host plans between)
        self._prefill = self._compile(self._prefill_fn)
        self._vision = self._compile(self._vision_fn)  # a piecewise prefill: graph 1
        self._llm = self._compile(self._llm_fn)  # and graph 2
        self._decode = self._compile(self._decode_fn)
        self._caches: dict = {}  # (B, C, dtype) -> StaticCache
        self._seen: set = set()  # graph keys run so far
        self.visual = CapturedVision(self.planner)
        self.refusal = captured_refusal(env.needs, registry.get(env.family), env.adapter,
                                        self._decoder_attention())
        if not self.refusal:  # transformers installs its output-capturing hooks under a lock on first use:
            from transformers.utils.output_capturing import maybe_install_capturing_hooks  # not traceable

            towers = {id(t): t for t in (env.adapter.tower_for(k) for k in env.adapter.pixel_keys)}
            for mod in (*towers.values(), env.lm):
                maybe_install_capturing_hooks(mod)
            if self.regional:  # a hybrid decoder (Qwen3.5): its towers only (linear layers keep other cache states)
                mark_regions(layer_lists(env.lm, towers.values()), decoder=not env.adapter.linear_layers)

    def _compile(self, fn):  # the backend's wrapper of fn (llava.fast.precompile.compile_function)
        return compile_function(self, fn, log)

    # ------------------------------------------------------------------ refusals
    def refusal_for(self, input_ids, visual: dict, replay: bool = False) -> str | None:
        """Why this prefill must run eagerly (None: it may take the fast path; the plan may still find
        that the prompt does not fit, :class:`llava.fast.refusals.NotPlanned`)."""
        if self.refusal:
            return self.refusal
        return REPLAY if replay else None

    # ------------------------------------------------------------------ the captured functions
    def _tower_fn(self, px, spec, tower_in=None) -> dict:
        """The tower of a prefill (:meth:`CapturedVision.run_tower`), a function of its own: it runs while the
        host plans the rest of the prefill, whose function takes its outputs."""
        return self.visual.run_tower(px, spec, tower_in)

    def _prefill_fn(self, tower_out: dict, plan_in: PrefillInputs, cache, spec: _Spec):
        """The rest of a one-graph prefill from the tower function's outputs (:meth:`_tower_fn`): the selection,
        the new rows, the language model into the static cache; the last rows' logits and the validity flag.
        ``plan_in``: the plan's tensors on the device (:class:`llava.fast.inputs.PrefillInputs`)."""
        e = self.env
        tok, src, pos = plan_in.tok, plan_in.src, plan_in.pos
        mask = prompt_mask(plan_in.pad, spec.bucket, spec.cache_len)  # (B, 1, bucket, cache) from the pads
        emb = e.lm.embed_tokens(tok)
        deeps = [] if spec.deepstack else None
        outs, sigs, origins, _, bad = self.visual.visual_outputs(None, plan_in.index, spec, emb.dtype,
                                                                 emb.reshape(-1, emb.shape[-1]), None, deeps,
                                                                 plan_in.probe, tower_out)
        rows = torch.cat([emb.reshape(-1, emb.shape[-1])] + outs)[src].view(emb.shape)
        if spec.mrope:  # kept tokens keep their positions: each output's from its source candidate (M-RoPE)
            R, at, vp = pos.shape[0], 0, []
            for s, o in zip(spec.samples, origins):
                vp.append(plan_in.vpos[:, at:at + s.tokens][:, o])
                at += s.tokens
            pos = torch.cat([pos.reshape(R, -1)] + vp, 1)[:, src].view(pos.shape)
        if len(spec.segments) > 1 or spec.deepstack:  # the decoder segment by segment, the llm stages between
            vis0, stages = [], []  # (llava.fast.llm)
            if len(spec.segments) > 1:
                stages = plan_in.stages
                vis0 = list(plan_in.visual0.split([s.outputs for s in spec.samples]))
            ds = DeepStack(torch.cat(deeps), plan_in.ds_at) if spec.deepstack else None  # Qwen3-VL's
            entry = Entry(rows=rows, pos=pos, mask=mask, visual0=vis0, vision=sigs, origins=origins, ds=ds)
            h, bad = run_segments(e, entry, cache, spec.segments, spec.texts, stages, bad, self._attn)
            return e.model.lm_head(h), bad
        h = e.lm(inputs_embeds=rows, attention_mask=self._lm_mask(mask), position_ids=pos, past_key_values=cache,
                 use_cache=True, **self._attn(rows)).last_hidden_state
        return e.model.lm_head(h[:, -1:]), bad

    def _attn(self, rows) -> dict:
        """The decoder's keyword for a prompt bucket of ``rows`` (B, L, D): the causal kernel where
        ``fast_attention`` asks for it (:mod:`llava.fast.attention`; a decoder on SDPA only: the keyword is read by
        the wrapped ``sdpa`` function, never handed to another), else none (the 4-D mask)."""
        sdpa = self._decoder_attention() == "sdpa"
        return {fast_attention.KW: True} if sdpa and fast_attention.wants(self.attention, rows.shape[1],
                                                                          rows.device) else {}

    @property
    def buckets(self) -> tuple:
        """The prefill lengths the captured functions are compiled for (the planner's)."""
        return self.planner.buckets

    @property
    def max_new_tokens(self) -> int:
        """The generated tokens the static cache holds (the planner's)."""
        return self.planner.max_new_tokens

    @property
    def piecewise(self) -> bool:
        """The method's vision stage gives a count that depends on the image: graph 1, a read, graph 2."""
        return self.planner.piecewise

    def _decoder_attention(self) -> str | None:
        """The decoder's attention implementation (transformers' ``_attn_implementation``)."""
        return getattr(self.env.lm.config, "_attn_implementation", None)

    def _lm_mask(self, mask):
        """The language model's mask for a 4-D prompt mask: itself, or for a hybrid decoder (Qwen3.5) one per layer
        type - the 4-D mask for the full-attention layers and, for the Gated DeltaNet layers, the 2-D padding mask of
        the prompt (the real rows: what the last row may see; pads zeroed before their recurrence, as the stock model
        does). A decode step's: :func:`llava.decode.decode_step` (``MaskLayout.SLOTS``)."""
        if not self.env.adapter.linear_layers:
            return mask
        return {"full_attention": mask, "linear_attention": mask[:, 0, -1, :mask.shape[2]]}

    def _vision_fn(self, px, index, spec: _Spec, tower_in=None):
        """Graph 1 of a piecewise prefill: every sample's padded outputs (one buffer, sample after sample),
        their real counts (B,) and the validity flag, on the device."""
        dtype = self.env.lm.embed_tokens.weight.dtype
        outs, _, _, counts, bad = self.visual.visual_outputs(px, index, spec, dtype, None, tower_in)
        return torch.cat(outs), torch.stack(counts), bad

    def _llm_fn(self, tok, buf, src, pos, pad, cache, cache_len: int):
        """Graph 2 of a piecewise prefill: the new rows gathered from the text and the padded outputs
        (``src`` planned on the host from the counts), the language model into the static cache."""
        e = self.env
        mask = prompt_mask(pad, tok.shape[1], cache_len)
        emb = e.lm.embed_tokens(tok)
        rows = torch.cat([emb.reshape(-1, emb.shape[-1]), buf])[src].view(emb.shape)
        h = e.lm(inputs_embeds=rows, attention_mask=self._lm_mask(mask), position_ids=pos, past_key_values=cache,
                 use_cache=True, **self._attn(rows)).last_hidden_state
        return e.model.lm_head(h[:, -1:])

    def _decode_fn(self, tok, pos, mask, cache, shape: DecodeShape):
        """The captured decode step: the one decode step (:func:`llava.decode.decode_step`) on the token ids ``tok``
        (B, 1), with ``pos`` (S, B, 1) / ``mask`` (S, B, 1, 1, C) a row per segment of ``shape``; the logits."""
        e = self.env
        return e.model.lm_head(decode_step(e.lm, e.adapter, shape, e.lm.embed_tokens(tok), mask, pos, cache))

    # ------------------------------------------------------------------ entry points
    def _cache(self, B: int, C: int, dtype, dev):
        from transformers.cache_utils import StaticCache

        key = (B, C, dtype, str(dev))
        cache = self._caches.get(key)
        if cache is None:
            lm_cfg = self.env.lm.config
            cache = StaticCache(config=lm_cfg, max_cache_len=C)
            heads = lm_cfg.num_key_value_heads
            hd = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
            cache.early_initialization(B, heads, hd, dtype, dev)
            self._init_linear_states(cache, B, dtype, dev)
            if self.regional and not self.env.adapter.linear_layers:  # each decoder layer's region gets its
                add_cache_slots(cache)  # cache layer as a module (llava.fast.compile); a hybrid decoder is unmarked
            if self.backend == "cudagraphs":  # a recorded graph writes into its cache's tensors: keep each shape's
                self._caches[key] = cache  # (a new object would be a new graph at every change of shape)
            else:
                self._caches = {key: cache}  # one cache at a time: the last shape's
        lengths = []  # a new prompt: slots are rewritten; stale ones stay masked
        for layer in cache.layers:
            if hasattr(layer, "recurrent_states"):  # a Gated DeltaNet layer: its states zeroed, "no previous state"
                layer.reset()
            else:
                lengths.append(layer.cumulative_length)
        if lengths:  # one kernel on a GPU, not one per layer (32 launches before the prefill)
            torch._foreach_zero_(lengths)
        return cache

    def _init_linear_states(self, cache, B: int, dtype, dev):
        """A hybrid decoder's linear-attention layers (Qwen3.5's Gated DeltaNet) get their conv and recurrent states
        allocated before the first prefill (transformers allocates them lazily inside the first forward, which a
        captured graph must not do): conv (B, conv channels, kernel) in the model dtype, recurrent (B, value heads,
        key dim, value dim) in fp32 (the dtype the stock recurrence returns)."""
        for i, layer in enumerate(cache.layers):
            if not hasattr(layer, "recurrent_states"):
                continue
            mod = self.env.lm.layers[i].linear_attn
            conv = mod.conv1d.weight
            layer.lazy_initialization(
                conv_states=torch.zeros(B, conv.shape[0], mod.conv_kernel_size, dtype=dtype, device=dev),
                recurrent_states=torch.zeros(B, mod.num_v_heads, mod.head_k_dim, mod.head_v_dim, dtype=torch.float32,
                                             device=dev))

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, visual: dict, position_ids=None, stock_default: bool = False,
                sample_keys: list | None = None):
        """Run one prefill on the fast path: (logits (B, 1, V), cache, FastState, FastInfo (its ``plan``: the
        host plan's :class:`llava.plan.PrefillPlan`)); ``position_ids`` (the caller's), ``stock_default`` and
        ``sample_keys`` as for :meth:`HostPlanner.plan_tower`. Raises :class:`llava.fast.refusals.NotPlanned` when the
        prompt does not fit (nothing ran yet, or only the tower, whose outputs are then dropped: the eager engine
        runs the prefill from the start)."""
        t0 = time.perf_counter()
        dev = input_ids.device
        emb_dtype = self.env.lm.embed_tokens.weight.dtype
        tp = self.planner.plan_tower(input_ids, attention_mask, visual, position_ids, stock_default, sample_keys)
        px = visual[tp.spec.key]
        timings, tower_out = {}, None
        if not self.piecewise:  # the tower first, from what it needs of the plan: the host plans the rest while
            fv = tp.fv  # the device runs it (a GPU waited for the whole plan, 1-3 ms a prefill, before it)
            tower = dict(fv.tower_tensors or {})  # the tower plan's tensors by name
            moved = _upload(tower, dev)
            tkey = ("tower", tp.spec, px.shape, px.dtype, tuple((k, tuple(v.shape)) for k, v in sorted(tower.items())))
            new = tkey not in self._seen
            self._seen.add(tkey)
            t_launch = time.perf_counter()
            tower_out = self._tower(px, tp.spec, moved or None)
            new = new or getattr(self._tower, "last_new", False)
            if self.cuda_graphs and self.backend == "inductor":  # in the CUDA-graph pool: the prefill's graph may
                tower_out = {k: v.clone() for k, v in tower_out.items()}  # overwrite it (as a piecewise graph 1's)
            timings["plan"] = timings["plan_exposed"] = t_launch - t0  # exposed: before the device has work
            t0 = time.perf_counter()
        vp = self.planner.plan_visual(input_ids, attention_mask, visual, tp)
        if self.piecewise:  # graph 1 -> one read of the counts -> the host plans the rows -> graph 2
            index, tower = _upload((vp.index, dict(tp.fv.tower_tensors or {})), dev)  # the tower's, as the one graph's
            vkey = ("vision", vp.spec, px.shape, px.dtype)
            new = vkey not in self._seen
            self._seen.add(vkey)
            timings["plan"] = time.perf_counter() - t0
            buf, counts_d, bad = self._vision(px, index, vp.spec, tower or None)
            new = new or getattr(self._vision, "last_new", False)  # cudagraphs: a warm-up or a capture
            if self.cuda_graphs and self.backend == "inductor":  # graph 1's outputs live in the CUDA-graph pool,
                buf = buf.clone()  # which graph 2 (a new run of the tree) may overwrite before it reads them; the
                # cudagraphs backend returns clones already
            got = torch.cat([counts_d, bad.long()[None]]).tolist()  # the one host decision
            counts, bad = got[:-1], bool(got[-1])
            t1 = time.perf_counter()
            timings["decide"] = t1 - t0 - timings["plan"]
            if bad:
                self._malformed()
            spec, host, plan, nxt = self.planner.plan_rows(vp, counts)
            tok, src, pos, pad = to_device([host.tok, host.src, host.pos, host.pad], dev)
            cache = self._cache(spec.batch, spec.cache_len, emb_dtype, dev)
            lkey = ("llm", spec.batch, spec.bucket, spec.cache_len, tuple(buf.shape))
            new = new or lkey not in self._seen
            self._seen.add(lkey)
            timings["plan"] += time.perf_counter() - t1
            timings["plan_exposed"] = timings["plan"]  # both halves: the device waits for each
            logits = self._llm(tok, buf, src, pos, pad, cache, spec.cache_len)
            new = new or getattr(self._llm, "last_new", False)
        else:
            spec, host, plan, nxt = self.planner.plan_rows(vp)
            moved = _upload(host, dev)
            cache = self._cache(spec.batch, spec.cache_len, emb_dtype, dev)
            key = (spec, px.shape, px.dtype)
            new = new or key not in self._seen
            self._seen.add(key)
            timings["plan"] += time.perf_counter() - t0
            logits, bad = self._prefill(tower_out, moved, cache, spec)
            new = new or getattr(self._prefill, "last_new", False)
        S = len(plan.segments)
        dec_mask = torch.zeros(S, spec.batch, 1, 1, spec.cache_len, dtype=torch.bool)
        for s, seg in enumerate(plan.segments):  # each segment's cache: its rows, left-padded to its bucket
            for b, n in enumerate(seg.rows):
                dec_mask[s, b, 0, 0, seg.width - n:seg.width] = True
        # decode positions: "keep" continues after the prompt's last position (M-RoPE: the unpruned prompt's,
        # on every row, as generate() does), "reindex" after each segment's own length (the eager engine's
        # per-segment shift)
        if self.env.reindex:
            nxt = torch.tensor([seg.rows for seg in plan.segments], dtype=torch.long) + vp.first
        else:
            nxt = nxt[None].expand(S, *nxt.shape)
        d_mask, d_pos, d_buckets = to_device([dec_mask, nxt[..., None],
                                              torch.tensor([seg.width for seg in plan.segments])], dev)
        starts = tuple(seg.layers.start for seg in plan.segments) if S > 1 else ()  # one segment: the stock model
        state = FastState(cache=cache, mask=d_mask, next_pos=d_pos, buckets=d_buckets,
                          shape=DecodeShape(starts, MaskLayout.SLOTS), room=spec.cache_len - spec.bucket)
        info = FastInfo(path="fast", bucket=spec.bucket, cache_len=spec.cache_len, new_graph=new,
                        timings=timings, plan=plan, graphs=2)
        if not self.piecewise and bool(bad):  # the one read after the prefill (generate reads the first token
            self._malformed()  # anyway), after the decode state's host work: that ran while the device computed
        return logits, cache, state, info

    def _malformed(self):
        raise ValueError(f"{self.env.method.name} returned a malformed selection (indices out of range, a token "
                         "kept twice, a bad order / assign / count, or a newline merged in vision space)")

    @torch.no_grad()
    def decode(self, st: FastState, input_ids):
        """One decode step of a fast prefill: logits (B, 1, V). This step's slot marked in each segment's mask (in
        place, one write) and its positions (each segment's first generated position + the step) are what it hands
        the captured step; the step counter stays on the host, outside the graph."""
        if st.step >= st.room:
            raise ValueError(f"the fast path's static cache holds {st.room} generated tokens "
                             f"(load(..., fast_max_new_tokens=)); asked for more")
        S = st.mask.shape[0]
        st.mask[torch.arange(S, device=st.mask.device), :, :, :, st.buckets + st.step] = True  # one write
        pos = st.next_pos + st.step
        st.step += 1
        return self._decode(input_ids[:, -1:], pos, st.mask, st.cache, st.shape)

"""The fast path: a pruned prefill planned on the host, then run as one static-shape function per
length bucket (captured: ``torch.compile(fullgraph=True)``, CUDA graphs on a GPU), and a decode step
with one graph.

Why: at batch 1 on a current GPU a 7B prefill is bound by kernel launches, not FLOPs, so the eager
engine's pruned prefill is *slower* than the unpruned one (docs/results/efficiency-h100.md). Here
everything that depends on the prompt is decided on the host first, from the host copy of the ids,
and handed to the captured function as index tensors:

``plan`` (host, no device op)
    the placeholder run of every row, the unit layouts (:class:`llava.ops.UnitLayout`) and the
    method's host draws (:meth:`Method.plan_vision`, e.g. random's picks), the number of outputs of the
    selection (from a dry run of the method on ``meta`` tensors, once per unit signature), the length
    bucket, the new row of every sample ([pad, text before, outputs, text after], left-padded to the
    bucket), its positions and its 4-D mask against a :class:`~transformers.StaticCache`;
``prefill`` (device, static shapes, no host read)
    tower -> [CLS] signals from ``hidden_states`` -> the method's selection (``sig.captured``) ->
    merges -> one gather into the bucket -> the language model into the static cache -> the last
    row's logits, and one validity flag of every selection (read once, after the prefill);
``decode`` (device, one graph for every step)
    one token against a mask of fixed width ``max_cache_len`` updated in place, positions continuing
    after each row's last prompt position.

Scope (everything else runs on the eager engine, and ``engine.stats.path`` / ``.path_reason`` say
why): the three LLaVA families - LLaVA-1.5, LLaVA-NeXT (anyres crops, one unit per crop, newline
tokens) and Video-LLaVA (images; videos of 8 frames, one unit per frame) - with exactly one image or
one video per prompt, laid out by the family adapter's :meth:`~llava.families.base.FamilyAdapter.fast_visual`;
methods that declare ``capturable = "full"`` (:attr:`llava.method.Method.capturable`); no replay.
Greedy tokens equal the eager engine's; logits may differ in the last bits (the bucket's padding
changes GEMM shapes). A graph is keyed by the bucket, the batch and every sample's visual structure:
LLaVA-1.5 and Video-LLaVA have one structure, LLaVA-NeXT one per crop grid and unpadded layout (image
aspect ratio; the ``spatial`` layout: one per grid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from dataclasses import replace as _replace

import torch

from .families.base import param_dtype, to_device
from .families.clip import attention_layer, cls_signals
from .layout import materialize
from .method import Selection
from .ops import UnitLayout, unit_layout

log = logging.getLogger(__name__)

#: prefill lengths the captured functions are compiled for (a longer prompt rounds up to 256)
BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096)
#: lengths the text after the image is padded to for query-aware methods (``VisionSignals.text_mask``)
TEXT_BUCKETS = (16, 32, 64, 128, 256, 512)
#: decode slots of the static cache are allocated in steps of this many tokens
DECODE_STEP = 64
#: model families the fast path plans for
FAST_FAMILIES = ("llava", "llava_next", "video_llava")
BACKENDS = ("auto", "inductor", "eager", "aot_eager", "none")


class NotPlanned(Exception):
    """The prompt does not fit the fast path (the message says why): it runs on the eager engine."""


def bucket_for(n: int, buckets=BUCKETS) -> int:
    """The smallest bucket >= n (beyond the largest, n rounded up to a multiple of 256)."""
    for b in buckets:
        if b >= n:
            return b
    return -(-n // 256) * 256


@dataclass(frozen=True)
class _Sample:
    """Everything static about one sample of a captured prefill."""

    tokens: int  # stock visual tokens (T)
    units: int  # units (U)
    extra: int  # extra [CLS] candidates (0 or U)
    outputs: int  # selection outputs (m)
    grid: tuple  # per unit (rows, cols)
    text: int  # rows of the padded text block (query-aware methods; 0: none)
    layouts: tuple  # per layout key: (key, ((name, offset, length) ...), static fields of the UnitLayout)
    parts: tuple  # ((name, offset, length) ...) of the sample's other tensors in the index buffer


@dataclass(frozen=True)
class _Spec:
    """Everything static about one captured prefill (Python values: its graph key)."""

    batch: int
    key: str  # the visual input the tower reads
    kind: str  # unit kind
    drop_cls: bool
    newlines: bool  # some token is a newline (LLaVA-NeXT spatial_unpad)
    crops: bool  # the tower runs a host-chosen subset of the flattened input
    samples: tuple  # _Sample per prompt
    bucket: int
    cache_len: int
    index_len: int


@dataclass
class FastState:
    """Decode state of a fast prefill (lives on ``engine._state.fast``)."""

    cache: object
    mask: torch.Tensor  # (B, 1, 1, C) bool, slots the next token may attend to (updated in place)
    next_pos: torch.Tensor  # (B, 1) position of the first generated token
    bucket: int
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
    candidates: list = field(default_factory=list)  # stock visual tokens per sample


def _shift(s: _Sample, delta: int) -> _Sample:
    """``s`` with its index-buffer offsets moved by ``delta`` (a sample's slice on its own)."""
    return _replace(s, parts=tuple((n, o + delta, k) for n, o, k in s.parts),
                    layouts=tuple((key, tuple((n, o + delta, k) for n, o, k in names), st)
                                  for key, names, st in s.layouts))


class FastPath:
    """The fast path of one :class:`llava.engine.PruningEngine` (``engine.fast``)."""

    def __init__(self, engine, backend: str = "auto", max_new_tokens: int = 256, buckets=BUCKETS):
        if backend not in BACKENDS:
            raise ValueError(f"fast backend must be one of {BACKENDS}, got {backend!r}")
        self.engine = engine
        self.buckets = tuple(buckets)
        self.max_new_tokens = int(max_new_tokens)
        dev = next(engine.model.parameters()).device
        if backend == "auto":
            backend = "inductor" if dev.type == "cuda" else "eager"
        self.backend = backend
        self.cuda_graphs = dev.type == "cuda" and backend == "inductor"
        self._prefill = self._compile(self._prefill_fn)
        self._decode = self._compile(self._decode_fn)
        self._counts: dict = {}  # unit signature -> outputs per sample (meta dry run)
        self._layouts: dict = {}  # sample structure -> its host unit layouts
        self._caches: dict = {}  # (B, C, dtype) -> StaticCache
        self._seen: set = set()  # graph keys run so far
        self.refusal = self._static_refusal()
        if not self.refusal:  # transformers installs its output-capturing hooks under a lock on first use:
            from transformers.utils.output_capturing import maybe_install_capturing_hooks  # not traceable

            towers = {id(t): t for t in (engine.adapter.fast_tower(k) for k in engine.adapter.pixel_keys)}
            for mod in (*towers.values(), engine.lm):
                maybe_install_capturing_hooks(mod)

    def _compile(self, fn):
        if self.backend == "none":
            return fn
        # every (bucket, batch, signature) is one entry of the same function: allow many
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4096)
        kw = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend, **kw)

    # ------------------------------------------------------------------ refusals
    def _static_refusal(self) -> str | None:
        e = self.engine
        if e.family not in FAST_FAMILIES:
            return f"the fast path plans {', '.join(FAST_FAMILIES)} models, not {e.family}"
        m = e.method
        if m.llm_layers or getattr(m, "tower_stage", False):
            return f"{m.name}: in-LLM / in-tower stages are not captured yet"
        if m.vision_attention_layers or m.vision_fullwidth_layers or m.vision_cls_layers:
            return f"{m.name}: extra vision-layer signals are not captured yet"
        return m.capture_refusal()

    def refusal_for(self, input_ids, visual: dict) -> str | None:
        """Why this prefill must run eagerly (None: it may take the fast path; the plan may still find
        that the prompt does not fit, :class:`NotPlanned`)."""
        if self.refusal:
            return self.refusal
        if self.engine.replay:
            return "replay of recorded selections runs on the eager engine"
        return None

    # ------------------------------------------------------------------ host plan
    @staticmethod
    def _layout_tensors(lay: UnitLayout) -> list[tuple[str, torch.Tensor]]:
        out = [("newlines", lay.newlines)]
        for u in range(lay.num_units):
            out += [(f"tokens{u}", lay.tokens[u]), (f"cls{u}", lay.cls[u]), (f"patches{u}", lay.patches[u])]
        return out

    @staticmethod
    def _layout_static(lay: UnitLayout) -> tuple:
        return (tuple(lay.num_stock), tuple(lay.num_cls_stock), tuple(lay.num_patch_stock), lay.num_newline_stock,
                tuple(map(tuple, lay.unit_pos)) if lay.unit_pos is not None else None, lay.grid)

    @staticmethod
    def _layout_from(static: tuple, n: int, get) -> UnitLayout:
        """A UnitLayout of ``n`` units from its static fields and ``get(name)`` for its index tensors."""
        num_stock, num_cls, num_patch, num_nl, unit_pos, grid = static
        return UnitLayout(tokens=[get(f"tokens{u}") for u in range(n)], cls=[get(f"cls{u}") for u in range(n)],
                          patches=[get(f"patches{u}") for u in range(n)], newlines=get("newlines"),
                          num_stock=list(num_stock), num_cls_stock=list(num_cls), num_patch_stock=list(num_patch),
                          num_newline_stock=num_nl, unit_pos=list(unit_pos) if unit_pos is not None else None,
                          grid=grid)

    def _sample_signals(self, s: _Sample, index, feats, vfeats, ca=None, ks=None, kind="image", text=None):
        """A sample's VisionSignals over its candidates, its planned tensors read from ``index``;
        ``text`` (Q, D) the padded text block (query-aware methods), its masks from ``index``."""
        from .signals import VisionSignals

        parts = {name: index[o:o + n] for name, o, n in s.parts}
        layouts = {}
        for key, names, static in s.layouts:
            got = {name: index[o:o + n] for name, o, n in names}
            layouts[key] = self._layout_from(static, s.units, got.__getitem__)
        plan = {name[5:]: t for name, t in parts.items() if name.startswith("plan:")}
        unit = parts["unit"]
        if s.text:
            text_mask, question_mask = parts["text_mask"].bool(), parts["question_mask"].bool()
        else:
            text, text_mask, question_mask = feats[:0], None, unit[:0].bool()
        return VisionSignals(
            features=feats, vision_features=vfeats, unit=unit, patch=parts["patch"], unit_kind=kind,
            grid=self.engine.adapter.grid(), text_embeds=text, question_mask=question_mask, text_mask=text_mask,
            cls_attn=ca, keys=ks, key=0, num_stock=s.tokens, unit_pos=parts["unit_pos"].view(s.units, 2),
            unit_grid=list(s.grid), captured=True, layouts=layouts, plan=plan)

    def _dry_run(self, s: _Sample, index_h: torch.Tensor, kind: str) -> int:
        """Outputs of the method's selection for one sample, from a run on ``meta`` tensors (shapes only:
        a method that reads a device value fails here, and the prefill runs eagerly)."""
        m = self.engine.method
        if not m.vision_stage:
            return s.tokens
        cfg = self.engine.model.config
        D = cfg.text_config.hidden_size
        vc = cfg.vision_config
        meta = torch.device("meta")
        n = s.tokens + s.extra
        needs = m.needs_vision_attention
        ca = torch.empty(vc.num_attention_heads, n, device=meta) if needs else None
        ks = torch.empty(n, vc.hidden_size // vc.num_attention_heads, device=meta) if needs else None
        sig = self._sample_signals(s, index_h.to(meta), torch.empty(n, D, device=meta),
                                   torch.empty(n, vc.hidden_size, device=meta), ca, ks, kind,
                                   torch.empty(s.text, D, device=meta))
        return m.select_vision(sig).num_out

    def _host_signals(self, unit, patch, unit_pos, grid, layouts, key, T, kind):
        from .signals import VisionSignals

        return VisionSignals(features=torch.zeros(0), vision_features=torch.zeros(0), unit=unit, patch=patch,
                             unit_kind=kind, grid=self.engine.adapter.grid(), text_embeds=torch.zeros(0),
                             question_mask=torch.zeros(0, dtype=torch.bool), key=key, num_stock=T,
                             unit_pos=unit_pos, unit_grid=list(grid), layouts=layouts, _unit_host=unit)

    def _plan_sample(self, vp: dict, key: int, extras: bool, kind: str, offset: int, text=None):
        """One sample's static structure (without outputs) and its index-buffer tensors (host).
        ``text``: (text mask, question mask) of the padded text block, or None."""
        T, U = int(vp["src"].numel()), int(vp["units"].numel())
        unit, patch = vp["unit"], vp["patch"]
        if extras:  # each unit's [CLS] as candidate T + u (the eager engine's order)
            unit = torch.cat([unit, torch.arange(U)])
            patch = torch.cat([patch, torch.full((U,), -1, dtype=torch.long)])
        pos = vp["unit_pos"]
        structure = (T, extras, unit.numpy().tobytes(), patch.numpy().tobytes(), pos.numpy().tobytes())
        lays = self._layouts.get(structure)
        if lays is None:  # the 8 (patch, stock, pos) layouts of a structure, built once (host work per prefill)
            lays = {(p, st, q): unit_layout(unit, patch if p else None, T if st else None, pos if q else None)
                    for p in (False, True) for st in (False, True) for q in (False, True)}
            if len(self._layouts) >= 256:
                self._layouts.clear()
            self._layouts[structure] = lays
        host = self._host_signals(unit, patch, pos, vp["grid"], lays, key, T, kind)
        plan = {f"plan:{k}": v.long().reshape(-1) for k, v in self.engine.method.plan_vision(host).items()}
        tensors = [("src", vp["src"]), ("unit", unit), ("patch", patch), ("unit_pos", pos.reshape(-1)),
                   ("units", vp["units"])] + list(plan.items())
        if text is not None:  # the text rows' places in the new rows are filled in once the rows are laid out
            tensors += [("text_rows", torch.zeros(text[0].numel(), dtype=torch.long)), ("text_mask", text[0]),
                        ("question_mask", text[1])]
        parts, lay_desc, chunks, at = [], [], [], offset
        for name, t in tensors:
            parts.append((name, at, int(t.numel())))
            chunks.append(t.long())
            at += t.numel()
        for k, lay in lays.items():
            names = []
            for name, t in self._layout_tensors(lay):
                names.append((name, at, int(t.numel())))
                chunks.append(t)
                at += t.numel()
            lay_desc.append((k, tuple(names), self._layout_static(lay)))
        s = _Sample(tokens=T, units=U, extra=U if extras else 0, outputs=-1, grid=tuple(vp["grid"]),
                    text=int(text[0].numel()) if text is not None else 0, layouts=tuple(lay_desc), parts=tuple(parts))
        return s, chunks

    def plan(self, input_ids, attention_mask, visual: dict):
        """The host plan of one prefill: (spec, host tensors, 4-D mask, row lengths, candidates per sample).
        Raises :class:`NotPlanned` when the prompt does not fit the fast path."""
        e = self.engine
        B, L = input_ids.shape
        try:
            fv = e.adapter.fast_visual(visual, B)
        except ValueError as exc:
            raise NotPlanned(str(exc)) from None
        ids_h = input_ids.cpu()  # the one device read: before any device work of this prefill
        valid_h = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        extras = bool(fv.drop_cls and e.method.include_cls_candidates)
        others = [t for t in (e.model.config.image_token_id, getattr(e.model.config, "video_token_id", None))
                  if t is not None and t != fv.token_id]
        rows, samples, chunks, at = [], [], [], 0
        for b in range(B):
            ids = ids_h[b, valid_h[b]]
            T = int(fv.samples[b]["src"].numel())
            vis = (ids == fv.token_id).nonzero().flatten()
            if vis.numel() != T or (T and int(vis[-1] - vis[0]) != T - 1) or any((ids == o).any() for o in others):
                raise NotPlanned(f"row {b} does not hold exactly one {fv.kind} run of {T} contiguous placeholder "
                                 "tokens (several images / videos per prompt run on the eager engine)")
            p0 = int(vis[0]) if T else 0
            rows.append((ids, p0, T))
            text = None
            if e.method.query_aware:  # the text after the visual run, padded: (real rows, question rows)
                after, question = e._text_spans(ids, vis)
                Q = bucket_for(int(after.numel()), TEXT_BUCKETS)
                text = (torch.arange(Q) < after.numel(), torch.isin(torch.arange(Q) + p0 + T, question))
            smp, ch = self._plan_sample(fv.samples[b], e._sample_key(b, ids), extras, fv.kind, at, text)
            at += sum(int(c.numel()) for c in ch)
            samples.append(smp)
            chunks += ch
        index = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        done = []
        for b, smp in enumerate(samples):  # the selection's output count: a dry run per sample structure
            sig_key = (smp.tokens, smp.units, smp.extra, smp.grid, smp.text, fv.kind,
                       tuple((k, static) for k, _, static in smp.layouts),
                       tuple(n for name, _, n in smp.parts if name.startswith("plan:")))
            if sig_key not in self._counts:
                base = smp.parts[0][1]
                end = max(o + n for _, names, _ in smp.layouts for _, o, n in names)
                local = _shift(smp, -base)
                try:
                    self._counts[sig_key] = self._dry_run(local, index[base:end], fv.kind)
                except Exception as exc:  # a method that reads a device value, or an op meta tensors lack
                    self._counts[sig_key] = NotPlanned(f"{e.method.name}: its selection could not be planned on "
                                                       f"the host ({type(exc).__name__}: {exc})")
            if isinstance(self._counts[sig_key], NotPlanned):
                raise self._counts[sig_key]
            done.append(_replace(smp, outputs=self._counts[sig_key]))
        samples = done
        lens = [int(ids.numel()) - T + s.outputs for (ids, _, T), s in zip(rows, samples)]
        Lb = bucket_for(max(lens), self.buckets)
        C = Lb + -(-self.max_new_tokens // DECODE_STEP) * DECODE_STEP
        # the new rows: [pad, text before, m outputs, text after], left-padded to the bucket
        tok = torch.zeros(B, Lb, dtype=torch.long)
        src = torch.arange(B * Lb).view(B, Lb).clone()
        pos = torch.zeros(B, Lb, dtype=torch.long)
        mask = torch.zeros(B, 1, Lb, C, dtype=torch.bool)
        ar = torch.arange(Lb)
        causal = ar[None, :] <= ar[:, None]  # (Lb, Lb)
        out_at = B * Lb
        for b, ((ids, p0, T), n, smp) in enumerate(zip(rows, lens, samples)):
            pad, m = Lb - n, smp.outputs
            text = torch.cat([ids[:p0], ids[p0 + T:]])
            slots = torch.cat([torch.arange(pad, pad + p0), torch.arange(pad + p0 + m, Lb)])
            tok[b, slots] = text
            src[b, pad + p0:pad + p0 + m] = out_at + torch.arange(m)
            out_at += m
            pos[b, pad:] = torch.arange(n)
            if smp.text:  # where the text block's rows sit in the flattened new rows (pads: row 0, masked)
                o, k = {name: (o, k) for name, o, k in smp.parts}["text_rows"]
                real_text = int(ids.numel()) - p0 - T
                index[o:o + real_text] = b * Lb + pad + p0 + m + torch.arange(real_text)
            mask[b, 0, :, pad:Lb] = causal[:, pad:]
            mask[b, 0, :pad, :] = False
            mask[b, 0, torch.arange(pad), torch.arange(pad)] = True  # padding rows see themselves (no NaN)
            mask[b, 0, pad:, :pad] = False
        newlines = any(bool((vp["src"] < 0).any()) for vp in fv.samples)
        spec = _Spec(batch=B, key=fv.key, kind=fv.kind, drop_cls=fv.drop_cls, newlines=newlines,
                     crops=fv.crops is not None, samples=tuple(samples), bucket=Lb, cache_len=C,
                     index_len=int(index.numel()))
        host = {"tok": tok, "src": src.reshape(-1), "pos": pos, "index": index}
        if fv.crops is not None:
            host["crops"] = fv.crops
        return spec, host, mask, lens, [T for _, _, T in rows]

    # ------------------------------------------------------------------ the captured functions
    def _prefill_fn(self, px, crops, tok, src, pos, mask, index, cache, spec: _Spec):
        e = self.engine
        adapter, method, lm = e.adapter, e.method, e.lm
        cfg = e.model.config
        tower = adapter.fast_tower(spec.key)
        fl = cfg.vision_feature_layer
        x = px.flatten(0, px.dim() - 4)  # (N, 3, H, W): images / crops / frames
        if spec.crops:
            x = x[crops]
        out = tower(x.to(tower.dtype), output_hidden_states=True, return_dict=True)
        hs = out.hidden_states[fl]
        ca = ks = None
        if method.needs_vision_attention:
            li = attention_layer(tower, fl, method.vision_layer)
            ca, ks = cls_signals(tower.encoder.layers[li], out.hidden_states[li])
        proj = adapter.core.multi_modal_projector
        off = 1 if spec.drop_cls else 0
        vis = hs[:, off:]
        N, per = vis.shape[:2]
        pdt = param_dtype(proj)
        flat = proj(vis.to(pdt)).reshape(N * per, -1)  # one projector call, as the stock model
        vflat = vis.reshape(N * per, -1)
        caf = ca[:, :, off:].permute(0, 2, 1).reshape(N * per, -1) if ca is not None else None
        ksf = ks[:, off:].reshape(N * per, -1) if ks is not None else None
        emb = lm.embed_tokens(tok)
        newline = adapter.fast_newline() if spec.newlines else None
        bad = torch.zeros((), dtype=torch.bool, device=emb.device)
        outs = []
        for s in spec.samples:
            at = {name: (o, n) for name, o, n in s.parts}
            o, n = at["src"]
            sidx = index[o:o + n]
            safe = sidx.clamp(min=0)
            f, v = flat[safe], vflat[safe]
            a = caf[safe] if caf is not None else None
            k = ksf[safe] if ksf is not None else None
            if newline is not None:  # LLaVA-NeXT's image_newline rows, as the adapter builds them
                nl = (sidx < 0)[:, None]
                f = torch.where(nl, newline.to(f.dtype), f)
                v = v.masked_fill(nl, 0)
                if a is not None:
                    a, k = a.masked_fill(nl, 0), k.masked_fill(nl, 0)
            f = f.to(emb.dtype)
            if not method.vision_stage:
                outs.append(f)
                continue
            if s.extra:  # each unit's [CLS] as an extra candidate (projected like a patch)
                o, n = at["units"]
                units = index[o:o + n]
                f = torch.cat([f, proj(hs[units, :1].to(pdt))[:, 0].to(emb.dtype)])
                v = torch.cat([v, hs[units, 0]])
                if a is not None:
                    a = torch.cat([a, ca[units, :, 0]])
                    k = torch.cat([k, ks[units, 0]])
            text = None
            if s.text:
                o, n = at["text_rows"]
                text = emb.reshape(-1, emb.shape[-1])[index[o:o + n]]
            sig = self._sample_signals(s, index, f, v, a.T.contiguous() if a is not None else None, k, spec.kind,
                                       text)
            sel = method.select_vision(sig)
            if sel.num_out != s.outputs:
                raise RuntimeError(f"{method.name} gave {sel.num_out} outputs where the plan has {s.outputs}")
            flags = sel.flags(sig.num_tokens, s.tokens)
            for name in Selection.MALFORMED:
                if name in flags:
                    bad = bad | flags[name]
            if spec.newlines and sel.space == "vision" and sel.targets is not None and sel.targets.numel():
                tg, asg = sel.targets, sel.assign  # the eager engine refuses merging newlines in vision space
                bad = bad | sig.is_newline[tg].any() | (sig.is_newline & (asg >= 0)).any()
            outs.append(materialize(sig, sel, adapter.project)[0].to(emb.dtype))
        rows = torch.cat([emb.reshape(-1, emb.shape[-1])] + outs)[src].view(emb.shape)
        h = lm(inputs_embeds=rows, attention_mask=mask, position_ids=pos, past_key_values=cache,
               use_cache=True).last_hidden_state
        return e.model.lm_head(h[:, -1:]), bad

    def _decode_fn(self, tok, pos, mask, cache):
        e = self.engine
        h = e.lm(inputs_embeds=e.lm.embed_tokens(tok), attention_mask=mask, position_ids=pos,
                 past_key_values=cache, use_cache=True).last_hidden_state
        return e.model.lm_head(h)

    # ------------------------------------------------------------------ entry points
    def _cache(self, B: int, C: int, dtype, dev):
        from transformers.cache_utils import StaticCache

        key = (B, C, dtype, str(dev))
        cache = self._caches.get(key)
        if cache is None:
            lm_cfg = self.engine.lm.config
            cache = StaticCache(config=lm_cfg, max_cache_len=C)
            heads = lm_cfg.num_key_value_heads
            hd = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
            cache.early_initialization(B, heads, hd, dtype, dev)
            self._caches = {key: cache}  # one cache at a time: the last shape's
        for layer in cache.layers:  # a new prompt: slots are rewritten; stale ones stay masked
            layer.cumulative_length.zero_()
        return cache

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, visual: dict):
        """Run one prefill on the fast path: (logits (B, 1, V), cache, FastState, FastInfo, outputs per
        sample). Raises :class:`NotPlanned` (nothing ran yet) when the prompt does not fit."""
        t0 = time.perf_counter()
        spec, host, mask, lens, candidates = self.plan(input_ids, attention_mask, visual)
        dev = input_ids.device
        px = visual[spec.key]
        emb_dtype = self.engine.lm.embed_tokens.weight.dtype
        names = [k for k in ("tok", "src", "pos", "index", "crops") if k in host]
        moved = dict(zip(names, to_device([host[k] for k in names], dev)))  # one host -> device copy
        mask_d = mask.to(dev, non_blocking=True)
        cache = self._cache(spec.batch, spec.cache_len, emb_dtype, dev)
        key = (spec, px.shape, px.dtype)
        new = key not in self._seen
        self._seen.add(key)
        t1 = time.perf_counter()
        logits, bad = self._prefill(px, moved.get("crops"), moved["tok"], moved["src"], moved["pos"], mask_d,
                                    moved["index"], cache, spec)
        if bool(bad):  # the one read after the prefill (generate reads the first token anyway)
            raise ValueError(f"{self.engine.method.name} returned a malformed selection (indices out of range, "
                             "a token kept twice, a bad order / assign, or a newline merged in vision space)")
        dec_mask = torch.zeros(spec.batch, 1, 1, spec.cache_len, dtype=torch.bool)
        for b, n in enumerate(lens):
            dec_mask[b, 0, 0, spec.bucket - n:spec.bucket] = True
        state = FastState(cache=cache, mask=dec_mask.to(dev), bucket=spec.bucket,
                          next_pos=torch.tensor(lens, dtype=torch.long)[:, None].to(dev))
        info = FastInfo(path="fast", bucket=spec.bucket, cache_len=spec.cache_len, new_graph=new,
                        timings={"plan": t1 - t0}, candidates=candidates)
        return logits, cache, state, info, [s.outputs for s in spec.samples]

    @torch.no_grad()
    def decode(self, st: FastState, input_ids):
        """One decode step of a fast prefill: logits (B, 1, V)."""
        slot = st.bucket + st.step
        if slot >= st.mask.shape[-1]:
            raise ValueError(f"the fast path's static cache holds {st.mask.shape[-1] - st.bucket} generated tokens "
                             f"(load(..., fast_max_new_tokens=)); asked for more")
        st.mask[..., slot] = True
        pos = st.next_pos + st.step
        st.step += 1
        return self._decode(input_ids[:, -1:], pos, st.mask, st.cache)

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
why): LLaVA-1.5 (family ``llava``), one image per prompt, methods that declare ``capturable =
"full"`` (:attr:`llava.method.Method.capturable`), no replay. Greedy tokens equal the eager engine's;
logits may differ in the last bits (the bucket's padding changes GEMM shapes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .families.base import param_dtype, to_device
from .families.clip import attention_layer, cls_signals
from .method import Selection
from .ops import UnitLayout, merge_tokens, unit_layout

log = logging.getLogger(__name__)

#: prefill lengths the captured functions are compiled for (a longer prompt rounds up to 256)
BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096)
#: decode slots of the static cache are allocated in steps of this many tokens
DECODE_STEP = 64
#: model families the fast path plans for
FAST_FAMILIES = ("llava",)
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
class _Spec:
    """Everything static about one captured prefill (Python values: part of its graph key)."""

    batch: int
    tokens: int  # stock visual tokens per sample (one unit)
    extra: int  # extra [CLS] candidates per sample (0 / 1)
    outputs: tuple  # selection outputs per sample
    bucket: int
    cache_len: int
    layouts: tuple  # per layout key: ((name, length) ...) of its tensors in the index buffer
    plan: tuple  # per sample: ((name, offset, length) ...) of the method's planned tensors
    index_len: int  # length of the per-sample slice of the index buffer


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
        self._caches: dict = {}  # (B, C, dtype) -> StaticCache
        self._seen: set = set()  # graph keys run so far
        self.refusal = self._static_refusal()
        if not self.refusal:  # transformers installs its output-capturing hooks under a lock on first use:
            from transformers.utils.output_capturing import maybe_install_capturing_hooks  # not traceable

            for mod in (engine.adapter.tower, engine.lm):
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
        if m.query_aware:
            return f"{m.name} reads the question (variable-length text signals): not captured yet"
        return m.capture_refusal()

    def refusal_for(self, input_ids, visual: dict) -> str | None:
        """Why this prefill must run eagerly (None: it takes the fast path)."""
        if self.refusal:
            return self.refusal
        if self.engine.replay:
            return "replay of recorded selections runs on the eager engine"
        if visual.get("pixel_values_videos") is not None:
            return "video input"
        px = visual.get("pixel_values")
        if px is None or px.dim() != 4 or px.shape[0] != input_ids.shape[0]:
            return "the fast path takes exactly one image per prompt"
        return None

    # ------------------------------------------------------------------ host plan
    def _layout_sig(self, T: int, extra: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Host unit / patch ids of one image's candidates and its planned layouts (host tensors)."""
        unit = torch.zeros(T + extra, dtype=torch.long)
        patch = torch.cat([torch.arange(T), torch.full((extra,), -1, dtype=torch.long)])
        pos = torch.full((1, 2), -1, dtype=torch.long)
        lays = {}
        for p in (False, True):
            for s in (False, True):
                for q in (False, True):
                    lays[(p, s, q)] = unit_layout(unit, patch if p else None, T if s else None, pos if q else None)
        return unit, patch, lays

    @staticmethod
    def _layout_tensors(lay: UnitLayout) -> list[tuple[str, torch.Tensor]]:
        out = [("newlines", lay.newlines)]
        for u in range(lay.num_units):
            out += [(f"tokens{u}", lay.tokens[u]), (f"cls{u}", lay.cls[u]), (f"patches{u}", lay.patches[u])]
        return out

    @staticmethod
    def _layout_from(lay: UnitLayout, get) -> UnitLayout:
        """``lay`` (host) with its index tensors replaced by ``get(name)`` (device views)."""
        n = lay.num_units
        return UnitLayout(tokens=[get(f"tokens{u}") for u in range(n)], cls=[get(f"cls{u}") for u in range(n)],
                          patches=[get(f"patches{u}") for u in range(n)], newlines=get("newlines"),
                          num_stock=lay.num_stock, num_cls_stock=lay.num_cls_stock,
                          num_patch_stock=lay.num_patch_stock, num_newline_stock=lay.num_newline_stock,
                          unit_pos=lay.unit_pos, grid=lay.grid)

    def _signals(self, feats, vfeats, unit, patch, layouts, plan, ca=None, ks=None, captured=True):
        from .signals import VisionSignals

        T = self._T
        dev = feats.device
        return VisionSignals(
            features=feats, vision_features=vfeats, unit=unit, patch=patch, unit_kind="image",
            grid=self.engine.adapter.grid(), text_embeds=feats[:0], question_mask=unit[:0].bool(),
            cls_attn=ca, keys=ks, key=0, num_stock=T, unit_pos=torch.full((1, 2), -1, dtype=torch.long, device=dev),
            unit_grid=[self.engine.adapter.grid()], captured=captured, layouts=layouts, plan=plan)

    def _dry_run(self, T: int, extra: int, host_unit, host_patch, host_lays, host_plan) -> int:
        """Outputs of the method's selection for one image, from a run on ``meta`` tensors (no data:
        shapes only; a method that reads a device value fails here, and the prefill runs eagerly)."""
        m = self.engine.method
        if not m.vision_stage:
            return T
        cfg = self.engine.model.config
        D = cfg.text_config.hidden_size
        vc = cfg.vision_config
        meta = torch.device("meta")
        n = T + extra
        to_meta = (lambda t: t.to(meta))
        lays = {k: self._layout_from(v, lambda name, v=v: to_meta(dict(self._layout_tensors(v))[name]))
                for k, v in host_lays.items()}
        ca = torch.empty(vc.num_attention_heads, n, device=meta) if m.needs_vision_attention else None
        ks = torch.empty(n, vc.hidden_size // vc.num_attention_heads, device=meta) if m.needs_vision_attention else None
        sig = self._signals(torch.empty(n, D, device=meta), torch.empty(n, vc.hidden_size, device=meta),
                            to_meta(host_unit), to_meta(host_patch), lays,
                            {k: to_meta(v) for k, v in host_plan.items()}, ca, ks)
        sel = m.select_vision(sig)
        if sel.values is not None:
            raise ValueError("Selection.values (method-computed outputs) are not captured yet")
        return sel.num_out

    def plan(self, input_ids, attention_mask, visual: dict):
        """The host plan of one prefill: (spec, per-request host tensors). Raises ValueError with the
        reason when the prompt does not fit the fast path."""
        e = self.engine
        cfg = e.model.config
        B, L = input_ids.shape
        ids_h = input_ids.cpu()  # the one device read: before any device work of this prefill
        valid_h = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        vc = cfg.vision_config
        S = (vc.image_size // vc.patch_size) ** 2 + 1
        drop = cfg.vision_feature_select_strategy == "default"
        T = S - 1 if drop else S
        extra = 1 if (drop and e.method.include_cls_candidates) else 0
        self._T = T
        self.tokens = T
        rows = []
        for b in range(B):
            real = valid_h[b].nonzero().flatten()
            ids = ids_h[b, real]
            vis = (ids == cfg.image_token_id).nonzero().flatten()
            if vis.numel() != T or (vis.numel() and int(vis[-1] - vis[0]) != T - 1):
                raise NotPlanned(f"row {b} does not hold exactly one image of {T} contiguous placeholder tokens")
            rows.append((ids, int(vis[0])))
        unit, patch, host_lays = self._layout_sig(T, extra)
        self._host_lays = host_lays  # the captured function rebuilds its device layouts from these
        plans = []
        for b, (ids, p0) in enumerate(rows):
            host = self._signals_host(unit, patch, host_lays, e._sample_key(b, ids))
            plans.append({k: v.long().reshape(-1) for k, v in e.method.plan_vision(host).items()})
        sig_key = (T, extra, tuple(tuple((k, v.numel()) for k, v in p.items()) for p in plans[:1]))
        if sig_key not in self._counts:
            try:
                self._counts[sig_key] = self._dry_run(T, extra, unit, patch, host_lays, plans[0])
            except Exception as exc:  # a method that reads a device value, or an op meta tensors lack
                self._counts[sig_key] = NotPlanned(f"{e.method.name}: its selection could not be planned on the "
                                                   f"host ({type(exc).__name__}: {exc})")
        if isinstance(self._counts[sig_key], NotPlanned):
            raise self._counts[sig_key]
        m = self._counts[sig_key]
        lens = [int(ids.numel()) - T + m for ids, _ in rows]
        Lb = bucket_for(max(lens), self.buckets)
        C = Lb + -(-self.max_new_tokens // DECODE_STEP) * DECODE_STEP
        # the new rows: [pad, text before, m outputs, text after], left-padded to the bucket
        tok = torch.zeros(B, Lb, dtype=torch.long)
        src = torch.arange(B * Lb).view(B, Lb).clone()
        pos = torch.zeros(B, Lb, dtype=torch.long)
        mask = torch.zeros(B, 1, Lb, C, dtype=torch.bool)
        ar = torch.arange(Lb)
        causal = ar[None, :] <= ar[:, None]  # (Lb, Lb)
        for b, ((ids, p0), n) in enumerate(zip(rows, lens)):
            pad = Lb - n
            text = torch.cat([ids[:p0], ids[p0 + T:]])
            slots = torch.cat([torch.arange(pad, pad + p0), torch.arange(pad + p0 + m, Lb)])
            tok[b, slots] = text
            src[b, pad + p0:pad + p0 + m] = B * Lb + b * m + torch.arange(m)
            pos[b, pad:] = torch.arange(n)
            mask[b, 0, :, pad:Lb] = causal[:, pad:]
            mask[b, 0, :pad, :] = False
            mask[b, 0, torch.arange(pad), torch.arange(pad)] = True  # padding rows see themselves (no NaN)
            mask[b, 0, pad:, :pad] = False
        # the index buffer: per sample [layouts..., planned...] (fixed length per graph key)
        lay_names = tuple((k, tuple((name, int(t.numel())) for name, t in self._layout_tensors(v)))
                          for k, v in host_lays.items())
        per = []
        plan_desc = []
        for b in range(B):
            parts, desc, off = [], [], 0
            for k, v in host_lays.items():
                for _, t in self._layout_tensors(v):
                    parts.append(t)
                    off += t.numel()
            for name, t in plans[b].items():
                desc.append((name, off, int(t.numel())))
                parts.append(t)
                off += t.numel()
            per.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
            plan_desc.append(tuple(desc))
        if len(set(plan_desc)) > 1:
            raise NotPlanned("the samples' host draws differ in shape")
        spec = _Spec(batch=B, tokens=T, extra=extra, outputs=(m,) * B, bucket=Lb, cache_len=C,
                     layouts=lay_names, plan=plan_desc[0], index_len=int(per[0].numel()))
        host = {"tok": tok, "src": src.reshape(-1), "pos": pos, "index": torch.stack(per) if B else None,
                "unit": unit, "patch": patch}
        return spec, host, mask, lens

    def _signals_host(self, unit, patch, host_lays, key):
        from .signals import VisionSignals

        return VisionSignals(features=torch.zeros(0), vision_features=torch.zeros(0), unit=unit, patch=patch,
                             unit_kind="image", grid=self.engine.adapter.grid(), text_embeds=torch.zeros(0),
                             question_mask=torch.zeros(0, dtype=torch.bool), key=key, num_stock=self._T,
                             layouts=host_lays, _unit_host=unit)

    # ------------------------------------------------------------------ the captured functions
    def _prefill_fn(self, px, tok, src, pos, mask, index, unit, patch, cache, spec: _Spec):
        e = self.engine
        adapter, method, lm = e.adapter, e.method, e.lm
        cfg = e.model.config
        tower = adapter.tower
        fl = cfg.vision_feature_layer
        out = tower(px.to(tower.dtype), output_hidden_states=True, return_dict=True)
        hs = out.hidden_states[fl]
        ca = ks = None
        if method.needs_vision_attention:
            li = attention_layer(tower, fl, method.vision_layer)
            ca, ks = cls_signals(tower.encoder.layers[li], out.hidden_states[li])
        proj = e.model.model.multi_modal_projector
        off = 1 if cfg.vision_feature_select_strategy == "default" else 0
        feats = proj(hs[:, off:].to(param_dtype(proj)))  # (B, T, D), one projector call as the stock model
        emb = lm.embed_tokens(tok)
        bad = torch.zeros((), dtype=torch.bool, device=emb.device)
        outs = []
        for b in range(spec.batch):
            f, v = feats[b], hs[b, off:]
            a = ca[b, :, off:] if ca is not None else None
            k = ks[b, off:] if ks is not None else None
            if spec.extra:  # the image's [CLS] as an extra candidate (projected like a patch)
                f = torch.cat([f, proj(hs[b, :1].to(param_dtype(proj)))])
                v = torch.cat([v, hs[b, :1]])
                if a is not None:
                    a = torch.cat([a, ca[b, :, :1]], 1)
                    k = torch.cat([k, ks[b, :1]])
            if not method.vision_stage:
                outs.append(f[:spec.tokens].to(emb.dtype))
                continue
            row = index[b]
            at = [0]

            def take(n, row=row, at=at):
                t = row[at[0]:at[0] + n]
                at[0] += n
                return t

            layouts = {}
            for key, names in spec.layouts:
                got = {name: take(n) for name, n in names}
                layouts[key] = self._lay_static(key, got, spec)
            plan = {name: row[o:o + n] for name, o, n in spec.plan}
            sig = self._signals(f, v, unit, patch, layouts, plan, a.contiguous() if a is not None else None, k)
            sel = method.select_vision(sig)
            if sel.num_out != spec.outputs[b]:
                raise RuntimeError(f"{method.name} gave {sel.num_out} outputs where the plan has {spec.outputs[b]}")
            flags = sel.flags(sig.num_tokens, spec.tokens)
            for name in Selection.MALFORMED:
                if name in flags:
                    bad = bad | flags[name]
            outs.append(self._materialize(sig, sel).to(emb.dtype))
        rows = torch.cat([emb.reshape(-1, emb.shape[-1])] + outs)[src].view(emb.shape)
        h = lm(inputs_embeds=rows, attention_mask=mask, position_ids=pos, past_key_values=cache,
               use_cache=True).last_hidden_state
        return e.model.lm_head(h[:, -1:]), bad

    def _lay_static(self, key, got, spec):
        lay = self._host_lays[key]
        return self._layout_from(lay, lambda name: got[name])

    def _materialize(self, sig, sel: Selection) -> torch.Tensor:
        """The outputs' features (m, D) of a selection, as the eager engine builds them."""
        feats = [sig.features[sel.keep]]
        if sel.targets is not None and sel.targets.numel():
            x = sig.vision_features if sel.space == "vision" else sig.features
            merged = merge_tokens(x, sel)
            if sel.space == "vision":
                merged = self.engine.adapter.project(merged.to(x.dtype))
            feats.append(merged.to(sig.features.dtype))
        out = torch.cat(feats)
        return out[sel.order] if sel.order is not None else out

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
        spec, host, mask, lens = self.plan(input_ids, attention_mask, visual)
        dev = input_ids.device
        px = visual["pixel_values"]
        emb_dtype = self.engine.lm.embed_tokens.weight.dtype
        names = ["tok", "src", "pos", "unit", "patch"] + (["index"] if host["index"] is not None else [])
        moved = dict(zip(names, to_device([host[k] for k in names], dev)))  # one host -> device copy
        mask_d = mask.to(dev, non_blocking=True)
        cache = self._cache(spec.batch, spec.cache_len, emb_dtype, dev)
        key = (spec, px.shape, px.dtype)
        new = key not in self._seen
        self._seen.add(key)
        t1 = time.perf_counter()
        logits, bad = self._prefill(px, moved["tok"], moved["src"], moved["pos"], mask_d, moved.get("index"),
                                    moved["unit"], moved["patch"], cache, spec)
        if bool(bad):  # the one read after the prefill (generate reads the first token anyway)
            raise ValueError(f"{self.engine.method.name} returned a malformed selection (indices out of range, "
                             "a token kept twice, or a bad order / assign)")
        dec_mask = torch.zeros(spec.batch, 1, 1, spec.cache_len, dtype=torch.bool)
        for b, n in enumerate(lens):
            dec_mask[b, 0, 0, spec.bucket - n:spec.bucket] = True
        state = FastState(cache=cache, mask=dec_mask.to(dev), bucket=spec.bucket,
                          next_pos=torch.tensor(lens, dtype=torch.long)[:, None].to(dev))
        info = FastInfo(path="fast", bucket=spec.bucket, cache_len=spec.cache_len, new_graph=new,
                        timings={"plan": t1 - t0})
        return logits, cache, state, info, [spec.outputs[b] for b in range(spec.batch)]

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

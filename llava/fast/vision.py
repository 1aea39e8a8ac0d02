"""The fast path's vision stage inside the captured functions (:class:`CapturedVision`, which
:class:`llava.fast.path.FastPath` keeps beside its host planner): the
tower (the CLIP tower, masked for an in-tower stage, or the family's own static-shape encoder), each sample's
candidates with their signals, the LLM probe and the method's selection, materialised into its outputs. Apart from
:mod:`llava.fast.path`, which runs it inside the prefill graphs; see there for the whole path."""

from __future__ import annotations

import torch

from ..families.base import param_dtype
from ..families.clip import clip_features, clip_tokens, run_tower, run_tower_masked
from .llm import _no_output_capture
from .plan import HostPlanner, _Spec
from .probe import run_probe
from ..method import Selection
from ..needs import HEAD_PREFIXES
from ..selection_rows import carry_rows, materialize


class CapturedVision:
    """The vision stage of the captured prefills of ``planner``'s engine: the tower, each sample's signals (laid out
    as ``planner`` planned them) and the method's selection."""

    def __init__(self, planner: HostPlanner):
        self.planner = planner
        self.engine = planner.engine

    def run_tower(self, px, crops, spec, tower_in=None) -> dict:
        """The tower of a captured prefill, its outputs by name (the tower function of a prefill, run before the
        rest of the host plan; ``spec``: a :class:`llava.fast.plan._TowerSpec` or the prefill's ``_Spec``): the
        family's own static-shape encoder's (``spec.tower``, :meth:`FamilyAdapter.encode_static`) or the CLIP
        tower's (:meth:`_clip_tower`)."""
        e = self.engine
        if spec.tower is not None:
            with _no_output_capture():  # its blocks run outside the tower's forward (see fast_llm)
                enc = e.adapter.encode_static(px, spec.tower, tower_in, e.env.tower)
            return {k: v for k, v in enc.items() if v is not None}
        return self._clip_tower(px, crops, spec)

    def visual_outputs(self, px, crops, index, spec: _Spec, dtype, text_flat, tower_in=None, deeps=None,
                        probe_in=None, tower_out: dict | None = None):
        """The vision stage of a captured prefill, per sample: the outputs (m, D) in ``dtype``, the
        signals, each output's source candidate, the real count (0-d; ``Selection.count`` of a padded
        selection) and the OR of every malformed flag. ``text_flat``: the new rows' embeddings, flattened
        (query-aware methods read their text block from them); ``tower_in``: the tower's planned index
        tensors (a family that encodes its tower itself, ``spec.tower``); ``deeps``: a list that receives each
        sample's DeepStack rows (m, levels, D) carried through its selection (Qwen3-VL); ``probe_in``: the LLM
        probe's planned tensors (``spec.probe``, :mod:`llava.fast.probe`); ``tower_out``: :meth:`run_tower`'s
        outputs when the tower ran already (a function of its own), else it runs here."""
        e = self.engine
        adapter, method = e.adapter, e.method
        enc = tower_out if tower_out is not None else self.run_tower(px, crops, spec, tower_in)
        if spec.tower is not None:  # the family's tower with static shapes (FamilyAdapter.encode_static)
            flat, vflat = enc["features"], enc["vision_features"]
            caf, ksf, exf, clip = enc.get("cls_attn"), enc.get("keys"), {}, None
        else:
            flat, vflat, caf, ksf, exf, clip = self._clip_flat(enc, spec)
        newline = adapter.newline() if spec.newlines else None
        bad = torch.zeros((), dtype=torch.bool, device=flat.device)
        cands = []  # per sample: its stock candidates (features, tower features, [CLS] attention, keys, extras)
        for s in spec.samples:
            o, n = dict((name, (o, n)) for name, o, n in s.parts)["src"]
            sidx = index[o:o + n]
            safe = sidx.clamp(min=0)
            f, v = flat[safe], vflat[safe]
            a = caf[safe] if caf is not None else None
            k = ksf[safe] if ksf is not None else None
            ex = {name: r[safe] for name, r in exf.items()}
            if newline is not None:  # LLaVA-NeXT's image_newline rows, as the adapter builds them
                nl = (sidx < 0)[:, None]
                f = torch.where(nl, newline.to(f.dtype), f)
                v = v.masked_fill(nl, 0)
                if a is not None:
                    a, k = a.masked_fill(nl, 0), k.masked_fill(nl, 0)
                ex = {name: r.masked_fill(nl if r.dim() == 2 else nl[:, 0], 0) for name, r in ex.items()}
            cands.append((f.to(dtype), v, a, k, ex, enc["deepstack"][safe] if deeps is not None else None))
        probes = [None] * len(spec.samples)
        if spec.probe is not None and e.needs.vision_stage:  # the LLM probe on the unpruned rows (llava.fast.probe)
            probes = run_probe(e.lm, spec.probe, probe_in, [c[0] for c in cands], [s.tokens for s in spec.samples],
                               [s.text for s in spec.samples])
        outs, sigs, origins, counts = [], [], [], []
        for s, (f, v, a, k, ex, dsf), probe in zip(spec.samples, cands, probes):
            at = {name: (o, n) for name, o, n in s.parts}
            if not e.needs.vision_stage:
                if deeps is not None:
                    deeps.append(dsf)
                outs.append(f)
                sigs.append(None)
                origins.append(torch.arange(f.shape[0], device=f.device))
                counts.append(torch.full((), f.shape[0], dtype=torch.long, device=f.device))
                continue
            if s.extra:  # each unit's [CLS] as an extra candidate (projected like a patch)
                hs, ca, ks, extra, proj, pdt = clip
                o, n = at["units"]
                units = index[o:o + n]
                f = torch.cat([f, proj(hs[units, :1].to(pdt))[:, 0].to(dtype)])
                v = torch.cat([v, hs[units, 0]])
                if a is not None:
                    a = torch.cat([a, ca[units, :, 0]])
                    k = torch.cat([k, ks[units, 0]])
                ex = {name: torch.cat([r, extra[name][units, :, 0] if name.startswith(HEAD_PREFIXES)
                                       else extra[name][units, 0]]) for name, r in ex.items()}
            text = None
            if s.text:
                o, n = at["text_rows"]
                text = text_flat[index[o:o + n]]
            sig = self.planner._sample_signals(s, index, f, v, a.T.contiguous() if a is not None else None, k,
                                               spec.kind, text, ex, probe)
            sel = method.select_vision(sig)
            if sel.num_out != s.outputs:
                raise RuntimeError(f"{method.name} gave {sel.num_out} outputs where the plan has {s.outputs}")
            flags = sel.flags(sig.num_tokens, s.tokens, malformed_only=True)
            for name in Selection.MALFORMED:
                if name in flags:
                    bad = bad | flags[name]
            if spec.newlines and sel.space == "vision" and sel.targets is not None and sel.targets.numel():
                tg, asg = sel.targets, sel.assign  # the eager engine refuses merging newlines in vision space
                bad = bad | sig.is_newline[tg].any() | (sig.is_newline & (asg >= 0)).any()
            feats, origin = materialize(sig, sel, adapter.project)
            if deeps is not None:  # kept with a kept token, merged by the selection's rule (the eager engine's)
                deeps.append(carry_rows(dsf, sel))
            outs.append(feats.to(dtype))
            sigs.append(sig)
            origins.append(origin)
            counts.append(sel.count if sel.count is not None
                          else torch.full((), sel.num_out, dtype=torch.long, device=feats.device))
        return outs, sigs, origins, counts, bad

    def _clip_tower(self, px, crops, spec) -> dict:
        """The CLIP tower of a captured prefill (LLaVA-1.5 / NeXT / Video-LLaVA) over every unit: the select
        layer's states ``hs`` (N, S, Dv), the projected features ``feats`` (N, S - off, D), the [CLS] attention /
        keys (``ca`` / ``ks``) where the method reads them, and the extra tower-layer signals (``x:<name>``, per
        tower token) or the in-tower stage's survivors (``in_tower_kept``)."""
        e = self.engine
        adapter, method = e.adapter, e.method
        tower = adapter.tower_for(spec.key)
        fl = e.model.config.vision_feature_layer
        x = px.flatten(0, px.dim() - 4)  # (N, 3, H, W): images / crops / frames
        if spec.crops:
            x = x[crops]
        out = {}
        if self.engine.needs.tower_stage:  # the in-tower stage, masked: every unit at its S tokens, the
            with _no_output_capture():  # survivors as a mask (zero states elsewhere); layers called one by one
                hs, kept = run_tower_masked(tower, x, fl, method, spec.kind, cls_in_llm=not spec.drop_cls)
            out["x:in_tower_kept"] = kept
        else:
            hs, ca, ks, extra = run_tower(tower, x, fl, e.env.tower)  # the eager engine's run and signals
            if ca is not None:
                out["ca"], out["ks"] = ca, ks
            out.update({f"x:{k}": v for k, v in extra.items()})
        # one projector call, as the stock model (tokens dropped inside the tower: zero features)
        out.update(hs=hs, feats=clip_features(hs, adapter.core.multi_modal_projector, spec.drop_cls,
                                              out.get("x:in_tower_kept")))
        return out

    def _clip_flat(self, t: dict, spec):
        """:meth:`_clip_tower`'s outputs ``t`` per tower token of every unit (flattened, as the eager engine's
        :func:`llava.families.clip.clip_tokens`): the projected features, the select layer's states, the [CLS]
        attention / keys and the extra tower-layer signals; and what the [CLS] candidates are built from (hidden
        states, [CLS] attention, keys, extras, projector, its dtype)."""
        hs, ca, ks = t["hs"], t.get("ca"), t.get("ks")
        extra = {k[2:]: v for k, v in t.items() if k.startswith("x:")}  # name -> (N, H, S) / (N, S, ...)
        flat = clip_tokens(hs, t["feats"], ca, ks, extra, spec.drop_cls)
        proj = self.engine.adapter.core.multi_modal_projector
        exf = {k: v for k, v in flat.items() if k in extra}
        return (flat["features"], flat["vision_features"], flat.get("cls_attn"), flat.get("keys"), exf,
                (hs, ca, ks, extra, proj, param_dtype(proj)))

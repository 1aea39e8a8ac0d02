"""The fast path's vision stage inside the captured functions (:class:`CapturedVision`, which
:class:`llava.fast.path.FastPath` keeps beside its host planner): the
tower (the CLIP tower, masked for an in-tower stage, or the family's own static-shape encoder), each sample's
candidates with their signals, the LLM probe and the method's selection, materialised into its outputs. Apart from
:mod:`llava.fast.path`, which runs it inside the prefill graphs; see there for the whole path."""

from __future__ import annotations

import torch

from ..candidates import gather_tokens, with_cls
from ..families.clip import clip_cls, clip_features, clip_tokens, run_tower, run_tower_masked
from .llm import _no_output_capture
from .plan import HostPlanner, _Spec
from .probe import run_probe
from ..method import Selection
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
            tokens = {k: enc[k] for k in ("features", "vision_features", "cls_attn", "keys") if k in enc}
            clip = None
        else:
            tokens, clip = self._clip_flat(enc, spec)
        if deeps is not None:
            tokens["deepstack"] = enc["deepstack"]
        newline = adapter.newline() if spec.newlines else None
        bad = torch.zeros((), dtype=torch.bool, device=tokens["features"].device)
        cands = []  # per sample: its stock candidates (features, tower features, [CLS] attention, keys, extras)
        for s in spec.samples:
            o, n = dict((name, (o, n)) for name, o, n in s.parts)["src"]
            c = gather_tokens(tokens, index[o:o + n], newline)  # newline rows as the eager engine fills them
            c["features"] = c["features"].to(dtype)
            cands.append(c)
        probes = [None] * len(spec.samples)
        if spec.probe is not None and e.needs.vision_stage:  # the LLM probe on the unpruned rows (llava.fast.probe)
            probes = run_probe(e.lm, spec.probe, probe_in, [c["features"] for c in cands],
                               [s.tokens for s in spec.samples], [s.text for s in spec.samples])
        outs, sigs, origins, counts = [], [], [], []
        for s, c, probe in zip(spec.samples, cands, probes):
            at = {name: (o, n) for name, o, n in s.parts}
            dsf = c.pop("deepstack", None)
            if not e.needs.vision_stage:
                if deeps is not None:
                    deeps.append(dsf)
                f = c["features"]
                outs.append(f)
                sigs.append(None)
                origins.append(torch.arange(f.shape[0], device=f.device))
                counts.append(torch.full((), f.shape[0], dtype=torch.long, device=f.device))
                continue
            if s.extra:  # each unit's [CLS] as an extra candidate (projected like a patch)
                o, n = at["units"]
                cls = clip_cls(*clip, units=index[o:o + n])
                cls["features"] = cls["features"].to(dtype)
                c = with_cls(c, cls)
            text = None
            if s.text:
                o, n = at["text_rows"]
                text = text_flat[index[o:o + n]]
            sig = self.planner._sample_signals(s, index, c, spec.kind, text, probe)
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
        attention / keys and the extra tower-layer signals; and what :func:`llava.families.clip.clip_cls` builds the
        [CLS] candidates from (hidden states, [CLS] attention, keys, extras, projector)."""
        hs, ca, ks = t["hs"], t.get("ca"), t.get("ks")
        extra = {k[2:]: v for k, v in t.items() if k.startswith("x:")}  # name -> (N, H, S) / (N, S, ...)
        return (clip_tokens(hs, t["feats"], ca, ks, extra, spec.drop_cls),
                (hs, ca, ks, extra, self.engine.adapter.core.multi_modal_projector))

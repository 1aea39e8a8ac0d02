"""The fast path's vision stage inside the captured functions (:class:`CapturedVision`, which
:class:`llava.fast.path.FastPath` keeps beside its host planner): the tower (the family adapter's static-shape run,
:meth:`~llava.families.base.FamilyAdapter.encode_static`), each sample's candidates with their signals, the LLM probe
and the method's selection, materialised into its outputs. Apart from :mod:`llava.fast.path`, which runs it inside
the prefill graphs; see there for the whole path."""

from __future__ import annotations

import torch

from ..candidates import gather_tokens, with_cls
from ..layers import no_output_capture
from .plan import HostPlanner, _Spec
from .probe import run_probe
from ..selection import Selection
from ..stage_step import ask_vision, vision_outputs


class CapturedVision:
    """The vision stage of the captured prefills of ``planner``'s engine: the tower, each sample's signals (laid out
    as ``planner`` planned them) and the method's selection."""

    def __init__(self, planner: HostPlanner):
        self.planner = planner
        self.env = planner.env

    def run_tower(self, px, spec, tower_in=None) -> dict:
        """The tower of a captured prefill, its outputs by name (the tower function of a prefill, run before the
        rest of the host plan; ``spec``: a :class:`llava.fast.plan._TowerSpec` or the prefill's ``_Spec``): the
        family's static-shape run of its plan ``spec.tower`` (:meth:`FamilyAdapter.encode_static`; ``tower_in`` the
        plan's tensors on the device)."""
        e = self.env
        with no_output_capture():  # blocks may run outside the tower's forward
            enc = e.adapter.encode_static(px, spec.tower, tower_in, e.tower)
        return {k: v for k, v in enc.items() if v is not None}

    def visual_outputs(self, px, index, spec: _Spec, dtype, text_flat, tower_in=None, deeps=None,
                        probe_in=None, tower_out: dict | None = None):
        """The vision stage of a captured prefill, per sample: the outputs (m, D) in ``dtype``, the
        signals, each output's source candidate, the real count (0-d; ``Selection.count`` of a padded
        selection) and the OR of every malformed flag. ``text_flat``: the new rows' embeddings, flattened
        (query-aware methods read their text block from them); ``tower_in``: the tower plan's tensors on the
        device; ``deeps``: a list that receives each
        sample's DeepStack rows (m, levels, D) carried through its selection (Qwen3-VL); ``probe_in``: the LLM
        probe's planned tensors (``spec.probe``, :mod:`llava.fast.probe`); ``tower_out``: :meth:`run_tower`'s
        outputs when the tower ran already (a function of its own), else it runs here."""
        e = self.env
        adapter, method = e.adapter, e.method
        enc = tower_out if tower_out is not None else self.run_tower(px, spec, tower_in)
        tokens = adapter.static_table(enc, spec.tower)  # per tower token, as the eager engine's table
        if deeps is None:
            tokens.deepstack = None
        newline = adapter.newline() if spec.newlines else None
        bad = torch.zeros((), dtype=torch.bool, device=tokens.features.device)
        cands = []  # per sample: its stock candidates (features, tower features, [CLS] attention, keys, extras)
        for s in spec.samples:
            c = gather_tokens(tokens, s.parts.src.of(index), newline)  # newline rows as the eager engine fills them
            c.features = c.features.to(dtype)
            cands.append(c)
        probes = [None] * len(spec.samples)
        if spec.probe is not None and e.needs.vision_stage:  # the LLM probe on the unpruned rows (llava.fast.probe)
            probes = run_probe(e.lm, spec.probe, probe_in, [c.features for c in cands],
                               [s.tokens for s in spec.samples], [s.text for s in spec.samples])
        outs, sigs, origins, counts = [], [], [], []
        for s, c, probe in zip(spec.samples, cands, probes):
            dsf, c.deepstack = c.deepstack, None
            if not e.needs.vision_stage:
                if deeps is not None:
                    deeps.append(dsf)
                f = c.features
                outs.append(f)
                sigs.append(None)
                origins.append(torch.arange(f.shape[0], device=f.device))
                counts.append(torch.full((), f.shape[0], dtype=torch.long, device=f.device))
                continue
            if s.extra:  # each unit's [CLS] as an extra candidate (projected like a patch)
                cls = adapter.static_cls(enc, spec.tower, s.parts.units.of(index))
                cls.features = cls.features.to(dtype)
                c = with_cls(c, cls)
            text = None
            if s.text:
                text = text_flat[s.parts.text_rows.of(index)]
            sig = self.planner._sample_signals(s, index, c, spec.kind, text, probe)
            sel = ask_vision(method, sig)
            if sel.num_out != s.outputs:
                raise RuntimeError(f"{method.name} gave {sel.num_out} outputs where the plan has {s.outputs}")
            flags = sel.flags(sig.num_tokens, s.tokens, malformed_only=True)
            for name in Selection.MALFORMED:
                if name in flags:
                    bad = bad | flags[name]
            if spec.newlines and sel.space == "vision" and sel.targets is not None and sel.targets.numel():
                tg, asg = sel.targets, sel.assign  # the eager engine refuses merging newlines in vision space
                bad = bad | sig.is_newline[tg].any() | (sig.is_newline & (asg >= 0)).any()
            # DeepStack rows: kept with a kept token, merged by the selection's rule (the eager engine's)
            feats, origin, deep = vision_outputs(sig, sel, adapter.project, dsf if deeps is not None else None)
            if deeps is not None:
                deeps.append(deep)
            outs.append(feats.to(dtype))
            sigs.append(sig)
            origins.append(origin)
            counts.append(sel.count if sel.count is not None
                          else torch.full((), sel.num_out, dtype=torch.long, device=feats.device))
        return outs, sigs, origins, counts, bad

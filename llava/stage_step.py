"""One stage step for both executors: the method asked at each stage by one function per hook (:func:`ask_vision`,
:func:`ask_llm`, :func:`ask_pixels`; the tower's hooks are asked by the tower, :mod:`llava.families.clip`; the probe a stage reads is
built by :func:`llava.attention_rows.sample_probe`), and a selection turned into its outputs (:func:`vision_outputs`,
:func:`llm_step`). The eager executor (:mod:`llava.layout`, :mod:`llava.staged`), the captured one
(:mod:`llava.fast.vision`, :mod:`llava.fast.llm`) and the captured plan's dry runs (:mod:`llava.fast.plan`) call them;
they differ only in how a selection is checked: the eager executor reads it on the host (:meth:`Selection.check`), the
captured one ORs its flags on the device and holds its count to the plan's."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .method import Method
from .selection import Selection
from .selection_rows import carry_rows, llm_outputs, materialize
from .signals import LLMSignals, VisionSignals
from .tower_signals import PixelSignals


def _checked(method: Method, sel, where: str) -> Selection:
    if not isinstance(sel, Selection):
        raise TypeError(f"{method.name}: {where} must return a Selection, got {type(sel).__name__}")
    return sel


def ask_pixels(method: Method, sig: PixelSignals) -> Selection:
    """The method's pre-tower stage on one image's pixels (:meth:`Method.select_pixels`): a selection of ``keep``
    (and optionally its device ``count``: the first ``count`` of ``keep``) only; nothing else means anything before
    the tower has run."""
    sel = _checked(method, method.select_pixels(sig), "select_pixels")
    extra = [f for f in ("targets", "order", "values") if getattr(sel, f) is not None]
    if extra:
        raise ValueError(f"{method.name}: select_pixels keeps tokens before the tower runs; its Selection may give "
                         f"`keep` only, not {', '.join(extra)}")
    return sel


def ask_vision(method: Method, sig: VisionSignals) -> Selection:
    """The method's vision stage on one sample's signals (:meth:`Method.select_vision`)."""
    return _checked(method, method.select_vision(sig), "select_vision")


def ask_llm(method: Method, stage: int, sig: LLMSignals) -> Selection:
    """The method's llm stage ``stage`` on one sample's signals (:meth:`Method.select_llm`)."""
    return _checked(method, method.select_llm(stage, sig), "select_llm")


def vision_outputs(sig: VisionSignals, sel: Selection, project, deep: torch.Tensor | None = None):
    """A vision-stage selection's outputs: features (m, D) in the signals' feature dtype and each output's source
    candidate (:func:`llava.selection_rows.materialize`), and the sample's DeepStack rows ``deep`` carried through it
    (None without)."""
    feats, src = materialize(sig, sel, project)
    return feats, src, (carry_rows(deep, sel) if deep is not None else None)


class StageOut(NamedTuple):
    """One sample's outputs of an llm stage, in output order: ``rows`` (m, D) their hidden states, ``src`` (m,) each
    one's source among the stage's visual tokens, ``pos`` its position (a merged token takes its target's),
    ``origin`` / ``entry`` its source candidate and index at decoder layer 0, ``deep`` its DeepStack rows (None
    without)."""

    sel: Selection
    rows: torch.Tensor
    src: torch.Tensor
    pos: torch.Tensor
    origin: torch.Tensor
    entry: torch.Tensor
    deep: torch.Tensor | None

    def permuted(self, perm: torch.Tensor) -> "StageOut":
        """The outputs reordered by ``perm`` (the eager executor's run order of a row with several runs)."""
        return self._replace(rows=self.rows[perm], src=self.src[perm], pos=self.pos[..., perm],
                             origin=self.origin[perm], entry=self.entry[perm],
                             deep=self.deep[perm] if self.deep is not None else None)


def llm_step(sel: Selection, one, deep: torch.Tensor | None = None) -> StageOut:
    """An llm-stage selection ``sel`` over one sample's rows ``one`` (:class:`llava.llm_stage.StageRows`) turned into
    its outputs (:func:`llava.selection_rows.llm_outputs`); ``deep``: the DeepStack rows still to add at its visual
    tokens, which follow the selection (a method's rewritten ``values`` carry their kept rows)."""
    rows, src = llm_outputs(one.x[one.vis], sel)
    carried = None
    if deep is not None:
        csel = sel
        if sel.values is not None:  # kept rows rewritten by the method (no merge targets): their rows follow
            if sel.targets is not None and sel.targets.numel():
                raise ValueError("an llm stage's Selection.values with merge targets cannot carry DeepStack rows")
            csel = Selection(keep=sel.keep, order=sel.order)
        carried = carry_rows(deep, csel)
    return StageOut(sel, rows, src, one.p[..., one.vis[src]], one.origin[src], one.entry[src], carried)

"""What the host plan hands a captured prefill: typed records of tensors (named tuples, so they travel through
``torch.compile`` and the upload as pytrees), planned on the host (:mod:`llava.fast.plan`, :mod:`llava.fast.llm`,
:mod:`llava.fast.probe`) and read inside the captured functions (:mod:`llava.fast.path`)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StageInputs(NamedTuple):
    """One llm stage of a captured prefill (:func:`llava.fast.llm.plan_stages`): ``vis`` the visual rows entering it
    (flattened over the samples, each within its own padded row), the next segment's rows: ``src`` their gather,
    ``ar`` / ``first`` their renumbering (reindex positions), ``pad`` their pad rows per sample (the 4-D mask is built
    from it on the device); ``text`` / ``text_mask`` the padded text-after block it shows the method (None where the
    method reads none); ``ds_at`` the next segment's visual rows, flattened, before the last DeepStack level (None
    after it)."""

    vis: torch.Tensor
    src: torch.Tensor
    ar: torch.Tensor
    first: torch.Tensor
    pad: torch.Tensor
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    ds_at: torch.Tensor | None = None


class ProbeInputs(NamedTuple):
    """The LLM probe's unpruned batch (:func:`llava.fast.probe.plan_probe`): ``tok`` (B, L) the ids with the
    placeholders zeroed, ``src`` (B * L) the gather from [their embeddings, every sample's stock visual rows], ``pos``,
    ``pad`` (B,) pad rows, ``real`` (B, L) bool, ``vis`` / ``text`` each sample's visual and text-block rows."""

    tok: torch.Tensor
    src: torch.Tensor
    pos: torch.Tensor
    pad: torch.Tensor
    real: torch.Tensor
    vis: torch.Tensor
    text: torch.Tensor


class PrefillInputs(NamedTuple):
    """One captured prefill's planned tensors (:meth:`llava.fast.plan.HostPlanner.plan_rows`): ``tok`` (B, bucket)
    the new rows' token ids, ``src`` their gather from [the embedded ids, every sample's outputs], ``pos`` their
    positions, ``pad`` (B,) their pad rows, ``index`` the signals' index buffer; ``vpos`` each sample's visual
    tokens' own positions in candidate order (M-RoPE), ``ds_at`` the visual rows entering layer 0, flattened
    (DeepStack), ``stages`` one :class:`StageInputs` per llm stage, ``probe`` the probe's batch."""

    tok: torch.Tensor
    src: torch.Tensor
    pos: torch.Tensor
    pad: torch.Tensor
    index: torch.Tensor
    vpos: torch.Tensor | None = None
    ds_at: torch.Tensor | None = None
    stages: tuple = ()
    probe: ProbeInputs | None = None

    @property
    def visual0(self) -> torch.Tensor:
        """The visual rows entering decoder layer 0 (flattened): the first llm stage's ``vis``."""
        return self.stages[0].vis

"""The rows a selection gives, on the device: its outputs (features or hidden states, and each output's source
token) and the per-token DeepStack rows carried through it and added back after each level. Shared by the eager
engine (:mod:`llava.layout`, :mod:`llava.staged`) and the fast path's captured prefill, so none of it reads the
host; apart from :mod:`llava.layout`, which plans the vision stage on the host."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .ops import merge_tokens
from .selection import Selection
from .signals import VisionSignals


def materialize(sig: VisionSignals, sel: Selection, project) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a selection: features (m, D) in the signals' feature dtype and each output's source
    candidate (m,), in output order: kept rows, then merged targets (``merge_tokens``; in vision space
    projected with ``project``) or the method's own ``values``. No host read: the eager engine and the
    fast path's captured prefill share it (the eager engine checks newline merges first)."""
    keep = sel.keep.to(sig.features.device)
    feats = [sig.features[keep]]
    src = [keep]
    if sel.values is not None:  # the method computed every output itself (e.g. PruMerge's k-NN sums)
        if sel.targets is not None:
            src.append(sel.targets.to(keep.device))
        v = sel.values.to(sig.features.device)
        if sel.space == "vision":
            v = project(v.to(sig.vision_features.dtype))
        feats = [v.to(sig.features.dtype)]
    elif sel.targets is not None and sel.targets.numel():
        x = sig.vision_features if sel.space == "vision" else sig.features
        merged = merge_tokens(x, sel)
        if sel.space == "vision":
            merged = project(merged.to(x.dtype))
        feats.append(merged.to(sig.features.dtype))
        src.append(sel.targets.to(keep.device))
    feats, src = torch.cat(feats), torch.cat(src)
    if sel.order is not None:
        o = sel.order.to(feats.device)
        feats, src = feats[o], src[o]
    return feats, src


def llm_outputs(xv: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of an llm stage's selection over the current visual tokens' hidden states ``xv`` (n, D):
    their rows (m, D) and each output's source token (m,), in output order: kept rows, then merged targets
    (``merge_tokens``), or the method's own ``values`` (m, D) (cast to the rows' dtype; eager engine), permuted by
    ``order``. No host read: the eager engine's staged decoder and the fast
    path's captured segments share it."""
    keep = sel.keep.to(xv.device)
    src, out = [keep], [xv[keep]]
    if sel.values is not None:  # the method computed every output's hidden state itself (VLM-Pruner's rewrite)
        if sel.targets is not None:
            src.append(sel.targets.to(xv.device))
        out = [sel.values.to(device=xv.device, dtype=xv.dtype)]
    elif sel.targets is not None and sel.targets.numel():
        src.append(sel.targets.to(xv.device))
        out.append(merge_tokens(xv, sel).to(xv.dtype))
    src, out = torch.cat(src), torch.cat(out)
    if sel.order is not None:
        o = sel.order.to(xv.device)
        src, out = src[o], out[o]
    return out, src


def regathered(parts: list[torch.Tensor], src: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The rows ``src`` along ``dim`` of ``parts`` joined, then a zero row: the eager executor's gather of a
    :func:`llava.plan.regather_plan` with a compact source (``parts``: the old rows it takes, then every sample's
    outputs; a pad reads the zero row). ``index_select``: the same copy as indexing, without its overhead on a CPU."""
    shape = list(parts[0].shape)
    shape[dim] = 1
    return torch.cat([*parts, parts[0].new_zeros(shape)], dim).index_select(dim, src)


def carry_rows(rows: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Per-token rows that travel with the tokens (Qwen3-VL's DeepStack rows, (n, L, D)) through a selection:
    (m, L, D) in output order; a kept token keeps its rows, a merged token gets its rows merged by the
    selection's rule (:func:`llava.ops.merge_tokens`, fp32, in the rows' own space). No host read."""
    if sel.values is not None:
        raise ValueError("a method that computes its outputs itself (Selection.values) cannot carry DeepStack rows")
    out, _ = llm_outputs(rows.flatten(1), sel)  # the same keep / merge / order as an llm stage's hidden states
    return out.view(-1, *rows.shape[1:])


class DeepStack(NamedTuple):
    """The DeepStack rows still to add in a prefill (Qwen3-VL): ``rows`` (n, levels, D) at the visual positions
    ``at`` (flat b * L + position, ascending: the stock model's row-major order); ``mask`` the (B, L) bool the stock
    text model is handed as ``visual_pos_masks`` (the eager executor's; None in a captured prefill)."""

    rows: torch.Tensor
    at: torch.Tensor
    mask: torch.Tensor | None = None


def _deepstack(rows: torch.Tensor, at: torch.Tensor, B: int, L: int) -> DeepStack:
    """The :class:`DeepStack` state of a prefill's (B, L) rows, its mask built from ``at``."""
    mask = torch.zeros(B * L, dtype=torch.bool, device=rows.device).index_fill_(0, at, True).view(B, L)
    return DeepStack(rows, at, mask)

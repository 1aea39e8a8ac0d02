"""The pre-tower stage (:meth:`llava.method.Method.select_pixels`), before the vision tower runs: each image's tokens
kept from its pixels, the prompt without the others' placeholders, and the layouts the tower then runs.

The rest of the prefill sees the kept tokens only, as if the prompt had held no others: the tower runs their patches
(the family's :meth:`~llava.families.base.FamilyAdapter.encode` of :func:`llava.families.base.kept_layout`), each
with its stock position inside the tower (Qwen's rotary (h, w), its learned table's resampling, Qwen2.5-VL's windows
of the full grid); in the LLM, a family that keeps positions (M-RoPE) gives every kept token and every text token its
position in the unpruned prompt, computed before this stage. One host read per prefill: the kept counts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .families.base import VisualLayout, kept_layout, visual_ids
from .families.base import to_device as _to_device
from .plan import without_tokens
from .stage_step import ask_pixels


class PreTower(NamedTuple):
    """A prefill's inputs after the pre-tower stage: the prompt's ``input_ids``, ``attention_mask`` and
    ``position_ids`` without the dropped tokens' placeholders (re-padded on the left; positions gathered), the
    ``layouts`` of the kept tokens, per sample its stock visual tokens (``stock``, for the stats), and the host copies
    of the new ids and real tokens (``ids_h``, ``valid_h``: the vision stage lays out its rows from them, no second
    read)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    layouts: list[VisualLayout]
    stock: list[int]
    ids_h: torch.Tensor
    valid_h: torch.Tensor


def pixel_stage(env, input_ids, attention_mask, position_ids, visual: dict, kinds: list[VisualLayout],
                pad_id: int = 0) -> PreTower:
    """Ask the method (``env``: :class:`llava.prefill.EngineEnv`) which tokens of each image the tower runs, and lay
    out the prompt without the others. ``position_ids``: the unpruned prompt's (the family's format), gathered with
    the kept tokens; ``pad_id``: the id the new left pads hold (never a placeholder's)."""
    adapter, method = env.adapter, env.method
    ids_h = input_ids.cpu()
    B, L = ids_h.shape
    valid_h = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
    at_h = visual_ids(ids_h, kinds, adapter.placeholder_name)  # per position its call-wide visual token (-1: text)
    stock = (at_h >= 0).sum(1).tolist()
    asked = []  # per kind: None (not pruned) or per unit its selection
    for k, lay in enumerate(kinds):
        units = adapter.pixel_units(visual, lay)
        if units is not None:
            units = [env.select(("pixels", k, u), lambda sig=sig: ask_pixels(method, sig)) for u, sig in enumerate(units)]
        asked.append((units, [int(n) for n in torch.bincount(lay.units.unit, minlength=len(lay.units.grid))]
                      if units is not None else None))
    sels = [sel for units, _ in asked if units is not None for sel in units]
    if not sels:
        return PreTower(input_ids, attention_mask, position_ids, kinds, stock, ids_h, valid_h)
    dev = input_ids.device
    counts = [sel.count.reshape(1).to(dev) if sel.count is not None else
              torch.full((1,), sel.keep.numel(), device=dev) for sel in sels]
    # the one host read: every image's kept tokens, then their counts (a selection's first `count`)
    flat = torch.cat([sel.keep.reshape(-1).long().to(dev) for sel in sels] + [c.long() for c in counts]).cpu()
    counts_h = flat[-len(sels):].tolist()
    new, at, dropped, j = [], 0, [], 0
    for (units, sizes), lay in zip(asked, kinds):
        if units is None:
            new.append(lay)
            dropped.append(torch.zeros(int(lay.units.src.numel()), dtype=torch.bool))
            continue
        offsets = torch.cumsum(torch.tensor([0] + sizes), 0)
        kept = []
        for u, (sel, n) in enumerate(zip(units, sizes)):
            k = flat[at:at + min(counts_h[j], sel.keep.numel())]
            at += sel.keep.numel()
            j += 1
            if not k.numel() or bool((k[1:] <= k[:-1]).any()) or int(k[0]) < 0 or int(k[-1]) >= n:
                raise ValueError(f"{method.name}: select_pixels must keep at least one of the image's {n} tokens, in "
                                 f"ascending order without repeats; image {u} got {k.tolist()[:16]}")
            kept.append(k + offsets[u])
        kept = torch.cat(kept)
        gone = torch.ones(int(lay.units.src.numel()), dtype=torch.bool)
        gone[kept] = False
        dropped.append(gone)
        new.append(kept_layout(lay, kept))
    if not any(bool(d.any()) for d in dropped):  # every token kept: the stock prompt, untouched
        return PreTower(input_ids, attention_mask, position_ids, new, stock, ids_h, valid_h)
    if any(pad_id == lay.token_id for lay in kinds):
        raise ValueError(f"the pad id {pad_id} is a placeholder's")
    gone = torch.cat(dropped)
    src = without_tokens(valid_h, (at_h >= 0) & gone[at_h.clamp(min=0)])
    real = src >= 0
    new_ids_h = torch.where(real, ids_h.gather(1, src.clamp(min=0)), torch.full_like(src, pad_id))
    src_d, new_ids, real_d = _to_device([src, new_ids_h, real.long()], dev)
    mask = real_d.to(attention_mask.dtype if attention_mask is not None else torch.long)
    pos = None
    if position_ids is not None:  # (rows..., B, L): each kept token's and text token's own, pads 0
        idx = src_d.clamp(min=0).expand(*position_ids.shape[:-2], -1, -1)
        pos = position_ids.gather(-1, idx) * real_d
    return PreTower(new_ids.to(input_ids.dtype), mask, pos, new, stock, new_ids_h, real)

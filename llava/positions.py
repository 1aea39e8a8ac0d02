"""The positions of a prefill, for both executors: the unpruned prompt's (:func:`prompt_positions`, from the caller's
``position_ids`` or the family's rule) and those of the rows a stage rebuilds (:func:`renumbered`, numbered on from
each row's first position, :func:`first_positions`). The eager executor runs them on the device tensors, the captured
one's host plan on their host copies; integer arithmetic, so both give the same numbers."""

from __future__ import annotations

import torch


def prompt_positions(adapter, input_ids, attention_mask, position_ids, visual: dict):
    """The unpruned prompt's positions in the language model's format and the model's position deltas (M-RoPE;
    else None): the caller's ``position_ids`` where given (:meth:`FamilyAdapter.caller_positions` checks their
    format), else the family's rule (:meth:`FamilyAdapter.rope_positions`: M-RoPE), else (None, None), the stock
    default (an arange over the padded row)."""
    if position_ids is not None:
        return adapter.caller_positions(position_ids), None
    rope = adapter.rope_positions(input_ids, attention_mask, visual)
    return (None, None) if rope is None else rope


def first_positions(position_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) each row's first real position, from 1-D ``position_ids`` (B, L) numbered on over its real tokens
    (``valid`` (B, L) bool): the last real position less the real tokens after the first."""
    return (position_ids * valid).amax(1) - (valid.long().sum(1) - 1)


def renumbered(mask: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """1-D positions of left-padded rows (``mask`` (B, W) 0 / 1, real rows after the pads): each row's real rows
    numbered on from its ``first`` position (B,); pads 0."""
    return (mask.cumsum(1) - 1).clamp(min=0) + first[:, None] * mask


def contiguous(position_ids: torch.Tensor, valid: torch.Tensor) -> bool:
    """Host: whether 1-D ``position_ids`` (B, L) number every row's real tokens (``valid``) one after another (what
    :func:`renumbered` continues; generate()'s are)."""
    first = first_positions(position_ids, valid)
    return bool(torch.equal(position_ids * valid, renumbered(valid.long(), first) * valid))

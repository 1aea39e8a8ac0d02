"""One sample at an llm stage, for both executors (the eager staged decoder, :mod:`llava.staged`, and the captured
segments, :mod:`llava.fast.llm`): the rows entering the stage (:class:`StageRows`), what its stages read of the
prefill (:class:`StageEntry`), and its :class:`~llava.signals.LLMSignals` built from them by one constructor
(:func:`stage_signals`). The rows after the stage are laid out by one gather planned on the host
(:func:`llava.plan.regather_plan`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .attention_rows import CachedRows, llm_attention_fns
from .signals import LLMSignals


class StageRows(NamedTuple):
    """One sample's rows entering an llm stage: ``x`` / ``p`` the hidden states (S, D) and positions ((S,), or (3, S)
    M-RoPE), ``prev`` their input to the layer before (None: not kept), ``vis`` the visual rows among them; per
    visual token ``origin`` its source candidate and ``entry`` its index among the visual tokens entering decoder
    layer 0; ``kv`` the layer before's cache rows of these S rows (None: its keys are recomputed); ``key_mask`` (S,)
    the real rows of a captured prefill's padded row (None: all S rows are real, the eager executor)."""

    x: torch.Tensor
    p: torch.Tensor
    prev: torch.Tensor | None
    vis: torch.Tensor
    origin: torch.Tensor
    entry: torch.Tensor
    kv: CachedRows | None = None
    key_mask: torch.Tensor | None = None


class StageEntry(NamedTuple):
    """What a sample's llm stages read of its prefill: ``visual`` (n0, D) its visual tokens' inputs to decoder layer
    0, ``text`` the text-after tokens' (None where the stage shows none), ``state`` the dict its stages share for one
    prefill, ``vision`` its vision stage's signals (or None)."""

    visual: torch.Tensor
    text: torch.Tensor | None
    state: dict
    vision: object


def stage_signals(lm, layer: int, rows: StageRows, entry: StageEntry, **text) -> LLMSignals:
    """A sample's :class:`LLMSignals` entering decoder ``layer`` of the language model ``lm``: its attention reads
    over ``rows`` (:func:`llava.attention_rows.llm_attention_fns`), the entry inputs of ``entry``; ``text``: the
    text-after fields as the executor lays them out (eager: ``text_after`` / ``question`` indices, ``subblocks``,
    ``_grad_fn``; captured: the padded ``text_after``, ``text_mask``, ``_num_text``)."""
    attn_fn, keys_fn, qv_fn = llm_attention_fns(lm, layer, rows.x, rows.prev, rows.p, rows.key_mask, prev_kv=rows.kv)
    return LLMSignals(layer=layer, hidden=rows.x, position_ids=rows.p, visual=rows.vis, origin=rows.origin,
                      visual_embeds=entry.visual[rows.entry], text_embeds=entry.text,
                      num_visual_entry=int(entry.visual.shape[0]), entry_visual_embeds=entry.visual, state=entry.state,
                      prev_hidden=rows.prev, vision=entry.vision, captured=rows.key_mask is not None,
                      key_mask=rows.key_mask, _attn_fn=attn_fn, _keys_fn=keys_fn, _qv_fn=qv_fn, _norm=lm.norm, **text)

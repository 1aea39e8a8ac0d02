"""Decoder layers run one by one, outside the language model's ``forward``: the one layer loop of both executors.

A prefill with llm stages runs the decoder a segment of layers at a time (the eager :mod:`llava.staged` and the
captured :mod:`llava.fast.llm`), so does a decode step after it, and an LLM probe runs the first layers of the unpruned
prompt without a cache (:mod:`llava.layout`, :mod:`llava.fast.probe`). Each calls :func:`run_layers`: the layers with
the masks the caller built (the eager executor's 2-D padding masks turned into each layer type's mask by
:func:`decoder_masks`; the captured executor's one 4-D bucket mask), Qwen3-VL's DeepStack rows added after the first
layers (:func:`add_deepstack`) and no output collector active (:func:`no_output_capture`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers.masking_utils import create_causal_mask
from transformers.utils import output_capturing

if TYPE_CHECKING:
    from .selection_rows import DeepStack


@contextmanager
def no_output_capture():
    """Layers (or tower blocks) called one by one, outside their model's ``forward``: no output collector is
    active, as none is when that ``forward`` is asked for no hidden states / attentions. Set explicitly,
    because transformers' capturing hooks read a ``ContextVar`` that dynamo cannot trace unless the
    collector was set inside the traced region (what the model's own ``forward`` does)."""
    token = output_capturing._active_collector.set(None)
    try:
        yield
    finally:
        output_capturing._active_collector.reset(token)


def first_full_layer(adapter, start: int, stop: int) -> int | None:
    """The first decoder layer in ``start..stop-1`` with attention (and a KV cache), None if all are linear."""
    return next((i for i in range(start, stop) if i not in adapter.linear_layers), None)


def decoder_masks(adapter, lm, h, mask, cache, pos, start: int, stop: int) -> list:
    """The attention mask of each decoder layer ``start..stop-1`` of one segment, by the layer's type: the causal
    mask built against the segment's first full-attention layer's cache for attention layers; for a hybrid
    model's linear-attention (Gated DeltaNet) layers the 2-D padding mask of this call's tokens, which the
    stock layer multiplies into its input (None for a one-token decode step, as transformers gives them)."""
    full = first_full_layer(adapter, start, stop)
    causal = None
    if full is not None:
        causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask, past_key_values=cache,
                                    position_ids=adapter.mask_positions(pos), layer_idx=full)
    linear = adapter.linear_layers
    if not linear:
        return [causal] * (stop - start)
    rec = mask[:, -h.shape[1]:] if mask is not None and mask.dim() == 2 and h.shape[1] > 1 else None
    return [rec if i in linear else causal for i in range(start, stop)]


def add_deepstack(h: torch.Tensor, ds: DeepStack, level: int) -> torch.Tensor:
    """Qwen3-VL's DeepStack after decoder layer ``level``: the level's rows added at the visual positions,
    the same arithmetic as the stock text model's ``_deepstack_process`` (rows cast to the hidden dtype)."""
    B, L, D = h.shape
    flat = h.reshape(B * L, D).clone()
    at = ds.at
    flat[at] = flat[at] + ds.rows[:, level].to(h.dtype)
    return flat.view(B, L, D)


def run_layers(lm, h, masks, pe, layers: range, ds: DeepStack | None = None, swap: dict | None = None, **kw):
    """Decoder layers ``layers`` of ``lm`` on rows ``h`` (B, L, D) at position embeddings ``pe``. ``masks``: each
    layer's attention mask (a list, from ``layers.start``) or one for all; ``ds``: DeepStack rows
    (:class:`llava.selection_rows.DeepStack`: ``rows`` (n, levels, D) at the flattened visual rows ``at``), level i
    added after layer i as the stock text model does;
    ``swap``: {layer: fn(h) -> h} layers run another way (the eager executor's reference-mode eager attention);
    ``kw``: every layer's keywords (cache, ``use_cache``, attention backend). Returns (h, the last layer's input)."""
    prev = h
    one = not isinstance(masks, list)
    with no_output_capture():
        for i in layers:
            prev = h
            if swap and i in swap:
                h = swap[i](h)
            else:
                h = lm.layers[i](h, attention_mask=masks if one else masks[i - layers.start], position_embeddings=pe,
                                 **kw)
            if ds is not None and i < ds.rows.shape[1]:
                h = add_deepstack(h, ds, i)
    return h, prev


def entering(lm, h, masks, pe, ks, ds: DeepStack | None = None) -> dict:
    """The hidden states entering each decoder layer of ``ks`` in a forward of rows ``h`` without a cache (an LLM
    probe's unpruned prompt), the layers run once up to the last of them; ``masks`` / ``ds`` as :func:`run_layers`
    (a list of masks: from layer 0)."""
    out, at = {}, 0
    for k in sorted(ks):
        h, _ = run_layers(lm, h, masks[at:k] if isinstance(masks, list) else masks, pe, range(at, k), ds)
        out[k], at = h, k
    return out

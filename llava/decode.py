"""One decode step over either cache: the one body both executors run for every token after the prompt.

After a prefill a decode step runs the decoder on the new token(s) against the prompt's KV cache. With llm stages the
cache is pruned differently before each stage layer, so the decoder runs in segments of layers, each with its own
mask (its prompt part of the cache, then the generated tokens) and its own positions (what the stages dropped before
it, when the method renumbers); without llm stages the stock language model's ``forward`` runs the whole decoder on
one mask and one set of positions, as generate would run it unpruned. :func:`decode_step` is that step, for the eager
executor (:meth:`llava.staged.StagedDecoder.decode`, under transformers' compiled decode step too) and the captured one
(:meth:`llava.fast.path.FastPath.decode`, inside its one decode graph).

What the executors hand it differently is shape policy only, as data: a :class:`DecodeShape` (the segments' first
layers, fixed by the prefill, and the :class:`MaskLayout` of their masks, fixed by the executor's cache) and, per step,
each segment's mask in that layout and its positions. How a step gets those is the executor's: the eager one maps
generate's mask and positions, which describe the unpruned prompt, onto each segment (a dynamic cache: generate's 2-D
mask, one column wider per step; a static one: the engine's own masks of the cache's width, built outside the step);
the captured one owns a static cache of fixed width and marks the step's slot in its 4-D masks in place, its positions
a tensor base + the step. Neither reads a Python integer that changes per step inside the step, so each compiles to
one graph.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .layers import decoder_masks, run_layers


class MaskLayout(enum.Enum):
    """How each segment's mask of a decode step is laid out."""

    #: (B, kv) 2-D padding mask (1: a real token's slot): each layer type's mask is built from it against the cache
    #: (:func:`llava.layers.decoder_masks`, or the stock ``forward``'s own), as wide as the cache after the step
    #: (dynamic) or as the cache (static): the eager executor's
    PADDING = "padding"
    #: (B, 1, q, C) bool over a static cache's C slots: the slots the query may see, handed to the attention layers as
    #: it is (a hybrid decoder's linear-attention layers get none: a generated token is never padding): the captured
    #: executor's
    SLOTS = "slots"


@dataclass(frozen=True)
class DecodeShape:
    """The shape policy of a decode step (:func:`decode_step`): ``starts`` the first decoder layer of each segment of
    layers (0 first; ``()`` without llm stages: the stock language model runs the whole decoder), ``layout`` how each
    segment's mask is laid out. Hashable: the captured decode's graph key holds it."""

    starts: tuple[int, ...]
    layout: MaskLayout


def decode_step(lm, adapter, shape: DecodeShape, h: torch.Tensor, masks, positions, cache, use_cache: bool = True,
                **kw) -> torch.Tensor:
    """One decode step of the language model ``lm`` (the family ``adapter``'s) on the new tokens' embeddings ``h``
    (B, q, D) against ``cache``: per segment of ``shape.starts`` its mask ``masks[s]`` (laid out as ``shape.layout``)
    and its positions ``positions[s]`` ((B, q); (rows, B, q) on M-RoPE; without llm stages ``None``: the stock rule,
    after the cache). ``masks`` / ``positions``: a list per segment or a tensor with one leading row per segment.
    ``kw``: every layer's (or the stock ``forward``'s) other keywords. Returns the final norm's hidden states
    (B, q, D)."""
    mixed = adapter.linear_layers  # a hybrid decoder's linear-attention layers
    if not shape.starts:  # no llm stage: the stock language model on the (possibly shortened) cache
        mask = masks[0]
        if shape.layout is MaskLayout.SLOTS and mixed:  # one mask per layer type
            mask = {"full_attention": mask, "linear_attention": None}
        return lm(inputs_embeds=h, attention_mask=mask, position_ids=positions[0], past_key_values=cache,
                  use_cache=use_cache, **kw).last_hidden_state
    bounds = (*shape.starts, len(lm.layers))
    for s in range(len(shape.starts)):
        a, z, pos = bounds[s], bounds[s + 1], positions[s]
        if shape.layout is MaskLayout.PADDING:
            layer_masks = decoder_masks(adapter, lm, h, masks[s], cache, pos, a, z)
        elif mixed:
            layer_masks = [None if i in mixed else masks[s] for i in range(a, z)]
        else:
            layer_masks = masks[s]
        # positions travel in the rotary embeddings: no position_ids, so no attention backend reads their gaps
        h, _ = run_layers(lm, h, layer_masks, lm.rotary_emb(h, position_ids=pos), range(a, z),
                          past_key_values=cache, use_cache=use_cache, **kw)
    return lm.norm(h)

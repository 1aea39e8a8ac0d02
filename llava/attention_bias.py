"""An additive bias on the decoder's attention logits, for a method that declares one (``Method.biases_attention``;
``docs/architecture.md``, "Attention bias").

While such a method is attached, every decoder attention layer runs the attention function :data:`NAME`, registered
with transformers' ``AttentionInterface``: each attention module's config is a copy that names it (the language
model's own config, its masks and the vision tower are untouched), and the function is the model's own attention
(SDPA or eager, :data:`WRAPS`) with the bias added to the mask it is handed. Detaching restores every module.

The bias belongs to one prompt: after the vision stage the engine hands the method the rows the decoder will run
(:class:`PromptKeys`) and keeps its answer (:class:`AttentionBias`) in the :class:`BiasSlot` every layer reads:

- at the prefill each query row adds ``keys`` (or ``layer_keys[layer]``) of every key and ``pair`` [query, key];
- at each decode step the new query adds ``keys`` (or ``layer_keys[layer]``) of every prompt key and nothing for the
  tokens generated since (``pair`` is a prefill term).

The terms are summed in fp32 (a term in the model's dtype is promoted), placed where the model's mask allows (its
minimum elsewhere) and rounded to the model's dtype once. No host read; the eager engine only (the captured prefill
refuses a bias, ``llava/fast/refusals.py``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .families.base import to_device

NAME = "vtprune_bias"
#: the decoder attention implementations the bias wraps (each takes a dense additive mask)
WRAPS = ("sdpa", "eager", "python_sdpa")


@dataclass
class PromptKeys:
    """The rows one prefill's decoder runs, as a method's :meth:`~llava.method.Method.attention_bias` reads them.

    positions: (B, L) long, each row's position (what the rotary embedding gets; padding 0);
    sizes:     (B, L) float32, how many tokens of the unpruned prompt each row stands for (text and a kept visual
               token 1, a merged token its members: :meth:`llava.selection.Selection.sizes`);
    visual:    (B, L) bool, the visual rows; real: (B, L) bool, the rows that are not padding;
    pruned:    (B,) bool, the samples the vision stage changed (the others are the stock model's rows: a method
               that leaves them as the stock model has them gives them no bias);
    inv_freq:  (d / 2,) float32, the decoder's rotary frequencies (:func:`rotary_frequencies`);
    dtype:     the decoder's dtype;
    max_positions: a bound on every position and distance (the decoder's ``max_position_embeddings``, or the
               unpruned prompt's length if longer)."""

    positions: torch.Tensor
    sizes: torch.Tensor
    visual: torch.Tensor
    real: torch.Tensor
    pruned: torch.Tensor
    inv_freq: torch.Tensor
    dtype: torch.dtype
    max_positions: int


@dataclass
class AttentionBias:
    """A method's additive logit terms for one prompt: ``keys`` (B, L) per key row, at the prefill and at every decode
    step; ``layer_keys`` the same for the layers named (instead of ``keys``); ``pair`` (B, L, L) [query, key] at the
    prefill only (None: none). fp32, or the model's dtype where a method rounds a term as its reference does."""

    keys: torch.Tensor
    pair: torch.Tensor | None = None
    layer_keys: dict[int, torch.Tensor] = field(default_factory=dict)


class BiasSlot:
    """The current prompt's bias, read by every decoder attention layer (None: the model's own attention), and the
    masks built from it (a prefill's: one per distinct ``keys`` term; a decode step's: per its mask)."""

    def __init__(self, impl: str):
        self.impl = impl
        self.bias: AttentionBias | None = None
        self.prefill = False
        self._memo: list = []
        #: the decoder's rotary frequencies in fp32 (:func:`rotary_frequencies`), set at install
        self.inv_freq: torch.Tensor | None = None

    def set(self, bias: AttentionBias | None, prefill: bool = True) -> None:
        self.bias, self.prefill, self._memo = bias, prefill, []

    def decoding(self) -> None:
        """The prompt ran: later calls are decode steps."""
        self.prefill, self._memo = False, []

    def mask(self, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask) -> torch.Tensor:
        """The additive mask of one layer's call: the bias where ``attention_mask`` (bool: True attends; float: 0
        attends; None: causal) allows, the dtype's minimum elsewhere, in the query's dtype."""
        b = self.bias
        keys = b.layer_keys.get(layer, b.keys)
        Lq, Lk = query.shape[-2], key.shape[-2]
        for k_, m_, lq, lk, out in self._memo:  # the same term and mask object: the same mask
            if k_ is keys and m_ is attention_mask and (lq, lk) == (Lq, Lk):
                return out
        if attention_mask is None:  # causal over the keys (the last Lq of them are the queries)
            ar = torch.arange(Lk, device=query.device)
            allowed = (ar[None, :] <= ar[Lk - Lq:, None])[None, None]
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[..., :Lk]
        else:
            allowed = attention_mask[..., :Lk] == 0
        L = keys.shape[-1]
        kb = keys.float()
        if Lk > L:  # keys generated after the prompt: no term
            kb = torch.nn.functional.pad(kb, (0, Lk - L))
        add = kb[:, None, None, :Lk]
        if self.prefill and b.pair is not None:  # a static cache's keys run past the prompt: no term there
            pair = b.pair if Lk <= L else torch.nn.functional.pad(b.pair, (0, Lk - L))
            add = add + pair[:, None, :, :Lk]
        out = torch.where(allowed, add, torch.finfo(query.dtype).min).to(query.dtype)
        self._memo = (self._memo + [(keys, attention_mask, Lq, Lk, out)])[-2:]
        return out


def bias_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention-function signature: the wrapped implementation with the slot's bias in the mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    slot: BiasSlot = module._vtprune_bias
    if slot.impl == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward as inner
    else:
        inner = ALL_ATTENTION_FUNCTIONS[slot.impl]
    if slot.bias is not None:
        attention_mask = slot.mask(module.layer_idx, query, key, attention_mask)
    return inner(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make :data:`NAME` an attention function transformers knows (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, bias_attention)


def refusal(lm) -> str | None:
    """Why the decoder ``lm`` cannot take a bias (None: it can)."""
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl not in WRAPS:
        return (f"the decoder runs {impl!r} attention, which takes no dense additive bias: load the model with "
                f"attn_implementation='sdpa' (or 'eager')")
    return None


def rotary_frequencies(lm) -> torch.Tensor:
    """(d / 2,) float32: the decoder's rotary frequencies computed afresh from its config, as its rotary module does at
    init (its ``inv_freq`` buffer is cast with the model: fp16 in an fp16 model)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rot = lm.rotary_emb
    kind = getattr(rot, "rope_type", "default")
    fn = rot.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    inv_freq, _ = fn(rot.config)
    return inv_freq.float().to(rot.inv_freq.device)


def install(lm) -> tuple[BiasSlot, list]:
    """Route every attention layer of ``lm`` through :data:`NAME`; returns the slot they read and what
    :func:`uninstall` restores."""
    register()
    slot = BiasSlot(getattr(lm.config, "_attn_implementation", None) or "eager")
    slot.inv_freq = rotary_frequencies(lm)
    saved = []
    for layer in lm.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None:  # a linear-attention layer (hybrid decoders): no logits to bias
            continue
        cfg = copy.copy(attn.config)
        cfg._attn_implementation_internal = NAME
        saved.append((attn, attn.config))
        attn.config, attn._vtprune_bias = cfg, slot
    return slot, saved


def uninstall(saved: list) -> None:
    for attn, cfg in saved:
        attn.config = cfg
        del attn._vtprune_bias


def prompt_keys(embeds: torch.Tensor, mask, pos, layouts: list, sizes: list | None, noop: list, lm,
                inv_freq: torch.Tensor, prompt_len: int) -> PromptKeys:
    """The :class:`PromptKeys` of the rows a prefill's decoder runs: ``embeds`` (B, L, D), the 2-D ``mask`` and 1-D
    ``pos`` (None: the stock default, an arange over the row), the rows' host ``layouts``
    (:class:`llava.plan.RowLayout`) and per sample its visual rows' sizes in row order (None: every row 1) and whether the stage left it unchanged
    (``noop``); ``lm`` the decoder, ``inv_freq`` its rotary frequencies in fp32, ``prompt_len`` the unpruned prompt's
    width. One upload of the visual rows."""
    B, L = embeds.shape[:2]
    dev = embeds.device
    *at, pruned = to_device([lay.real[lay.visual] for lay in layouts] + [~torch.tensor(noop, dtype=torch.bool)], dev)
    visual = torch.zeros(B, L, dtype=torch.bool, device=dev)
    size = torch.ones(B, L, dtype=torch.float32, device=dev)
    for b, rows in enumerate(at):
        visual[b].index_fill_(0, rows, True)
        if sizes is not None and sizes[b] is not None:
            size[b].index_copy_(0, rows, sizes[b].to(device=dev, dtype=torch.float32))
    real = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
    if pos is None:
        pos = torch.arange(L, device=dev)[None].expand(B, L)
    span = max(int(getattr(lm.config, "max_position_embeddings", 0) or 0), int(prompt_len), L)
    return PromptKeys(positions=pos, sizes=size, visual=visual, real=real, pruned=pruned, inv_freq=inv_freq,
                      dtype=embeds.dtype, max_positions=span)


def check_attach(name: str, needs, lm, include_cls: bool) -> None:
    """Refuse, at attach, what the kept positions and a bias cannot serve (``needs``: the method's :class:`Needs`)."""
    if needs.vision_positions == "keep":
        if not needs.vision_stage:
            raise ValueError(f"{name}: vision_positions='keep' places a vision stage's outputs; it has none")
        if include_cls:
            raise ValueError(f"{name}: vision_positions='keep' with [CLS] candidates: a [CLS] token has no position "
                             "in the prompt")
    if needs.attention_bias:
        if not needs.vision_stage or needs.llm_layers or needs.tower_stage:
            raise ValueError(f"{name}: an attention bias is built after the vision stage and holds for the whole "
                             "decoder: it needs a vision stage and no llm or in-tower stage")
        why = refusal(lm)
        if why:
            raise ValueError(f"{name}: {why}")

"""``attn_implementation="python_sdpa"``: attention as PyTorch's documented Python reference of
``scaled_dot_product_attention`` computes it, in the model's own dtype (fp16 in an fp16 run): ``q @ k^T`` rounded,
times ``1 / sqrt(d)`` rounded, the mask added, ``torch.softmax`` in that dtype, ``@ v``.

Released pruning code that replaced the LLM's attention with that Python function reproduces only under the same
arithmetic: SparseVLM's fork runs it in every decoder layer (``llava/model/language_model/utils.py``
``scaled_dot_product_attention``, called by ``LlamaDynamicvitSdpaAttention`` at inference), so its fp16 hidden
states differ from stock SDPA's by fp16 roundings in every layer. Load with
``llava.load(..., attn_implementation={"": "python_sdpa", "text_config": "python_sdpa", "vision_config": ...})``
for SparseVLM's reference numbers (docs/methods/sparsevlm.md); it is slow (the full (L, S) matrix) and meant for
reference runs, not for speed. The mask is transformers' eager one (0 / the dtype's minimum), which gives the same
probabilities as the official ``-inf`` causal bias (both underflow to exactly 0 in the softmax)."""

from __future__ import annotations

import math

import torch

NAME = "python_sdpa"


def python_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function signature: query (B, H, L, d), key / value (B, Hkv, S, d); returns the
    output (B, L, H, d) and the probabilities (B, H, L, S). ``scaling`` is ignored for ``1 / sqrt(d)`` (the
    reference's ``1 / math.sqrt(query.size(-1))``, a Python float that can differ from ``d ** -0.5`` in its last
    bit)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key / value head serves ``groups`` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    w = query @ key.transpose(-2, -1) * (1 / math.sqrt(query.size(-1)))
    if attention_mask is not None:
        m = attention_mask[..., : key.shape[-2]]
        w = w.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else w + m
    w = torch.softmax(w, dim=-1)
    return (w @ value).transpose(1, 2).contiguous(), w


def register() -> None:
    """Make ``python_sdpa`` a name transformers' ``attn_implementation`` accepts (idempotent), with the eager
    additive mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, python_sdpa_attention)
    AttentionMaskInterface.register(NAME, eager_mask)

"""The gradient of a layer-local proxy loss w.r.t. one sample's hidden states (TRIO / PIO-FVLM's saliency,
:meth:`llava.signals.LLMSignals.grad_saliency`): the proxy rows and the backward through one decoder layer, the
final norm and ``lm_head``. Apart from :mod:`llava.signals` because it is the engine's one backward pass."""

from __future__ import annotations

from typing import Callable

import torch

from .tp_shards import sharded_module


PROXY_ROWS = ("shifted", "last")


def proxy_rows(S: int, which: str = "shifted", num_rows: int = 4, device=None) -> torch.Tensor:
    """The rows of an S-token prompt whose next-token logits make the proxy loss (LongTensor on ``device``, made
    there: no host-to-device copy; ascending).
    "shifted" (official ``loss_mode="multi_pos"``, ``K_pos`` = ``num_rows``): the official code shifts the logits
    (``logits[..., :-1, :]``) and marks the last ``K_pos`` of the S - 1 shifted rows, i.e. rows
    max(0, S - 2 - t) for t < K_pos: the last prompt row itself is never read. "last": rows max(0, S - 1 - t)."""
    if which not in PROXY_ROWS:
        raise ValueError(f"proxy rows must be one of {PROXY_ROWS}, got {which!r}")
    n = int(num_rows)
    if n < 1:
        raise ValueError(f"proxy rows: need at least one row, got {num_rows!r}")
    top = S - 2 if which == "shifted" and S > 1 else S - 1
    return torch.arange(max(0, top - n + 1), top + 1, dtype=torch.long, device=device)  # {max(0, top - t): t < n}


def proxy_loss_grad(layer: torch.nn.Module, norm: torch.nn.Module, head: torch.nn.Module, rotary: torch.nn.Module,
                    x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, mask_fn: Callable | None = None
                    ) -> torch.Tensor:
    """dL/dx (S, D) for one sample's hidden states x (S, D) at positions ``pos`` ((S,), or M-RoPE (3, S)):
    L = mean over ``rows`` of CE(z_r, argmax z_r), z = head(norm(layer(x)))[rows] (TRIO's layer-local proxy loss,
    official ``_loss_on_current_layer`` ``multi_pos``).

    Runs under ``torch.inference_mode(False)`` + ``torch.enable_grad()`` on a detached clone of x (the harness's
    inference tensors cannot be saved for backward); the stock decoder layer with a causal mask of this one
    sequence (``mask_fn(h (1, S, D), pos (.., 1, S))``: the engine's mask for the layer; None = the layer's
    default, causal only on SDPA / FlashAttention), its rotary tables, no KV cache (the prefill's cache is never
    touched); ``torch.autograd.grad`` w.r.t. the clone only (weights keep ``requires_grad=False``: no ``.grad``
    is written), the graph freed on return. Numerics: the layer, the final norm and ``lm_head`` run in the
    model dtype (the norm's own fp32 upcast as the stock module does it); the logits are cast to fp32 for the
    cross-entropy and its argmax (as the official ``shift_logits.float()``); the backward runs in the model
    dtype, so the returned gradient is in the model dtype. Refused (RuntimeError) on a tensor-parallel
    (AutoTP-sharded) layer or head: its all-reduce linears are not set up for backward."""
    where = sharded_module([layer, head])
    if where is not None:
        raise RuntimeError(f"grad_saliency: {where} is sharded by tensor parallelism (DeepSpeed AutoTP); its "
                           "all-reduce linears are inference-only (no backward), so the gradient saliency cannot be "
                           "computed: run this method without tensor parallelism")
    if not hasattr(layer, "self_attn"):
        raise ValueError(f"grad_saliency: decoder layer {getattr(layer, 'layer_idx', '?')} ({type(layer).__name__}) "
                         "is a linear-attention layer of a hybrid model; the proxy loss runs a full-attention layer")
    with torch.inference_mode(False), torch.enable_grad():
        rows = rows.to(x.device).clone()  # an index is saved for backward: no inference tensor
        h = x.detach().clone().requires_grad_(True)  # a normal tensor (cloned outside inference mode)
        p = pos.detach().clone()[..., None, :]  # (1, S) or (3, 1, S)
        xb = h[None]
        mask = mask_fn(xb, p) if mask_fn is not None else None
        pe = rotary(xb, position_ids=p)
        y = layer(xb, attention_mask=mask, position_embeddings=pe, past_key_values=None, use_cache=False)
        y = y[0] if isinstance(y, tuple) else y
        z = head(norm(y[0, rows])).float()  # (R, V)
        loss = torch.nn.functional.cross_entropy(z, z.detach().argmax(-1))
        (g,) = torch.autograd.grad(loss, h, retain_graph=False, create_graph=False)
        del y, z, loss, pe, mask, xb
    return g.detach()

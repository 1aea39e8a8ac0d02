"""The fast path's prompt attention as a causal kernel over its padded bucket.

A captured prefill runs every prompt left-padded to a length bucket (static shapes), so its decoder attention
gets a 4-D boolean mask (:func:`llava.fast.llm.prompt_mask`: causal over the real rows, the pads seen by no real
row). SDPA's flash and cuDNN kernels take no mask, so under that mask a prefill runs the masked kernel: on an H100 /
H200 twice the time of the eager engine's causal kernel at 576 rows, and at LLaVA-NeXT's 2.9k rows enough to make
the fast unpruned prefill slower than the eager one (the GPU sessions' measurements under docs/results/).

Here the same attention runs as ``is_causal`` without a mask. Each sample's rows are rolled so that its real
rows come first (the pads last), which is right padding: a causal kernel over the rolled rows gives each real
row exactly the rows it sees under the mask; the outputs are rolled back. A pad row sees the real rows before
it (under the mask: itself alone): its output is never read (no real row attends to a pad, the decode masks the
pads' cache slots, the logits are the last row's), and it stays finite. The keys are the prefill's own rows, the
first ``L`` slots of the static cache (every prompt starts at slot 0). The roll is planned from the mask on
the device (``n`` real keys in the last row: left padding puts them last), two small kernels and four gathers a
layer, no host read.

It engages only where the fast path asks for it (the keyword :data:`KW` handed down the decoder layers to the
attention function) and only in SDPA's own function: ``install()`` wraps the ``"sdpa"`` entry of transformers'
attention functions with a delegate that passes every other call (the eager engine, the decode, the vision
towers, a non-causal module, a sliding-window layer) to the stock function unchanged. Which buckets:
``load(fast_attention=...)``, :func:`wants`."""

from __future__ import annotations

import torch

#: the keyword the fast path passes down the decoder layers to ask for the causal kernel
KW = "vtprune_bucket_causal"
#: ``fast_attention`` choices: ``auto`` = the causal kernel on a GPU for buckets of at least
#: :data:`AUTO_MIN_ROWS` rows (measured on an H200, 7B shapes: no gain at 640 rows, 4 % of the prefill at 3072;
#: below that the roll's kernels cost about what the masked kernel loses); ``causal`` every prompt bucket, any
#: device; ``masked`` the 4-D mask (SDPA's masked kernel)
MODES = ("auto", "causal", "masked")
AUTO_MIN_ROWS = 1024

_stock = None  # transformers' own sdpa function, once install() wrapped it


def wants(mode: str, rows: int, device: torch.device) -> bool:
    """Whether a prompt bucket of ``rows`` rows on ``device`` runs the causal kernel under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"fast_attention must be one of {MODES}, got {mode!r}")
    return mode == "causal" or (mode == "auto" and device.type == "cuda" and rows >= AUTO_MIN_ROWS)


def _gather_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with its rows along ``dim`` (2 for (B, H, L, D), 1 for (B, L, H, D)) taken per sample at ``index``
    (B, L)."""
    shape = [t.shape[0], 1, 1, 1]
    shape[dim] = index.shape[1]
    idx = index.view(shape[0], *([1] * (dim - 1)), index.shape[1], *([1] * (3 - dim)))
    return t.gather(dim, idx.expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1:]))


def causal_bucket(module, query, key, value, attention_mask, **kwargs):
    """SDPA of left-padded prompt rows as a causal kernel (the module docstring). ``query`` (B, H, L, D);
    ``key`` / ``value`` (B, Hkv, C, D), the prefill's rows in slots [0, L); ``attention_mask`` the bucket's 4-D
    boolean mask (B, 1, L, C). Returns what the stock function returns: (B, L, H, D) and no weights."""
    L = query.shape[2]
    n = attention_mask[:, 0, -1, :L].sum(-1)  # real rows per sample (the last row is real and sees them all)
    ar = torch.arange(L, device=query.device)
    roll = (ar[None, :] + (L - n)[:, None]) % L  # rolled row i = padded row (pad + i) mod L: real rows first
    back = (ar[None, :] - (L - n)[:, None]) % L
    q = _gather_rows(query, roll, 2)
    k = _gather_rows(key[:, :, :L], roll, 2)
    v = _gather_rows(value[:, :, :L], roll, 2)
    out, weights = _stock(module, q, k, v, None, **kwargs)  # no mask, L > 1 rows: is_causal
    return _gather_rows(out, back, 1), weights


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``"sdpa"`` attention with the fast path's causal-bucket request honoured (:data:`KW`)."""
    if (kwargs.pop(KW, False) and query.shape[2] > 1 and getattr(module, "is_causal", False) is True
            and not kwargs.get("sliding_window")  # a window lives in the mask only: keep it
            and attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4):
        return causal_bucket(module, query, key, value, attention_mask, **kwargs)
    return _stock(module, query, key, value, attention_mask, **kwargs)


def install() -> None:
    """Wrap transformers' ``"sdpa"`` attention function with :func:`_sdpa` (once per process; every call without
    :data:`KW` goes to the stock function unchanged)."""
    global _stock
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if current is _sdpa:
        return
    _stock = current
    AttentionInterface.register("sdpa", _sdpa)

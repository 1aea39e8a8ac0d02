"""The fast path's LLM probe (ConsensusDrop's ``probe_mode="attn"``): a vision stage that reads the attention
of decoder layer K from the question to the visual tokens of the *unpruned* prompt, inside the one captured
prefill.

The eager engine splices the unpruned batch, runs decoder layers 0..K-1 on it (no cache) and recomputes layer
K's causal softmax rows for the chosen text queries at the original positions
(:meth:`llava.layout.VisionStage._make_probe`). Here the host plans that unpruned batch the way it plans the
pruned rows: every row left-padded to a length bucket (the unpruned prompt's), its placeholder rows gathered
from each sample's stock visual features, contiguous positions (M-RoPE: the prompt's own), a 4-D causal mask;
the rows of the text after the image (the vision stage's padded text block, ``VisionSignals.text_rows``) and of
the visual tokens in it. On the device: the gather, layers 0..K-1 under the mask, then per sample layer K's
causal softmax rows of the padded text block (:func:`llava.attention_rows.probe_rows`, the eager engine's
function), the pads never attended (``key_mask``). ``probe_attention`` then returns (H, Q, T) over the whole padded text block; the
method reads its query rows through the block's masks (``text_rows``), as it reads the embeddings for its
``embed_cos`` probe. Nothing is read back. What is static (the bucket, the probe layers) is part of the graph
key (:class:`ProbeSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..attention_rows import sample_probe
from ..layers import entering
from ..positions import renumbered
from .inputs import ProbeInputs
from .llm import prompt_mask


@dataclass(frozen=True)
class ProbeSpec:
    """What is static about the probe of one captured prefill."""

    layers: tuple  # decoder layers whose attention the vision stage reads (sorted)
    bucket: int  # rows of the unpruned batch


def plan_probe(layers, rows, text_q: list, bucket_for, buckets, positions=None, first=None):
    """The host plan of the probe. ``rows``: per sample the unpruned prompt's :class:`llava.plan.RowLayout` (its
    ids, first visual position p0, visual tokens T); ``text_q``: per sample the padded text block's size Q (the
    vision stage's, rows p0 + T + i of the prompt for i < its real count); ``positions``: per sample (rows, n) the
    prompt's own positions (M-RoPE) or None (contiguous from each row's ``first`` position (B,), 0 without it).
    Returns (:class:`ProbeSpec`, :class:`llava.fast.inputs.ProbeInputs`: ``tok`` (B, L) the ids with the
    placeholders zeroed, ``src`` (B * L) the gather from [their embeddings, every sample's T stock visual rows],
    ``pos``, ``pad`` (B,) pad rows (the mask: :func:`llava.fast.llm.prompt_mask`, on the device), ``real`` (B, L)
    bool, ``vis`` (sum T) and ``text`` (sum Q) rows within each sample's padded row; a text pad points at the
    sample's last row)."""
    B = len(rows)
    lens = [int(lay.ids.numel()) for lay in rows]
    L = bucket_for(max(lens), buckets)
    tok = torch.zeros(B, L, dtype=torch.long)
    src = torch.arange(B * L).view(B, L).clone()
    pos = torch.zeros(B, L, dtype=torch.long) if positions is None else torch.zeros(
        positions[0].shape[0], B, L, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    vis, text, at = [], [], B * L
    for b, (lay, n, Q) in enumerate(zip(rows, lens, text_q)):
        ids, p0, T = lay.ids, lay.first, lay.tokens
        pad = L - n
        t = ids.clone()
        t[p0:p0 + T] = 0
        tok[b, pad:] = t
        src[b, pad + p0:pad + p0 + T] = at + torch.arange(T)
        at += T
        if positions is not None:
            pos[:, b, pad:] = positions[b]
        real[b, pad:] = True
        vis.append(pad + p0 + torch.arange(T))
        n_after = n - p0 - T
        i = torch.arange(Q)
        text.append(torch.where(i < n_after, pad + p0 + T + i, L - 1))
    if positions is None:  # 1-D: numbered on from each row's first position
        pos = renumbered(real.long(), first if first is not None else torch.zeros(B, dtype=torch.long))
    host = ProbeInputs(tok=tok, src=src.reshape(-1), pos=pos, pad=torch.tensor([L - n for n in lens]), real=real,
                       vis=torch.cat(vis), text=torch.cat(text))
    return ProbeSpec(layers=tuple(sorted({int(k) for k in layers})), bucket=L), host


def run_probe(lm, spec: ProbeSpec, t: dict, feats: list, tokens: list, text_q: list) -> list:
    """The probe on the device: per sample a function ``probe(layer, queries)`` -> (H, Q, T) fp32, layer K's
    causal softmax rows of the sample's padded text block on its visual tokens (the query kind is read by the
    method through the block's masks). ``t``: :func:`plan_probe`'s tensors on the device, ``feats``: per sample
    its T stock visual rows (model dtype), ``tokens`` / ``text_q`` per sample T and Q."""
    emb = lm.embed_tokens(t.tok)
    B, L, D = emb.shape
    h = torch.cat([emb.reshape(-1, D)] + [f.to(emb.dtype) for f in feats])[t.src].view(B, L, D)
    states = {0: h}
    if max(spec.layers) > 0:
        states = entering(lm, h, prompt_mask(t.pad, L, L), lm.rotary_emb(h, position_ids=t.pos), spec.layers)
    vis = t.vis.split(list(tokens))
    text = t.text.split(list(text_q))

    def rows_at(layer, b):
        if layer not in spec.layers:
            raise ValueError(f"probe layer {layer} was not planned (planned: {spec.layers})")
        return states[layer][b], t.pos[..., b, :]

    # the Q rows of the padded text block whatever the queries (the method reads them through its masks)
    return [sample_probe(lm, partial(rows_at, b=b), lambda queries, _b=b: text[_b], vis[b], t.real[b])
            for b in range(B)]

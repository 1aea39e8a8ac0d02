"""FasterVLM (arXiv 2412.01818, "[CLS] attention is all you need for training-free visual token
pruning"): keep the top-T visual tokens per image / crop / frame by [CLS] attention, pre-LLM.

Doc: docs/methods/fastervlm.md. Official code: Theia-4869/FasterVLM, every change marked
``[FasterVLM]``: ``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select`` returns the
select-layer (-2) features and that layer's [CLS]->patch attention ``attentions[-2][:, :, 0, 1:]``)
and ``llava/model/llava_arch.py`` (``encode_images``: mean over heads, ``topk(T)`` per image / crop,
boolean index mask, project all features, keep the masked ones in original order;
``prepare_inputs_labels_for_multimodal`` forces ``mm_patch_merge_type = 'spatial'`` for LLaVA-NeXT).
Video-LLaVA: branch ``video`` of the same repository, ``videollava/model/llava_arch.py``
(``encode_videos``: per-frame head-mean [CLS] row, ``topk`` per frame, sorted) and
``videollava/model/multimodal_encoder/languagebind/__init__.py`` (``LanguageBindVideoTower.feature_select``
with ``select_feature='patch'`` drops each frame's [CLS], which stock Video-LLaVA feeds to the LLM).

Algorithm, per unit u: s = mean over heads of the [CLS]->token row of the select layer; keep the
top-T tokens of u by s (ties: lower index), in original order. Positions contiguous (pre-LLM).

Budget: ``budget`` = T = tokens entering the LLM **per image (LLaVA-1.5), per crop (LLaVA-NeXT),
per frame (Video-LLaVA)**; LLaVA-1.5 25/50/75/90/95 % reduction = T 432/288/144/58/29, and 64/128/192
directly; NeXT tables count 5*T. A unit with at most T tokens is kept whole (budget >= tokens: no-op).

Our design / options:

* ``cls_token`` (Video-LLaVA, where each frame's [CLS] is a visual token): ``"drop"`` (default, as the
  official video branch: [CLS] is never kept, T patches per frame), ``"rank"`` ([CLS] competes with
  its own [CLS]->[CLS] attention), ``"keep"`` ([CLS] + top-(T-1) patches). No effect on LLaVA-1.5 /
  NeXT (no [CLS] visual token there).
* ``keep_newlines``: the official code forces the 'spatial' layout (exactly 16/576 tokens per crop).
  With our 'spatial_unpad' layout each crop's candidates are the patches the unpadding keeps (the
  official unpad branch would select among all 576 before unpadding) and the newline tokens are kept as
  layout, not counted (default True, as the official unpad branch and ``random``); False drops them.
* ``numerics``: ``"ours"`` (default: fp32 head mean, ties to the lower index) or ``"official"`` (reference
  mode: the per-head [CLS] attention cast to the run's dtype before the head mean - the official tower returns
  its attentions ``.to(images.dtype)``, fp16 under its builder, fp32 in an fp32 run - the mean over heads in
  that dtype, and ``torch.topk``).
"""

from __future__ import annotations

import torch

from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, topk_desc, unit_layout
from llava.selection import Selection

CLS_TOKEN_MODES = ("drop", "rank", "keep")
#: dtype of the official [CLS] attentions after the tower under the official builder (cast to the fp16 image
#: dtype); the reference mode uses the run's own (fp32 in an fp32 run, as the official code run in fp32)
OFFICIAL_DTYPE = torch.float16


def fastervlm(cls_attn: torch.Tensor, unit: torch.Tensor, patch: torch.Tensor, budget: int, *,
              cls_token: str = "drop", keep_newlines: bool = True, numerics: str = "ours",
              layout=None, dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """Indices (ascending) of the tokens FasterVLM keeps: per unit the top-``budget`` tokens by the
    head-mean [CLS] attention, or the whole unit if it has at most ``budget`` tokens.

    cls_attn: (H, T) [CLS]->token attention per head; unit: (T,) unit id (-1 = NeXT newline);
    patch: (T,) patch index (-1 = [CLS] visual token, Video-LLaVA).
    ``numerics="official"`` (reference mode): scores = the mean of the per-head rows cast to ``dtype``, in that
    dtype, picks by ``torch.topk`` (official tie order); default: fp32 mean, ties to the lower index. ``dtype``:
    the official ``.to(images.dtype)``, fp16 under the official builder, fp32 when the official code runs in fp32
    (the method passes the run's own; an fp16 cast in an fp32 run made near-ties the official fp32 scores do not
    have: docs/methods/fastervlm.md).
    """
    check_numerics("fastervlm", numerics)
    if cls_token not in CLS_TOKEN_MODES:
        raise ValueError(f"fastervlm: cls_token must be one of {CLS_TOKEN_MODES}, got {cls_token!r}")
    if numerics == "official":
        scores = cls_attn.to(dtype).mean(0)  # as the official attentions' head mean, in images.dtype
    else:
        scores = cls_attn.float().mean(0)  # (T,) mean over heads (official)
    lay = layout if layout is not None else unit_layout(unit, patch)  # the one host sync (none when planned)
    kept = []
    for u in range(lay.num_units):
        idx = lay.tokens[u]
        if budget >= idx.numel():
            kept.append(idx)
            continue
        if cls_token == "rank":
            forced, cand, k = idx[:0], idx, budget
        elif cls_token == "keep":
            forced, cand = lay.cls[u], lay.patches[u]
            k = budget - forced.numel()
        else:  # drop
            forced, cand, k = idx[:0], lay.patches[u], budget
        if numerics == "official":
            top = scores[cand].topk(max(0, min(k, cand.numel()))).indices
        else:
            top = topk_desc(scores[cand], k)
        kept += [forced, cand[top]]
    if keep_newlines:
        kept.append(lay.newlines)
    return torch.cat(kept).sort().values if kept else unit.new_zeros(0)


@register
class FasterVLM(Method):
    """FasterVLM: keep the top-``budget`` tokens per image / crop / frame by head-mean [CLS]
    attention of the vision tower's select layer, in original order."""

    name = "fastervlm"
    capturable = "full"
    vision_stage = True
    needs_vision_attention = True

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "cls_token": Option("drop", CLS_TOKEN_MODES, doc="Video-LLaVA frame [CLS]: drop (official video branch)"),
            # LLaVA-NeXT 'spatial_unpad' newline tokens: keep as layout (not counted) or drop
            "keep_newlines": True,
            # "ours" (fp32 head mean, ties to the lower index) or "official" (reference mode: fp16
            # head mean of the fp16-cast attentions, torch.topk)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("fastervlm: a budget T (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        if self.numerics == "official":  # the [CLS] rows as the official eager tower computes them, in its dtype
            self.vision_attention_logits = "model"

    def select_vision(self, sig):
        return Selection(keep=fastervlm(sig.cls_attn, sig.unit, sig.patch, self.budget,
                                        cls_token=self.cls_token, keep_newlines=self.keep_newlines,
                                        numerics=self.numerics, layout=sig.unit_layout(patch=True),
                                        # reference mode: the official .to(images.dtype), the run's own dtype
                                        dtype=sig.features.dtype))

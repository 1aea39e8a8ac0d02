"""VisionZip (CVPR 2025, arXiv 2412.04467): dominant + contextual visual tokens, pre-LLM.

Doc: docs/methods/visionzip.md. Official code: dvlab-research/VisionZip (moved to
JIA-Lab-research/VisionZip), ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``),
``visionzip/main.py`` (``visionzip(model, dominant, contextual)`` passes ``dominant - 1`` patches to
the tower: the [CLS] token fills the first dominant slot) and ``visionzip/llava_arch.py``
(``restore_image_features_sorted``, LLaVA-NeXT).

Algorithm, per unit (LLaVA-1.5 image / LLaVA-NeXT crop / Video-LLaVA frame), on the CLIP select
layer (-2):

1. score every patch by its [CLS]->patch attention **summed over heads**;
2. dominant = [CLS] + the top-(D-1) patches (ties: lower index), in original index order, [CLS]
   first;
3. the remaining R tokens (original order) are merged into C contextual tokens: targets at positions
   0, s, 2s, ... (s = max(1, R // C), first C) of the remaining list, every other remaining token
   joins the target with the highest cosine similarity of the layer's head-mean keys, and a
   contextual token = target + mean(assigned), in vision-feature space (then projected);
4. output [dominant..., contextual...]; positions are contiguous (pre-LLM).

Budget: ``budget`` = D + C = tokens entering the LLM **per image (LLaVA-1.5), per crop (LLaVA-NeXT),
per frame (Video-LLaVA)**. The official splits are 54+10 / 108+20 / 162+30 for 64 / 128 / 192
(LLaVA-1.5), 27+5 / 54+10 / 108+20 per crop for LLaVA-NeXT; the Video-LLaVA per-frame split was not
released (our default 14+3 = 17 per frame, 136 per 8-frame video). Every split is reproduced by
C = round(B * 10 / 64), D = B - C, which is the rule for other budgets (our design). ``dominant`` /
``contextual`` override the split. A unit with at most D + C tokens is kept whole (so a budget at
least the token count is a no-op, bit-identical to the unpruned model).

The [CLS] slot (option ``cls_slot``):

* ``"cls"`` (default, official): the first dominant slot is the unit's [CLS] token. On Video-LLaVA the
  [CLS] of every frame is one of the LLM's visual tokens. On LLaVA-1.5 / NeXT the stock model drops
  [CLS] (select strategy "default"), but the official VisionZip tower returns it among the dominant
  tokens; we ask the engine for it (``include_cls_candidates``: each unit's [CLS], projected like a
  patch, is an extra candidate). If the signals carry no [CLS] for a unit (an engine without that
  signal), the slot goes to the next-best patch (as ``"patch"``).
* ``"patch"``: D patches, no [CLS] token is forced (a Video-LLaVA [CLS] is then an ordinary remaining
  token that may be merged). Keeps the D + C count with the stock visual tokens only (our variant).
* ``"empty"``: D-1 patches and no [CLS]: D - 1 + C tokens enter the LLM; on LLaVA-1.5 the remaining
  set (and so the contextual tokens) is then exactly the official one (our ablation).

Output order (option ``next_order``, :func:`llava.ops.block_order`): ``grid_raster`` (default,
official): per unit the tower output [dominant ([CLS] first, then original index order)...,
contextual...], units in prompt order - except LLaVA-NeXT grid crops, re-assembled as the official
``restore_image_features_sorted``: after the base crop's block, the grid crops' dominant patches in
row-major order on the full grid, then their [CLS] tokens, then their contextual tokens. ``unit``:
per unit [dominant, contextual] for NeXT too. ``spatial``: within a unit by source index (each
contextual token at its target's place; our variant). LLaVA-1.5 and Video-LLaVA have no grid crops:
``grid_raster`` = ``unit`` there. LLaVA-NeXT 'spatial_unpad' newline tokens are never scored or
merged; ``keep_newlines`` keeps them as layout after the unit blocks (not counted in the budget;
the official NeXT path feeds none - see docs/methods/visionzip.md).

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics. The official
tower runs in fp32 (LLaVA's loader leaves it fp32 with ``device_map='auto'``, as VisionZip's README loads
it), so scores, key metric and merge stay fp32 (our signals' dtype; fp16 signals are cast up); the
dominant patches are chosen by ``torch.topk`` of the head-summed [CLS] row (official tie order instead of
the lower index), and the assignment similarity is the official unclamped ``m / m.norm()`` followed by
``torch.bmm`` and ``argmax``. The merge itself (target + mean) is the engine's fp32 merge; it equals the
official fp32 ``bmm(one_hot^T, hidden) / counts`` up to fp32 summation order (the official tower output
is then cast to fp16: ``.to(images.dtype)``).
"""

from __future__ import annotations

import torch

from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import (contextual_merge, isin_small, masked_take, official_contextual_merge, per_unit_selection,
                       topk_desc, unit_layout)
from llava.selection import Selection

#: official dominant + contextual splits per budget (tokens per image / crop / frame)
OFFICIAL_SPLITS = {
    32: (27, 5),     # LLaVA-NeXT, per crop (paper: 135 + 25 for 5 crops)
    64: (54, 10),    # LLaVA-1.5; LLaVA-NeXT per crop (270 + 50)
    128: (108, 20),  # LLaVA-1.5; LLaVA-NeXT per crop (540 + 100)
    192: (162, 30),  # LLaVA-1.5
    17: (14, 3),     # Video-LLaVA per frame (our default; 136 per 8-frame video)
}

#: dtype of the official VisionZip tower's scores, key metric and merge (fp32 tower, see module doc)
OFFICIAL_DTYPE = torch.float32
CLS_SLOTS = ("cls", "patch", "empty")
ORDERS = ("grid_raster", "unit", "spatial")


def default_split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for ``budget`` tokens per unit: the official split where one exists,
    else C = round(B * 10 / 64) (half up), D = B - C, which reproduces every official split."""
    if budget in OFFICIAL_SPLITS:
        return OFFICIAL_SPLITS[budget]
    c = int(budget * 10 / 64 + 0.5)
    return budget - c, c


def visionzip(cls_attn: torch.Tensor, keys: torch.Tensor, unit: torch.Tensor, patch: torch.Tensor,
              dominant: int, contextual: int, *, cls_slot: str = "cls", keep_newlines: bool = True,
              num_stock: int | None = None, unit_pos: torch.Tensor | None = None,
              order: str = "grid_raster", numerics: str = "ours", layout=None, captured: bool = False) -> Selection:
    """VisionZip's selection for one sample (all its units).

    cls_attn: (H, T) [CLS]->token attention of the select layer, per head; keys: (T, d) head-mean
    keys of that layer (merge metric); unit: (T,) unit id (-1 = NeXT newline); patch: (T,) patch
    index (-1 = [CLS]); tokens ``num_stock``..T-1, if any, are extra [CLS] candidates that the stock
    model does not feed (LLaVA-1.5 / NeXT); unit_pos: (U, 2) NeXT grid position of each crop (-1 =
    base crop / image / frame). Returns a Selection over the T tokens: ``keep`` = dominant tokens
    (then newlines), ``targets`` / ``assign`` = contextual merge (target + mean, vision space),
    ``order`` = :func:`llava.ops.block_order` (``unit``: per unit [dominant..., contextual...];
    ``grid_raster``: the official NeXT re-assembly; same as ``unit`` without grid crops). ``captured``: the
    selection runs inside a captured prefill (or its host plan): the order is never compared with the
    identity on the host.
    """
    if cls_slot not in CLS_SLOTS:
        raise ValueError(f"visionzip: cls_slot must be one of {CLS_SLOTS}, got {cls_slot!r}")
    n = unit.numel()
    num_stock = n if num_stock is None else int(num_stock)
    dev = unit.device
    # the one host sync (none when the engine planned the layout: ``layout``)
    lay = layout if layout is not None else unit_layout(unit, patch, num_stock, unit_pos)
    if all(dominant + contextual >= lay.num_stock[u] for u in range(lay.num_units)):
        return Selection(keep=torch.arange(num_stock, device=dev))  # every unit fits: nothing pruned
    if numerics == "official":  # as the official (B, H, N) [CLS] slice's .sum(dim=1), fp32 tower
        scores = cls_attn.to(OFFICIAL_DTYPE)[None].sum(dim=1)[0]
    else:
        scores = cls_attn.float().sum(0)  # summed over heads (official)
    per_unit, assign, num_targets = [], torch.full((n,), -1, dtype=torch.long, device=dev), 0
    for u in range(lay.num_units):
        own = lay.tokens[u][: lay.num_stock[u]]  # the unit's tokens in the stock LLM input (ascending)
        if dominant + contextual >= own.numel():  # this unit fits: kept whole
            per_unit.append((u, own, own[:0]))
            continue
        cls = lay.cls[u][:1]  # the unit's [CLS]: a stock token (video) or an extra candidate
        cls_stock = lay.num_cls_stock[u] > 0
        patches = lay.patches[u][: lay.num_patch_stock[u]]
        if cls_slot == "cls" and cls.numel():
            forced, n_top = cls, dominant - 1
        elif cls_slot == "empty":
            forced, n_top = cls[:0], dominant - 1
        else:
            forced, n_top = cls[:0], dominant
        if numerics == "official":
            top = patches[scores[patches][None].topk(max(0, min(n_top, patches.numel())), dim=1).indices[0]]
            top = top.sort().values
        else:
            top = patches[topk_desc(scores[patches], n_top)].sort().values
        dom = torch.cat([forced, top])  # [CLS] first, then original index order (official)
        # original order; a stock [CLS] not forced stays here
        remaining = masked_take(own, ~isin_small(own, dom),
                                own.numel() - top.numel() - (forced.numel() if cls_stock else 0))
        merge = official_contextual_merge if numerics == "official" else contextual_merge
        tg, a = merge(keys, remaining, contextual, n)
        assign = torch.where(a >= 0, a + num_targets, assign)
        num_targets += tg.numel()
        per_unit.append((u, dom, tg))
    newlines = lay.newlines[: lay.num_newline_stock] if keep_newlines else unit.new_zeros(0)
    return per_unit_selection(per_unit, newlines, assign, lay.unit_pos, patch, order, grid=lay.grid,
                              captured=captured)


@register
class VisionZip(Method):
    """VisionZip: per image / crop / frame keep D dominant tokens ([CLS] + top-(D-1) patches by
    [CLS] attention) and C contextual tokens (key-similarity merge of the rest); budget = D + C."""

    name = "visionzip"
    capturable = "full"
    vision_stage = True
    needs_vision_attention = True

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # None = official split for the budget (54+10 / 108+20 / 162+30, NeXT 27+5 per crop,
            # video 14+3); give one (the other = budget - it) or both (then budget may be omitted)
            "dominant": None,
            "contextual": None,
            "cls_slot": Option("cls", CLS_SLOTS,
                               doc="what fills the first dominant slot: cls (official), patch, empty (see module doc)"),
            "next_order": Option("grid_raster", ORDERS,
                                 doc="multi-unit output order: grid_raster (official NeXT re-assembly; = unit without "
                                     "grid crops), unit (per unit [dominant, contextual]), spatial (by source index)"),
            # LLaVA-NeXT 'spatial_unpad' newline tokens: keep as layout (not counted) or drop
            "keep_newlines": True,
            # "ours" (ties to the lower index) or "official" (reference mode: torch.topk, the official
            # unclamped bmm similarity; scores / metric / merge fp32 as the official fp32 tower)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        d, c = self.dominant, self.contextual
        if self.budget is None:
            if d is None or c is None:
                raise ValueError("visionzip: give a budget (tokens per image / crop / frame) or both "
                                 "dominant= and contextual=")
        else:
            if d is None and c is None:
                d, c = default_split(self.budget)
            elif d is None:
                d = self.budget - c
            elif c is None:
                c = self.budget - d
            elif d + c != self.budget:
                raise ValueError(f"visionzip: dominant {d} + contextual {c} != budget {self.budget}")
        if isinstance(d, bool) or isinstance(c, bool) or int(d) != d or int(c) != c or d < 1 or c < 0:
            raise ValueError(f"visionzip: need dominant >= 1 and contextual >= 0 (whole numbers), got {d}, {c}")
        if self.numerics == "official":  # the [CLS] rows as the official eager tower computes them, in its dtype
            self.vision_attention_logits = "model"
        self.dominant, self.contextual = int(d), int(c)
        self.budget = self.dominant + self.contextual

    @property
    def include_cls_candidates(self) -> bool:
        """Ask the engine for each unit's [CLS] where the stock model drops it (LLaVA-1.5 / NeXT)."""
        return self.cls_slot == "cls"

    def select_vision(self, sig):
        return visionzip(sig.cls_attn, sig.keys, sig.unit, sig.patch, self.dominant, self.contextual,
                         cls_slot=self.cls_slot, keep_newlines=self.keep_newlines, num_stock=sig.num_stock,
                         unit_pos=sig.unit_pos, order=self.next_order, numerics=self.numerics,
                         layout=sig.unit_layout(patch=True, stock=True, pos=True), captured=sig.captured)

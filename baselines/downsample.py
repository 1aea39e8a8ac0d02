"""Downsample control (VTC-Bench, arXiv 2510.07143, "Are We Using the Right Benchmark: An Evaluation
Framework for Visual Token Compression Methods"): average-pool each image's / crop's / frame's patch
grid with non-overlapping s x s windows, pre-LLM.

Doc: docs/methods/downsample.md. Official code: Chenfei-Liao/VTC-Bench at 983e443,
``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py`` (``VTC_IMAGE_RATIO``: PIL bicubic resize of the
image to (w // s, h // s), JPEG re-encode, stock processor). VTC-Bench downsamples **pixels** on
dynamic-resolution models; LLaVA resizes every image to a fixed size, so pixel downsampling would not
change its token count. This module is the feature-level analogue of the spec (our design): the same
control expressed as a :class:`Selection` merge.

Algorithm, per unit with a rows x cols patch grid and stride (sh, sw):

1. window of patch (r, c) = (r // sh, c // sw); windows in raster order (ceil(rows / sh) x
   ceil(cols / sw); border windows are smaller when the grid is not divisible);
2. each non-empty window becomes one token: target = its first member (the top-left patch when
   present), every other member assigned to it, rule ``mean`` (= the window's mean), in ``space``
   ``vision`` (select-layer features, then projected; default) or ``projected`` (LLM-input embeddings);
3. outputs in source order: each pooled token at its window's top-left token's place (window raster
   order within a unit); Video-LLaVA [CLS] tokens and LLaVA-NeXT / OneVision newline tokens pass
   unchanged at their places (not counted).

Budget: ``budget`` = pooled tokens **per image / crop / frame**; s = the smallest stride whose window
count ceil(rows / s) x ceil(cols / s) equals it (24 x 24: 144 -> 2, 64 -> 3, 36 -> 4; tiny 4 x 4: 4 -> 2,
1 -> 4). A budget no stride reaches is an error naming the reachable budgets. A unit with at most
``budget`` patches is kept whole (budget >= tokens: the identity). Option ``stride`` (int or
(sh, sw), e.g. (1, 3) -> 192 on 24 x 24) replaces the budget. Stride 1 is the identity.

Not implemented (documented): the spec's optional ``interpolate`` mode (non-integer grids) and ``pixel``
mode (low-resolution CLIP); a pooled-resolution newline rule for NeXT ``spatial_unpad``. Qwen2.5-VL:
every image has its own merged grid (``sig.unit_grid``), so an exact per-image count is generally
unreachable: there the budget picks the smallest square window whose count is <= ``budget`` (our rule).
"""

from __future__ import annotations

import math

import torch

from llava.method import BudgetError, Method, register
from llava.options import Option
from llava.ops import masked_take, unit_layout
from llava.selection import Selection

SUPPORTED_FAMILIES = None  # every family
SPACES = ("vision", "projected")
NEWLINE_MODES = ("keep", "drop")


def window_counts(rows: int, cols: int) -> dict[int, int]:
    """Reachable budgets on a rows x cols grid with square s x s windows: {tokens: smallest s}."""
    out: dict[int, int] = {}
    for s in range(1, max(rows, cols) + 1):
        out.setdefault(math.ceil(rows / s) * math.ceil(cols / s), s)
    return out


def stride_for_budget(budget: int, rows: int, cols: int, at_most: bool = False) -> tuple[int, int]:
    """The smallest square stride whose window count on a rows x cols grid is exactly ``budget`` (with
    ``at_most``: the smallest whose count is <= ``budget``, for dynamic grids where an exact count per
    image is generally unreachable)."""
    counts = window_counts(rows, cols)
    if at_most:
        s = min(s for n, s in counts.items() if n <= budget)
        return s, s
    if budget not in counts:
        reach = ", ".join(f"{n} (s={s})" for n, s in sorted(counts.items(), reverse=True))
        raise BudgetError(f"downsample: budget {budget} is not reachable with non-overlapping s x s windows on a "
                         f"{rows}x{cols} patch grid; reachable budgets: {reach} (or set `stride`)")
    s = counts[budget]
    return s, s


def downsample(unit: torch.Tensor, patch: torch.Tensor, grids: list[tuple[int, int]],
               strides: list[tuple[int, int] | None], *, keep_newlines: bool = True, rule: str = "mean",
               space: str = "vision", layout=None) -> Selection:
    """Window-mean pooling of one sample's visual tokens as a :class:`Selection`.

    unit: (T,) unit id (-1 = newline); patch: (T,) row-major patch index in its unit's grid (-1 =
    [CLS] / newline); grids[u] = (rows, cols) of unit u; strides[u] = (sh, sw), or None to keep the
    unit whole. Non-patch tokens ([CLS], newlines unless dropped) are kept. ``layout``: the
    :func:`unit_layout` of (unit, patch) when the caller has it already."""
    n = unit.numel()
    dev = unit.device
    lay = unit_layout(unit, patch) if layout is None else layout  # one host read
    keep = [lay.newlines] if keep_newlines else []
    pooled_tok, pooled_key = [], []
    base = 0  # window-key offset of the unit
    for u in range(lay.num_units):
        st = strides[u]
        if st is None or st == (1, 1):
            keep.append(lay.tokens[u])
            continue
        keep.append(lay.cls[u])
        rows, cols = grids[u]
        sh, sw = st
        ncw = -(-cols // sw)
        tok = lay.patches[u]
        p = patch[tok]
        pooled_tok.append(tok)
        pooled_key.append(base + (p // cols) // sh * ncw + (p % cols) // sw)
        base += -(-rows // sh) * ncw
    keep = torch.cat(keep).sort().values if keep else unit.new_zeros(0)
    if not pooled_tok:
        return Selection(keep=keep)
    tok, key = torch.cat(pooled_tok), torch.cat(pooled_key)
    # first member of every window (its top-left token when present); empty windows stay at n
    first = torch.full((base,), n, dtype=torch.long, device=dev).scatter_reduce_(0, key, tok, "amin")
    occupied = first < n
    count = int(occupied.sum())  # one host read: windows emptied by unpadding / resampling
    targets = masked_take(first, occupied, count)
    slot = torch.cumsum(occupied.long(), 0) - 1  # window key -> target slot
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    assign[tok] = slot[key]
    order = torch.argsort(torch.cat([keep, targets]), stable=True)  # each output at its source's place
    return Selection(keep=keep, targets=targets, assign=assign, rule=rule, space=space, order=order)


def _as_stride(stride) -> tuple[int, int] | None:
    if stride is None:
        return None
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (sh, sw)):
        raise ValueError(f"downsample: stride must be a positive int or a pair of them, got {stride!r}")
    return sh, sw


def unit_grids(sig, lay) -> list[tuple[int, int]]:
    """(rows, cols) of every unit's patch grid: ``sig.unit_grid`` when the signals carry one, else the
    family's fixed grid; a frame with fewer patches forming a k x k square (OneVision's pooled video
    frames) gets k x k. Qwen2.5-VL (dynamic grids, ``grid`` (0, 0)) without ``unit_grid``: refused."""
    given = getattr(sig, "unit_grid", None)
    if given is not None:
        given = given.tolist() if isinstance(given, torch.Tensor) else given
        return [(int(r), int(c)) for r, c in given]
    rows, cols = sig.grid
    if rows <= 0 or cols <= 0:
        raise ValueError("downsample: this model's images have dynamic patch grids (Qwen2.5-VL) and the vision "
                         "signals carry no per-image grid width (VisionSignals.grid = (0, 0)), so windows "
                         "cannot be formed; downsample is refused on this family")
    out = []
    for u in range(lay.num_units):
        k = math.isqrt(lay.num_patch_stock[u])
        if sig.unit_kind == "frame" and lay.num_patch_stock[u] < rows * cols and k * k == lay.num_patch_stock[u]:
            out.append((k, k))
        else:
            out.append((rows, cols))
    return out


@register
class Downsample(Method):
    """Downsample control: the mean of every non-overlapping s x s window of each unit's patch grid
    (s from the per-unit ``budget`` or the ``stride`` option), in vision-feature space by default."""

    name = "downsample"
    #: the whole selection depends on the layout only (unit / patch / grids, no feature value): the fast path
    #: plans it on the host (:meth:`plan_vision`) and the captured prefill only merges (every option)
    capturable = "full"
    vision_stage = True
    families = SUPPORTED_FAMILIES

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # window (sh, sw) or s; None = from the budget
            "stride": None,
            "space": Option("vision", SPACES, doc="what is merged: vision features (then projected) or the "
                                                  "projected LLM-input embeddings"),
            "newlines": Option("keep", NEWLINE_MODES,
                               doc="LLaVA-NeXT / OneVision newline tokens: keep (layout, not counted) or drop"),
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if (self.budget is None) == (self.stride is None):
            raise ValueError("downsample: give a budget (pooled tokens per image / crop / frame) or a stride, "
                             "not both and not neither")
        _as_stride(self.stride)

    def strides(self, sizes: list[int], grids: list[tuple[int, int]],
                dynamic: bool = False) -> list[tuple[int, int] | None]:
        """Per unit: its window, or None to keep it whole (at most ``budget`` patches). ``dynamic``
        (Qwen2.5-VL's per-image grids): the smallest window whose count is <= ``budget``."""
        fixed = _as_stride(self.stride)
        if fixed is not None:
            return [fixed] * len(sizes)
        return [None if n <= self.budget else stride_for_budget(self.budget, *g, at_most=dynamic)
                for n, g in zip(sizes, grids)]

    #: the Selection fields a captured prefill reads back from :meth:`plan_vision` (``sig.plan``)
    PLANNED = ("keep", "targets", "assign", "order")

    def plan_vision(self, sig) -> dict:
        """The whole selection, on the host (the fast path's plan; ``sig`` holds host tensors): windows depend
        only on the layout, never on a feature value, so the captured prefill reads it back as ``sig.plan``
        (its sizes, e.g. the windows left non-empty by NeXT's unpadding, are the plan's static shapes)."""
        sel = self._select(sig)
        return {name: getattr(sel, name) for name in self.PLANNED if getattr(sel, name) is not None}

    def select_vision(self, sig):
        if sig.captured:  # the fast path planned it (plan_vision): no device read, no data-dependent size
            p = sig.plan
            if "targets" not in p:  # nothing pooled (the identity, or stride 1)
                return Selection(keep=p["keep"])
            return Selection(keep=p["keep"], targets=p["targets"], assign=p["assign"], rule="mean",
                             space=self.space, order=p.get("order"))
        return self._select(sig)

    def _select(self, sig) -> Selection:
        lay = sig.unit_layout(patch=True, stock=True)  # the one host sync (none when planned)
        sizes = lay.num_patch_stock
        if self.stride is None and all(n <= self.budget for n in sizes):  # every unit fits: the identity
            return Selection(keep=torch.arange(sig.num_tokens, device=sig.unit.device))
        grids = unit_grids(sig, lay)
        dynamic = tuple(sig.grid) == (0, 0)  # Qwen2.5-VL: every image its own grid
        return downsample(sig.unit, sig.patch, grids, self.strides(sizes, grids, dynamic),
                          keep_newlines=self.newlines == "keep", space=self.space, layout=lay)

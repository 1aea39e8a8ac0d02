"""PruMerge / PruMerge+ (arXiv 2403.15388, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models"): keep the IQR outliers of the [CLS] attention (adaptive count), PruMerge+ adds spatially
uniform samples, then every kept token absorbs its k nearest neighbours (cosine of the keys) weighted by
their attention, and one extra global token sums the pruned tokens; pre-LLM.

Doc: docs/methods/prumerge.md. Official code: 42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py``: ``token_prune_merge_advanced`` (PruMerge) and
``token_prune_merge_advanced_plus`` (PruMerge+, the one ``forward`` calls).

Algorithm, per unit u (image / crop / frame) with n patch candidates on a rows x cols grid (P patches;
official n = P = 576), official code:

1. a = the **last** tower layer's (hidden state -1, encoder layer 23) [CLS] query row of softmax(Q K^T /
   sqrt(D)) with Q, K its q_proj / k_proj outputs taken **full width** (one D-wide head; D = 1024, scale
   1/32), patch columns (the engine's ``sig.fullwidth_cls_attn[-1]``, fp32);
2. adaptive ratio: Q1, Q3 = 25th / 75th percentiles of a (linear interpolation, ``numpy.percentile``'s
   default = ``torch.quantile``'s), outliers = a > Q3 + 1.5 (Q3 - Q1), rho = #outliers / n;
3. top = the int(n * rho) patches with the largest a, in descending order (Python float arithmetic);
4. PruMerge+ only: step = int(1 / rho), sigma = int(step / 3), grid = {0, sigma, 2 sigma, ... < P - 1}
   (flat raster patch indices; official ``arange(0, 575, sigma)``), appended ascending, skipping those in
   top;
5. for every kept token i: x'_i = x_i + sum_{j in NN_k(i)} a_j x_j, NN_k(i) = the k (32) other patches of
   the unit (kept ones included) with the largest cosine of the full-width keys; original features x (the
   select layer -2's, ``sig.vision_features``), the sum is **not** normalised;
6. g = sum_{j pruned} a_j x_j;
7. output [x'_top..., x'_grid..., g] (attention order, then the grid) -> projector -> LLM.

Our design / deviations: see ``docs/methods/prumerge.md``.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics. The official
builder casts the vision tower to float16 unconditionally (``vision_tower.to(device, dtype=torch.float16)``),
so every signal is fp16: the [CLS] attention row is cast to float16; the IQR count by ``numpy.percentile``
of its fp32 copy on the host (as ``outlier_dectection``); the top tokens by ``torch.topk`` of the fp16 row
(official tie order); the keys ``F.normalize``-d in fp16; per kept token the neighbours by ``torch.topk`` of
the fp16 ``bmm`` cosines over the official candidate order (the other kept tokens in kept order, then the
pruned ones ascending); the merge ``x_i + sum(x_nb * a_nb)`` and the global token ``sum(x_pruned *
a_pruned)`` in fp16 on the fp16 select-layer features (the values are returned as fp32, exactly).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llava.families import registry
from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, device_ints, masked_take, unit_layout
from llava.selection import Selection

VARIANTS = ("plus", "base")
BUDGET_MODES = ("adaptive", "fixed")
CLS_TOKEN_MODES = ("drop", "keep")
#: a unit whose every patch is kept: no global token ("drop", ours) or an all-zero one ("zero", the official code)
EMPTY_GLOBAL_MODES = ("drop", "zero")
#: the CLIP-tower families (a [CLS] token and its attention: llava.families.registry's ``tower``), asked at each use
SUPPORTED_FAMILIES = registry.where(tower="clip")
#: dtype of every official signal (the PruMerge builder casts the tower to fp16 unconditionally)
OFFICIAL_DTYPE = torch.float16
REFUSAL = ("PruMerge reads the [CLS] query's full-width attention and the full-width keys of the last CLIP "
           "layer (Method.vision_fullwidth_layers), which the engine computes for the CLIP towers of "
           f"{', '.join(SUPPORTED_FAMILIES)} only (Qwen2.5-VL's windowed ViT and OneVision's SigLIP tower "
           "have no [CLS] token and no such signal)")


# ------------------------------------------------------------------------------------------- counts


def iqr_outliers_official(a: torch.Tensor) -> int:
    """Host count as the official ``outlier_dectection``: the values cast to fp32, copied to numpy,
    ``numpy.percentile`` 25 / 75, count of values > Q3 + 1.5 (Q3 - Q1) (one host read)."""
    v = a.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    return int(np.count_nonzero(v > q3 + 1.5 * (q3 - q1)))


def merge_official(kept: torch.Tensor, a: torch.Tensor, x: torch.Tensor, kn: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-mode merge of one unit, the official loop's numerics (fp16 inputs): ``kept`` (m,) local
    indices in output order, a (n,) attention, x (n, C) features, kn (n, D) normalised keys. Per kept token
    the candidates are the other kept tokens (kept order) then the pruned ones (ascending); neighbours by
    ``topk`` of the ``bmm`` cosine; x_i + sum(x_nb * a_nb). Returns (merged (m, C), g (1, C) or empty)."""
    n = a.shape[0]
    is_kept = torch.zeros(n, dtype=torch.bool, device=a.device).scatter_(0, kept, True)
    pruned = torch.arange(n, device=a.device)[~is_kept]  # ascending (official complement_idx)
    m = kept.numel()
    kk = min(int(k), n - 1)
    out = x[kept].clone()
    if kk > 0:
        for i in range(m):
            rest = torch.cat([kept[:i], kept[i + 1:], pruned])
            cos = torch.bmm(kn[kept[i]][None, None], kn[rest].T[None])  # (1, 1, n - 1)
            nb = rest[torch.topk(cos, k=kk, dim=2).indices[0, 0]]
            weighted = torch.sum(x[nb][None] * a[nb][None, :, None], dim=1)  # (1, C)
            out[i] = x[kept[i]] + weighted[0]
    g = torch.sum(x[pruned][None] * a[pruned][None, :, None], dim=1) if pruned.numel() else x[:0]
    return out, g


def iqr_outliers(a: torch.Tensor) -> torch.Tensor:
    """0-d count of the values of ``a`` above Q3 + 1.5 (Q3 - Q1) (upper side only, official
    ``outlier_dectection``), quartiles by linear interpolation (= ``numpy.percentile``'s default), fp32,
    on ``a``'s device (no host read)."""
    a = a.float().reshape(-1)
    q = torch.quantile(a, torch.linspace(0.25, 0.75, 2, dtype=a.dtype, device=a.device))  # a kernel, not an upload
    upper = q[1] + 1.5 * (q[1] - q[0])
    return (a > upper).sum()


def adaptive_plan(outliers: int, n: int, variant: str = "plus") -> tuple[int, int]:
    """Host arithmetic of the official adaptive branch for a unit of ``n`` candidates with ``outliers``
    IQR outliers: (top count, grid stride sigma; 0 for ``base``), Python floats as in the official code.

    Guards (ours; the official code fails): no outlier (rho = 0: division by zero in PruMerge+, an empty
    top in PruMerge) is treated as one outlier, rho = 1/n; sigma = 0 (rho > 1/3: ``arange`` step 0) becomes 1;
    the top count is at least 1 (int(n * rho) can round 1 - eps down)."""
    ratio = outliers / n if outliers > 0 else 1 / n
    top = max(1, int(n * ratio))
    sigma = max(1, int(int(1 / ratio) / 3)) if variant == "plus" else 0
    return top, sigma


def fixed_plan(budget: int, n: int, variant: str = "plus") -> tuple[int, int]:
    """Fixed budget (our design, methods-2026 section 3.5): ``budget`` outputs per unit including g. Returns
    (top count, supplement count): kept = min(budget - 1, n); PruMerge+ top = min(ceil(budget / 4), kept),
    the rest of the kept are the evenly spaced supplement; PruMerge: all kept by attention."""
    kept = min(max(budget - 1, 0), n)
    if variant == "base":
        return kept, 0
    top = min(math.ceil(budget / 4), kept)
    return top, kept - top


# ------------------------------------------------------------------------------------------- the method


def prumerge(attn: torch.Tensor, keys: torch.Tensor, feats: torch.Tensor, unit: torch.Tensor,
             patch: torch.Tensor, grid: tuple[int, int], *, variant: str = "plus",
             budget_mode: str = "adaptive", budget: int | None = None, k: int = 32,
             cls_token: str = "drop", numerics: str = "ours", empty_global: str | None = None,
             layout=None) -> Selection:
    """PruMerge(+) for one sample; returns a vision-space :class:`Selection` with ``values``.

    attn: (T,) full-width [CLS] attention per token (only patch tokens are read); keys: (T, D) full-width
    keys; feats: (T, Dv) select-layer features; unit: (T,) unit id (-1 = NeXT newline); patch: (T,) patch
    index in the unit's ``grid`` = (rows, cols), -1 for [CLS] / newline.

    Outputs per unit, units in order: ([CLS] when ``cls_token="keep"``), the kept patches (top by
    attention descending, ties to the lower patch index, then the supplement ascending), then g (when
    something was pruned). ``keep`` holds the [CLS] and kept tokens in output order, ``targets`` one token
    per unit for g (the pruned token with the largest attention, ties to the lower patch index), ``assign``
    all -1, ``order`` interleaves each g after its unit. NeXT newline tokens are dropped (every output is
    projected from vision features; a newline has none). Host reads: one in ``unit_layout``, one for the
    adaptive outlier counts, one for the PruMerge+ supplement counts (all units at once).
    ``numerics="official"``: the official fp16 numerics (module docstring); the adaptive counts are then
    read per unit (numpy, as the official code). ``empty_global``: a unit whose every patch is kept gets no g
    (``"drop"``, ours; the default but under ``numerics="official"``) or, in the adaptive mode, an all-zero g (``"zero"``: the official ``torch.sum`` over the
    empty complement, ``clip_encoder.py:278``), whose provenance is the unit's [CLS] candidate (the engine offers it when the method
    asks, ``include_cls_candidates``; a unit without a free [CLS] gets no g). ``layout``:
    :func:`llava.ops.unit_layout` of (unit, patch) when the caller planned it on the host (then no host read in
    the fixed mode)."""
    check_numerics("prumerge", numerics)
    official = numerics == "official"
    if variant not in VARIANTS:
        raise ValueError(f"prumerge: variant must be one of {VARIANTS}, got {variant!r}")
    if budget_mode not in BUDGET_MODES:
        raise ValueError(f"prumerge: budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")
    if cls_token not in CLS_TOKEN_MODES:
        raise ValueError(f"prumerge: cls_token must be one of {CLS_TOKEN_MODES}, got {cls_token!r}")
    if empty_global is None:
        empty_global = "zero" if official else "drop"
    if empty_global not in EMPTY_GLOBAL_MODES:
        raise ValueError(f"prumerge: empty_global must be one of {EMPTY_GLOBAL_MODES}, got {empty_global!r}")
    if budget_mode == "fixed" and (budget is None or budget < 1):
        raise ValueError("prumerge: budget_mode='fixed' needs a budget >= 1 (tokens per unit, g included)")
    dev = unit.device
    n_tok = unit.numel()
    P = int(grid[0]) * int(grid[1])
    lay = layout if layout is not None else unit_layout(unit, patch)  # host read (none when planned)
    nu = lay.num_units
    a_all = attn.float()
    x_all = feats.float()
    kn_all = F.normalize(keys.float(), p=2, dim=-1)  # official F.normalize of the keys, then dot products
    if official:  # the official fp16 tower's signals
        a16, x16 = attn.to(OFFICIAL_DTYPE), feats.to(OFFICIAL_DTYPE)
        kn16 = F.normalize(keys.to(OFFICIAL_DTYPE), p=2, dim=-1)

    # each unit's patch candidates in raster (patch-index) order
    toks = []
    for u in range(nu):
        t = lay.patches[u]
        toks.append(t[torch.sort(patch[t], stable=True).indices])
    ns = [int(t.numel()) for t in toks]

    # stage 1: how many by attention (and the grid stride)
    plans = [(0, 0)] * nu
    live = [u for u in range(nu) if ns[u] > 0]
    if budget_mode == "adaptive":
        if official:
            cnt = [iqr_outliers_official(a16[toks[u]]) for u in live]  # host reads (official numpy)
        elif live:
            cnt = torch.stack([iqr_outliers(a_all[toks[u]]) for u in live]).tolist()  # host read
        for u, c in zip(live, cnt if live else []):
            plans[u] = adaptive_plan(int(c), ns[u], variant)
    else:
        bu = budget - (1 if cls_token == "keep" else 0)  # a kept [CLS] takes one of the unit's slots
        for u in live:
            has_cls = len(lay.cls[u]) > 0
            plans[u] = fixed_plan(bu if has_cls else budget, ns[u], variant)

    # stage 2: top (descending attention, ties to the lower patch index) and the supplement mask
    tops, sups = {}, {}
    for u in live:
        t_u, p_u = plans[u]
        a = a_all[toks[u]]
        if official:  # torch.topk of the fp16 row (official tie order), shape (1, n) as the official call
            top = torch.topk(a16[toks[u]][None], t_u, dim=1).indices[0]
        else:
            top = torch.sort(a, descending=True, stable=True).indices[:t_u]
        is_top = torch.zeros(ns[u], dtype=torch.bool, device=dev).scatter_(0, top, True)
        if variant == "base":
            sup = torch.zeros_like(is_top)
        elif budget_mode == "adaptive":  # official grid {0, s, 2s, ... < P - 1} on the flat patch index
            pp = patch[toks[u]]
            sup = (pp % p_u == 0) & (pp < P - 1) & ~is_top
        else:  # s evenly spaced among the R remaining patches (raster order): positions floor(i R / s)
            rem = ~is_top
            r = ns[u] - t_u
            mark = torch.zeros(max(r, 1), dtype=torch.bool, device=dev)
            if p_u > 0:
                mark.index_fill_(0, (torch.arange(p_u, device=dev) * r) // p_u, True)  # not mark[i] = True (capture)
            sup = rem & mark[(rem.long().cumsum(0) - 1).clamp(min=0)]
        tops[u], sups[u] = top, sup
    if budget_mode == "adaptive" and variant == "plus" and live:
        s_cnt = torch.stack([sups[u].sum() for u in live]).tolist()  # host read
        n_sup = dict(zip(live, (int(c) for c in s_cnt)))
    else:
        n_sup = {u: (plans[u][1] if variant == "plus" else 0) for u in live}

    # stage 3: merge (vectorised over the unit's tokens)
    keep_parts, keep_vals, g_targets, g_vals = [], [], [], []
    order_plan = []  # per unit: (outputs in keep, has g)
    for u in range(nu):
        n_keep_u = 0
        if cls_token == "keep" and len(lay.cls[u]):
            c = lay.cls[u][:1]
            keep_parts.append(c)
            keep_vals.append(x16[c].float() if official else x_all[c])
            n_keep_u += 1
        has_g = False
        if ns[u] > 0:
            n = ns[u]
            t = toks[u]
            ar = torch.arange(n, device=dev)
            sup_idx = masked_take(ar, sups[u], n_sup[u])
            kept = torch.cat([tops[u], sup_idx])
            m = int(tops[u].numel()) + n_sup[u]
            a, x, kn = a_all[t], x_all[t], kn_all[t]
            xk = x[kept]
            kk = min(int(k), n - 1)
            if official:
                merged, g16 = merge_official(kept, a16[t], x16[t], kn16[t], k)
                xk = merged.float()
            elif m and kk > 0:
                sim = kn[kept] @ kn.T  # (m, n) cosine
                sim = sim.scatter(1, kept[:, None], float("-inf"))  # not itself
                nb = sim.topk(kk, dim=1).indices  # (m, kk)
                w = torch.zeros(m, n, dtype=a.dtype, device=dev).scatter_(1, nb, a[nb])
                xk = xk + w @ x  # unnormalised attention-weighted sum of the neighbours' original features
            keep_parts.append(t[kept])
            keep_vals.append(xk)
            n_keep_u += m
            if m < n:  # the extra global token
                is_kept = torch.zeros(n, dtype=torch.bool, device=dev).scatter_(0, kept, True)
                g_vals.append(g16.float() if official else (a.masked_fill(is_kept, 0.0) @ x)[None])
                g_targets.append(t[a.masked_fill(is_kept, float("-inf")).argmax().reshape(1)])
                has_g = True
            elif empty_global == "zero" and budget_mode == "adaptive":  # the official empty sum: a zero g
                free = lay.cls[u][1:] if cls_token == "keep" else lay.cls[u]  # [CLS] candidates not output
                if len(free):
                    g_vals.append(torch.zeros(1, feats.shape[-1], dtype=torch.float32, device=dev))
                    g_targets.append(free[:1])
                    has_g = True
        order_plan.append((n_keep_u, has_g))

    empty = torch.zeros(0, dtype=torch.long, device=dev)
    keep = torch.cat(keep_parts) if keep_parts else empty
    dv = feats.shape[-1]
    vals = keep_vals + g_vals
    values = torch.cat(vals) if vals else torch.zeros(0, dv, dtype=torch.float32, device=dev)
    n_keep = int(sum(n for n, _ in order_plan))
    order, ko, go = [], 0, n_keep
    for n_u, has_g in order_plan:
        order.extend(range(ko, ko + n_u))
        ko += n_u
        if has_g:
            order.append(go)
            go += 1
    targets = assign = None
    if g_targets:
        targets = torch.cat(g_targets)
        assign = torch.full((n_tok,), -1, dtype=torch.long, device=dev)
    order_t = None
    if order != list(range(len(order))):
        order_t = torch.tensor(order, dtype=torch.long, device=dev)
    return Selection(keep=keep, targets=targets, assign=assign, values=values, space="vision", order=order_t)


def prumerge_padded(attn: torch.Tensor, keys: torch.Tensor, feats: torch.Tensor, patch: torch.Tensor,
                    grid: tuple[int, int], layout, *, variant: str = "plus", k: int = 32,
                    cls_token: str = "drop") -> Selection:
    """The adaptive PruMerge(+) of :func:`prumerge` with static shapes and no host read, for the fast
    path's piecewise prefill (:mod:`llava.fast.path`): the same outputs in the same order, padded to every
    candidate of every unit, with the real count as ``Selection.count`` (read once by the engine, after
    the graph). ``layout``: the planned :func:`llava.ops.unit_layout` of (unit, patch).

    Per unit, on the device: the IQR outlier count, the official float arithmetic of
    :func:`adaptive_plan` in float64 (IEEE, as Python's floats), every patch ranked (top by attention
    descending, ties to the lower patch index; then the grid supplement ascending; then the rest), every
    patch's k-NN merge (neighbours do not depend on what is kept), the global token over the pruned ones.
    Slots per unit: [[CLS]?, n ranked patches, g]; the real ones (the [CLS], the first top + supplement,
    g when something was pruned) are moved first by one stable sort, in :func:`prumerge`'s output order."""
    dev = patch.device
    P = int(grid[0]) * int(grid[1])
    lay = layout
    a_all = attn.float()
    x_all = feats.float()
    kn_all = F.normalize(keys.float(), p=2, dim=-1)
    keep_parts, keep_vals, g_targets, g_vals = [], [], [], []
    real_keep, real_g, slot_src = [], [], []  # per slot: is it real; the slot order (index into the outputs)
    n_keep = sum((1 if cls_token == "keep" and len(lay.cls[u]) else 0) + int(lay.patches[u].numel())
                 for u in range(lay.num_units))
    ko, go = 0, n_keep
    yes = torch.ones(1, dtype=torch.bool, device=dev)
    for u in range(lay.num_units):
        if cls_token == "keep" and len(lay.cls[u]):
            c = lay.cls[u][:1]
            keep_parts.append(c)
            keep_vals.append(x_all[c])
            real_keep.append(yes)
            slot_src.append(ko)
            ko += 1
        t = lay.patches[u]
        n = int(t.numel())
        if n == 0:
            continue
        t = t[torch.sort(patch[t], stable=True).indices]  # raster order
        a, x, kn = a_all[t], x_all[t], kn_all[t]
        ar = torch.arange(n, device=dev)
        o = iqr_outliers(a).double()
        ratio = torch.where(o > 0, o / n, torch.full_like(o, 1.0) / n)
        top_c = torch.floor(n * ratio).clamp(min=1).long()
        rank = torch.empty(n, dtype=torch.long, device=dev).scatter_(
            0, torch.sort(a, descending=True, stable=True).indices, ar)
        is_top = rank < top_c
        if variant == "plus":
            sigma = torch.floor(torch.floor(1.0 / ratio) / 3).clamp(min=1).long()
            pp = patch[t]
            sup = (pp % sigma == 0) & (pp < P - 1) & ~is_top
        else:
            sup = torch.zeros_like(is_top)
        kept = is_top | sup
        perm = torch.sort(torch.where(is_top, rank, torch.where(sup, n + ar, 2 * n + ar))).indices
        m = kept.sum()
        xk = x
        kk = min(int(k), n - 1)
        if kk > 0:
            sim = (kn @ kn.T).diagonal_scatter(torch.full((n,), float("-inf"), device=dev))  # not itself
            nb = sim.topk(kk, dim=1).indices
            w = torch.zeros(n, n, dtype=a.dtype, device=dev).scatter_(1, nb, a[nb])
            xk = x + w @ x
        keep_parts.append(t[perm])
        keep_vals.append(xk[perm])
        real_keep.append(ar < m)
        slot_src.extend(range(ko, ko + n))
        ko += n
        g_vals.append((a.masked_fill(kept, 0.0) @ x)[None])
        g_targets.append(t[a.masked_fill(kept, float("-inf")).argmax().reshape(1)])
        real_g.append((m < n).reshape(1))
        slot_src.append(go)
        go += 1
    keep = torch.cat(keep_parts)
    values = torch.cat(keep_vals + g_vals)
    targets = assign = None
    real = torch.cat(real_keep + real_g)  # per output, outputs [keep..., g...]
    if g_targets:
        targets = torch.cat(g_targets)
        assign = torch.full((patch.numel(),), -1, dtype=torch.long, device=dev)
    slots = device_ints(slot_src, dev)  # kernels, not an upload (graph 1 is captured)
    order = slots[torch.sort((~real[slots]).to(torch.uint8), stable=True).indices]
    return Selection(keep=keep, targets=targets, assign=assign, values=values, space="vision", order=order,
                     count=real.sum())


@register
class PruMerge(Method):
    """PruMerge / PruMerge+: IQR outliers of the last CLIP layer's full-width [CLS] attention (+ a uniform
    grid), k-NN merged by key cosine with attention weights, plus one global token, per image / crop / frame."""

    name = "prumerge"
    #: the fixed budget is captured whole; the adaptive count (IQR outliers, official) piecewise: the outputs
    #: padded to every candidate with the count on the device (:func:`prumerge_padded`), read once
    capturable = "piecewise"
    vision_stage = True
    #: the last tower layer (official encoder layer 23 of 24 = hidden state -1)
    vision_fullwidth_layers: tuple[int, ...] = (-1,)
    families = SUPPORTED_FAMILIES
    unsupported_reason = REFUSAL

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "variant": Option("plus", VARIANTS,
                              doc="plus = PruMerge+ (token_prune_merge_advanced_plus, what the official forward "
                                  "calls); base = PruMerge (token_prune_merge_advanced)"),
            "budget_mode": Option("adaptive", BUDGET_MODES,
                                  doc="adaptive (official: the count depends on the image, no budget) or fixed (our "
                                      "design: budget = outputs per unit, g included)"),
            # merge neighbours per kept token (official 32); min(k, n - 1) on small grids
            "k": 32,
            "cls_token": Option("drop", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS] (a stock LLM token there): keep = unchanged, first in "
                                    "its frame"),
            # hidden-state index of the layer whose full-width q / k are read (official: the last, -1)
            "qk_layer": -1,
            # "ours" (fp32, stable ties) or "official" (reference mode: the official fp16 numerics, topk)
            "numerics": NUMERICS_OPTION,
            # a unit whose every patch is kept: "drop" (no global token, ours), "zero" (an all-zero global
            # token, as the official code appends), None = "zero" under numerics="official", else "drop"
            "empty_global": None,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.budget_mode == "adaptive" and self.budget is not None:
            raise ValueError("prumerge: the adaptive mode (official) chooses the count per image and takes no "
                             "budget; pass budget_mode='fixed' for a fixed budget per unit")
        if self.budget_mode == "fixed" and self.budget is None:
            raise ValueError("prumerge: budget_mode='fixed' needs a budget (tokens per image / crop / frame, "
                             "the global token included)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"prumerge: k must be an int >= 1, got {self.k!r}")
        if isinstance(self.qk_layer, bool) or not isinstance(self.qk_layer, int):
            raise ValueError(f"prumerge: qk_layer must be an int (hidden-state index), got {self.qk_layer!r}")
        self.vision_fullwidth_layers = (self.qk_layer,)
        if self.numerics == "official":  # the [CLS] row as the official code computes it from the fp16 tower's q / k
            self.vision_attention_logits = "model"
        if self.empty_global is None:
            self.empty_global = "zero" if self.numerics == "official" else "drop"
        if self.empty_global not in EMPTY_GLOBAL_MODES:
            raise ValueError(f"prumerge: empty_global must be one of {EMPTY_GLOBAL_MODES}, got {self.empty_global!r}")
        if self.empty_global == "zero":  # the zero g's provenance: the unit's [CLS] (LLaVA-1.5 / NeXT drop it)
            self.include_cls_candidates = True

    def capture_refusal(self):
        if self.empty_global == "zero":
            return "prumerge: empty_global='zero' (the official zero global token) runs on the eager engine"
        return super().capture_refusal()

    def setup(self, *, num_layers, num_vision_layers, family):
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"prumerge: family {family!r} is not supported: {REFUSAL}")
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)

    def capture_kind(self):
        return "full" if self.budget_mode == "fixed" else "piecewise"

    def select_vision(self, sig):
        v = self.qk_layer
        if sig.captured and self.budget_mode == "adaptive":
            return prumerge_padded(sig.fullwidth_cls_attn[v], sig.fullwidth_keys[v], sig.vision_features, sig.patch,
                                   sig.grid, sig.unit_layout(patch=True), variant=self.variant, k=self.k,
                                   cls_token=self.cls_token)
        return prumerge(sig.fullwidth_cls_attn[v], sig.fullwidth_keys[v], sig.vision_features, sig.unit,
                        sig.patch, sig.grid, variant=self.variant, budget_mode=self.budget_mode,
                        budget=self.budget, k=self.k, cls_token=self.cls_token, numerics=self.numerics,
                        empty_global=self.empty_global,
                        layout=sig.unit_layout(patch=True) if sig.captured else None)

"""Small token-selection primitives shared by several methods (one implementation each).

All are pure functions over tensors; scores are compared in fp32. Every tensor they create takes
its device from their inputs, and none of them synchronises with the device per token: data-dependent
sizes come from :func:`unit_layout` (one host read per call) or from counts the caller knows
(:func:`masked_take`). :func:`greedy_max_min` runs its sequential loop on the host (one copy each way
per call) for the eager engine, or on the device with no host read at all (``device_loop=True``) for a
prefill captured in a CUDA graph / ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn.functional as F

from .method import Selection


#: the ``numerics`` option of every method with official code: our documented numerics, or the reference
#: mode that reproduces the official implementation's dtypes and orderings (docs/evaluation.md)
NUMERICS = ("ours", "official")


def check_numerics(method: str, numerics: str) -> None:
    """Refuse a ``numerics`` value other than :data:`NUMERICS`, naming the method."""
    if numerics not in NUMERICS:
        raise ValueError(f"{method}: numerics must be one of {NUMERICS}, got {numerics!r}")


def topk_desc(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, best first; ties broken by the lower index
    (methods.md 0.6). ``k`` is clipped to the number of scores."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]


@dataclass
class MaxMinProblem:
    """One greedy max-min selection for :func:`greedy_max_min`: ``k`` times, pick the token ``j`` not
    yet taken that maximises ``weight_j * min_dist_j`` (``min_dist_j`` alone without a weight), then
    ``min_dist = minimum(min_dist, dist[j])``. Tensors on the device, distances in fp32.

    ``num_taken`` is the number of tokens in ``taken``, counted on the host by the caller (who set
    them): the device loop needs the number of picks as a Python int without reading the device, so
    it refuses a ``taken`` without ``num_taken``. The host loop counts ``taken`` itself and, when
    ``num_taken`` is given too, checks that they agree."""

    dist: torch.Tensor  # (n, n); row j = the distances from token j
    k: int  # picks to make (clipped to the tokens not taken)
    min_dist: torch.Tensor  # (n,) the starting distance of every token to the taken set
    taken: torch.Tensor | None = None  # (n,) bool: taken before (seeds); never picked
    weight: torch.Tensor | None = None  # (n,) relevance multiplying min_dist
    fill: float = float("-inf")  # the score a taken token gets (below every candidate's)
    num_taken: int | None = None  # the host count of ``taken`` (required by the device loop)


def _num_picks(p: MaxMinProblem) -> int:
    """The device loop's number of picks, from host ints only: ``min(k, n - num_taken)``, at least 0."""
    n = p.dist.shape[0]
    if p.taken is not None and p.num_taken is None:
        raise ValueError("greedy_max_min(device_loop=True): a problem with `taken` needs `num_taken` (its "
                         "host count): the number of picks cannot be read from the device")
    if p.taken is None and p.num_taken:
        raise ValueError(f"greedy_max_min: num_taken={p.num_taken} but no `taken` mask")
    return max(0, min(int(p.k), n - (p.num_taken or 0)))


def _greedy_max_min_device(p: MaxMinProblem) -> torch.Tensor:
    """One problem's greedy loop in torch on its device, unrolled ``k`` times with static shapes: no
    host read, no host <-> device copy (capturable in a CUDA graph / ``torch.compile(fullgraph=True)``).
    The same fp32 ops as the host loop of :func:`greedy_max_min`, so the same picks, bit for bit."""
    dev = p.dist.device
    k = _num_picks(p)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    n = p.dist.shape[0]
    dist = p.dist.float()
    mind = p.min_dist.float().reshape(-1)
    w = None if p.weight is None else p.weight.float().reshape(-1)
    if p.taken is None:
        taken = torch.zeros(n, dtype=torch.bool, device=dev)
    else:  # as the host loop reads it: a bool mask, or a number > 0.5
        taken = p.taken.reshape(-1) if p.taken.dtype == torch.bool else p.taken.float().reshape(-1) > 0.5
    fill = torch.full((), p.fill, dtype=torch.float32, device=dev)  # rounded to fp32, as np.float32(fill)
    picks = []
    for _ in range(k):
        s = mind if w is None else w * mind
        s = torch.where(taken, fill, s)  # the taken tokens' score: below every candidate's
        j = s.argmax(0, keepdim=True)  # (1,): the first maximum, as numpy's argmax
        picks.append(j)
        taken = taken.index_fill(0, j, True)
        mind = torch.minimum(mind, dist.index_select(0, j)[0])
    return torch.cat(picks)


def greedy_max_min(problems: "list[MaxMinProblem]", device_loop: bool = False) -> list[torch.Tensor]:
    """Solve greedy max-min selections (DivPrune's rule, and its relevance-weighted form), on the host
    (default) or on the device (``device_loop=True``).

    **Host loop** (default; the eager engine). On a GPU the greedy loop is sequential and launch-bound:
    about seven small kernels per pick, one pick per kept token (measured on an H100: ~100 us per pick,
    20-110 ms per prefill at 64-192 tokens per crop). Here every problem's tensors go to the host in
    **one** copy (one sync for all of them), the loop runs in numpy (a few microseconds per pick, no
    kernel), and the picks come back in one copy to the device.

    **Device loop** (``device_loop=True``; a prefill captured in a CUDA graph or compiled with
    ``torch.compile(fullgraph=True)``, where no host read or copy may happen): each problem's loop runs
    in torch on its ``dist``'s device, unrolled ``k`` times with static shapes, without any host
    synchronisation. The number of picks must then be known on the host: a problem with ``taken``
    must give ``num_taken`` (ValueError otherwise).

    Both give the same picks, bit for bit, and the same as the loop in torch fp32 on any device: the
    inputs are cast to fp32, and the loop does only exact elementwise IEEE ops (multiply, minimum)
    and argmax (first maximum on both). Returns each problem's picks in pick order (long; on the
    first problem's ``dist`` device for the host loop, on each problem's own for the device loop)."""
    if device_loop:
        return [_greedy_max_min_device(p) for p in problems]
    if not problems:
        return []
    import numpy as np

    dev = problems[0].dist.device
    parts = []
    for p in problems:
        n = p.dist.shape[0]
        taken = p.taken if p.taken is not None else torch.zeros(n, dtype=torch.bool, device=dev)
        parts += [p.dist.float().reshape(-1), p.min_dist.float().reshape(-1), taken.float()]
        if p.weight is not None:
            parts.append(p.weight.float().reshape(-1))
    host = torch.cat(parts).detach().cpu().numpy()  # the one device -> host copy
    picks, at = [], 0
    for p in problems:
        n = p.dist.shape[0]
        dist = host[at:at + n * n].reshape(n, n)
        mind = host[at + n * n:at + n * n + n].copy()
        taken = host[at + n * n + n:at + n * n + 2 * n] > 0.5
        at += n * n + 2 * n
        w = None
        if p.weight is not None:
            w, at = host[at:at + n], at + n
        num_taken = int(taken.sum())  # on the host copy: no read of the device
        if p.num_taken is not None and p.num_taken != num_taken:
            raise ValueError(f"greedy_max_min: num_taken={p.num_taken} but `taken` holds {num_taken} tokens")
        k = max(0, min(int(p.k), n - num_taken))
        out = np.empty(k, dtype=np.int64)
        s = np.empty(n, dtype=np.float32)
        fill = np.float32(p.fill)
        for i in range(k):
            if w is None:
                s[:] = mind
            else:
                np.multiply(w, mind, out=s)
            np.putmask(s, taken, fill)  # the taken tokens' score: below every candidate's
            j = int(s.argmax())  # the first maximum, as torch.argmax
            out[i] = j
            taken[j] = True
            np.minimum(mind, dist[j], out=mind)
        picks.append(out)
    flat = torch.from_numpy(np.concatenate(picks)).to(dev)  # one host -> device copy
    return list(torch.split(flat, [len(x) for x in picks]))


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of every entry by descending score (ties: lower index ranks first)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, scores.numel() + 1, device=scores.device)
    return ranks


def masked_take(x: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``x[mask]`` (in order) for a 1-D ``mask`` the caller knows to hold exactly ``count`` True
    entries: a stable sort instead of boolean indexing, so the size needs no host sync."""
    if count >= mask.numel():
        return x
    idx = torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]
    return x[idx]


@dataclass
class UnitLayout:
    """A sample's visual tokens grouped per unit (image / crop / frame), read with one host sync.

    Index tensors are on the signals' device and ascending; candidates at or after ``num_stock``
    (the [CLS] tokens the engine offers beyond the stock ones) come last in every group.
    ``num_stock[u]`` / ``num_cls_stock[u]`` / ``num_patch_stock[u]``: unit u's tokens / [CLS]
    tokens / patch tokens below ``num_stock``. ``unit_pos``: the per-unit grid position as Python
    pairs (None when not given); ``grid``: patches per grid side, round(sqrt(max patch + 1)) (1 if
    none), as :func:`block_order` uses them."""

    tokens: list[torch.Tensor]
    cls: list[torch.Tensor]
    patches: list[torch.Tensor]
    newlines: torch.Tensor
    num_stock: list[int]
    num_cls_stock: list[int]
    num_patch_stock: list[int]
    num_newline_stock: int
    unit_pos: list[tuple[int, int]] | None
    grid: int

    @property
    def num_units(self) -> int:
        return len(self.tokens)


def unit_layout(unit: torch.Tensor, patch: torch.Tensor | None = None, num_stock: int | None = None,
                unit_pos: torch.Tensor | None = None) -> UnitLayout:
    """Group the tokens of one sample by unit (``unit`` -1: LLaVA-NeXT newline tokens) and, within a
    unit, into [CLS] (``patch`` < 0) and patch tokens, on the device, with a single host read (the
    group sizes, the largest patch index and ``unit_pos``). Replaces per-unit
    ``torch.nonzero(unit == u)`` / boolean masks, which cost one sync each."""
    n = unit.numel()
    dev = unit.device
    num_stock = n if num_stock is None else int(num_stock)
    idx = torch.arange(n, device=dev)
    extra = (idx >= num_stock).long()
    is_patch = (patch >= 0).long() if patch is not None else torch.ones_like(extra)
    # key 0/1: newline (stock / extra); 2 + 4u + {0: [CLS] stock, 1: [CLS] extra, 2: patch stock, 3: patch extra}
    key = torch.where(unit >= 0, 2 + 4 * unit + 2 * is_patch + extra, extra)
    nbins = 4 * n + 2
    hist = torch.zeros(nbins, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    parts = [hist]
    if n:
        parts.append(unit.max().reshape(1).to(torch.long))
        parts.append((patch if patch is not None else unit.new_full((1,), -1)).max().reshape(1).to(torch.long))
    if unit_pos is not None:
        parts.append(unit_pos.reshape(-1).to(device=dev, dtype=torch.long))
    host = torch.cat(parts).tolist()  # the one host sync
    counts = host[:nbins]
    umax, pmax = (host[nbins], host[nbins + 1]) if n else (-1, -1)
    pos = host[nbins + (2 if n else 0):] if unit_pos is not None else None
    num_units = max(umax + 1, 0)
    counts = counts[: 2 + 4 * num_units]
    by_key = torch.split(torch.sort(key, stable=True).indices, counts)
    unit_key = torch.where(unit >= 0, unit + 1, 0)
    per_unit = [counts[0] + counts[1]] + [sum(counts[2 + 4 * u: 6 + 4 * u]) for u in range(num_units)]
    by_unit = torch.split(torch.sort(unit_key, stable=True).indices, per_unit)
    cls, patches = [], []
    for u in range(num_units):
        g = by_key[2 + 4 * u: 6 + 4 * u]
        cls.append(torch.cat([g[0], g[1]]) if counts[3 + 4 * u] else g[0])
        patches.append(torch.cat([g[2], g[3]]) if counts[5 + 4 * u] else g[2])
    return UnitLayout(
        tokens=list(by_unit[1:]), cls=cls, patches=patches, newlines=by_unit[0],
        num_stock=[counts[2 + 4 * u] + counts[4 + 4 * u] for u in range(num_units)],
        num_cls_stock=[counts[2 + 4 * u] for u in range(num_units)],
        num_patch_stock=[counts[4 + 4 * u] for u in range(num_units)],
        num_newline_stock=counts[0],
        unit_pos=[(pos[2 * i], pos[2 * i + 1]) for i in range(len(pos) // 2)] if pos is not None else None,
        grid=int(round((pmax + 1) ** 0.5)) if pmax >= 0 else 1,
    )


def uniform_targets(num_remaining: int, contextual: int, device: torch.device | None = None) -> torch.Tensor:
    """VisionZip's merge targets: positions 0, s, 2s, ... (s = max(1, R // C)) of the remaining
    list, the first C of them."""
    if contextual <= 0 or num_remaining <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step, device=device)[:contextual]


def contextual_merge(metric: torch.Tensor, remaining: torch.Tensor, contextual: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip-style contextual tokens over the ``remaining`` token indices (in their order).

    metric: (n, d) per-token merge metric (e.g. the vision layer's head-mean keys); cosine
    similarity is used. Returns ``(targets, assign)``: target token indices (C,) and, for all ``n``
    tokens, the target slot each remaining non-target token joins (argmax cosine, ties to the lowest
    slot) or -1. Pair with ``Selection(..., rule="target_plus_mean")`` for VisionZip's
    ``target + mean(assigned)``.
    """
    assign = torch.full((n,), -1, dtype=torch.long, device=metric.device)
    r = remaining.numel()
    pos = uniform_targets(r, contextual, device=remaining.device)
    targets = remaining[pos]
    if targets.numel() == 0:
        return targets, assign
    if r > pos.numel():
        rest = torch.ones(r, dtype=torch.bool, device=remaining.device)
        rest[pos] = False
        others = masked_take(remaining, rest, r - pos.numel())
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        sim = m[others] @ m[targets].T  # (R - C, C)
        assign[others] = sim.argmax(dim=1)  # first maximum = lowest target slot
    return targets, assign


def official_contextual_merge(metric: torch.Tensor, remaining: torch.Tensor, contextual: int, n: int,
                              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`contextual_merge` with VisionZip's official numerics (the reference mode of VisionZip and of
    DUET-VLM, whose stage 1 is VisionZip's code): the metric in ``dtype``, normalised without clamp
    (``m / m.norm()``), similarity by ``torch.bmm``, ``argmax`` (first maximum = lowest target slot). Same
    targets / assign convention."""
    assign = torch.full((n,), -1, dtype=torch.long, device=metric.device)
    r = remaining.numel()
    pos = uniform_targets(r, contextual, device=remaining.device)
    targets = remaining[pos]
    if targets.numel() == 0 or r <= pos.numel():
        return targets, assign
    m = metric[remaining].to(dtype)
    m = m / m.norm(dim=-1, keepdim=True)
    rest = torch.ones(r, dtype=torch.bool, device=remaining.device)
    rest[pos] = False
    other_pos = masked_take(torch.arange(r, device=remaining.device), rest, r - pos.numel())
    sim = torch.bmm(m[other_pos][None], m[pos][None].transpose(1, 2))[0]  # (R - C, C)
    assign[remaining[other_pos]] = sim.argmax(dim=1)
    return targets, assign


def dominant_contextual(scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int,
                        candidates: torch.Tensor | None = None, rule: str = "target_plus_mean",
                        space: str = "vision") -> Selection:
    """The VisionZip recipe on one unit: top-``dominant`` tokens by ``scores`` (kept in ascending
    index order), the rest merged into ``contextual`` tokens. ``candidates`` restricts both to a
    subset of token indices (e.g. one crop); default all tokens."""
    n = scores.numel()
    cand = torch.arange(n, device=scores.device) if candidates is None else candidates.to(scores.device)
    top = cand[topk_desc(scores[cand], dominant)]
    keep = top.sort().values
    remaining = masked_take(cand, ~torch.isin(cand, keep), cand.numel() - keep.numel())
    targets, assign = contextual_merge(metric, remaining, contextual, n)
    return Selection(keep=keep, targets=targets, assign=assign, rule=rule, space=space)


def scale_layers(layers: "list[int] | tuple[int, ...]", num_layers: int, reference: int = 32) -> tuple[int, ...]:
    """Map decoder-layer indices stated for a ``reference``-layer LLM (32 for 7B) onto a model with
    ``num_layers`` layers: round(k * num_layers / reference), clipped to 1..num_layers-1 and made
    strictly increasing. Identity when num_layers == reference (e.g. 13B's 40 layers scale 8 -> 10)."""
    out: list[int] = []
    for k in layers:
        v = min(max(1, round(k * num_layers / reference)), num_layers - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        if v > num_layers - 1:
            raise ValueError(f"cannot place {len(layers)} stages in a {num_layers}-layer LLM")
        out.append(v)
    return tuple(out)


def best_product_split_k1(u: torch.Tensor, w: torch.Tensor, total: int) -> torch.Tensor | None:
    """:func:`best_product_split`'s k1 as a 0-d tensor on ``u``'s device (no host sync), or None
    when no split is feasible."""
    nu, nw = u.numel(), w.numel()
    if total > nu + nw:  # every k1 would leave k2 > len(w) or take k1 > len(u)
        return None
    cu = torch.cat([u.new_zeros(1), u.float().cumsum(0)])
    cw = torch.cat([w.new_zeros(1), w.float().cumsum(0)])
    k1 = torch.arange(0, total + 1, device=u.device)
    k2 = total - k1
    ok = (k1 <= nu) & (k2 <= nw)
    val = cu[k1.clamp(max=nu)] * cw.to(u.device)[k2.clamp(max=nw)]
    val = torch.where(ok, val, torch.full_like(val, -float("inf")))
    return torch.argmax(val)  # first maximum


def best_product_split(u: torch.Tensor, w: torch.Tensor, total: int) -> tuple[int, int]:
    """AdaV's adaptive split: k1 + k2 = ``total`` maximising (sum of the k1 largest u) x (sum of the
    k2 largest w); ``u``, ``w`` sorted descending. Infeasible splits (k1 > len(u) or k2 > len(w)) are
    skipped; the first maximiser (smallest k1) wins. If no split is feasible, takes all of both.
    One host sync (the answer)."""
    k1 = best_product_split_k1(u, w, total)
    if k1 is None:
        return int(u.numel()), int(w.numel())
    best = int(k1)
    return best, total - best


def _arange_runs(runs: list[tuple[int, int]], device) -> torch.Tensor:
    """The concatenation of ``arange(start, start + length)`` over ``runs``, built on ``device``."""
    merged: list[list[int]] = []
    for start, length in runs:
        if length <= 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += length
        else:
            merged.append([start, length])
    if not merged:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in merged])


def cat_parts(parts: list) -> torch.Tensor:
    """``torch.cat`` of the non-empty parts (a lone part as it is: no copy, no kernel); all empty: the first
    part (empty)."""
    full = [p for p in parts if p.numel()]
    if len(full) == 1:
        return full[0]
    return torch.cat(full) if full else parts[0][:0]


def per_unit_selection(per_unit: list, newlines: torch.Tensor, assign: torch.Tensor, unit_pos, patch: torch.Tensor,
                       mode: str, grid: int | None = None, *, rule: str = "target_plus_mean", space: str = "vision",
                       captured: bool = False) -> Selection:
    """The :class:`Selection` of a per-unit dominant + contextual selection (VisionZip's recipe per image /
    crop / frame): ``per_unit`` [(unit, dominant indices, contextual target indices)] in unit order, the
    dominant tokens then ``newlines`` kept, ``assign`` each merged token's target slot (slots numbered over
    every unit's targets in order), the outputs laid out by :func:`block_order` (``mode``, ``grid``,
    ``captured``). Without a target: the kept tokens only."""
    keep = cat_parts([d for _, d, _ in per_unit] + [newlines])
    order = block_order(per_unit, int(newlines.numel()), unit_pos, patch, mode, grid=grid, captured=captured)
    targets = [t for _, _, t in per_unit if t.numel()]
    if not targets:
        return Selection(keep=keep, order=order)
    return Selection(keep=keep, targets=cat_parts(targets), assign=assign, rule=rule, space=space, order=order)


def block_order(per_unit: list, n_newlines: int, unit_pos: "torch.Tensor | list | None", patch: torch.Tensor,
                mode: str = "unit", grid: int | None = None, captured: bool = False) -> torch.Tensor | None:
    """Output permutation for a multi-unit selection whose outputs are laid out as
    [dominant of unit 0, dominant of unit 1, ..., newlines][contextual of unit 0, unit 1, ...].

    per_unit: [(unit, dominant token indices, contextual target indices)] in unit order.
    mode ``unit``: per unit [dominant, contextual], units in order, newlines last.
    ``spatial``: per unit, dominant and contextual tokens by source index (each merged token at its
    target's place). ``grid_raster`` (VisionZip / VisionDrop LLaVA-NeXT re-assembly): units without a
    grid position (the base crop) as in ``unit``; then the grid crops' dominant patches by their
    row-major position on the full (rows x grid) x (cols x grid) patch grid; then those crops'
    [CLS] tokens; then their contextual tokens. Returns None for the identity order.

    ``unit_pos`` (U, 2) may be a tensor or, with ``grid`` (patches per grid side), the host values
    :class:`UnitLayout` read already. Built on the device: no host sync per token (one read of
    ``unit_pos`` and the largest patch index when they are given as tensors in ``grid_raster`` mode).
    When every host-known piece sits in place, the order built on the device is compared with the
    identity (one host read) to return None; ``captured`` (a captured prefill) skips that read and returns
    the order even when it is the identity (applying it changes nothing).
    """
    dev = patch.device
    n_keep = sum(int(d.numel()) for _, d, _ in per_unit) + n_newlines
    if per_unit and mode not in ("unit", "spatial", "grid_raster"):
        raise ValueError(f"order mode must be unit / spatial / grid_raster, got {mode!r}")
    pos = None
    if mode == "grid_raster" and unit_pos is not None and per_unit:
        if isinstance(unit_pos, torch.Tensor):
            if grid is None:
                parts = [unit_pos.reshape(-1).to(device=dev, dtype=torch.long)]
                if patch.numel():
                    parts.append(patch.max().reshape(1).to(torch.long))
                host = torch.cat(parts).tolist()  # one host read
                pmax = host[unit_pos.numel()] if patch.numel() else -1
                grid = int(round((pmax + 1) ** 0.5)) if pmax >= 0 else 1
                host = host[: unit_pos.numel()]
            else:
                host = unit_pos.reshape(-1).tolist()
            pos = [(host[2 * i], host[2 * i + 1]) for i in range(len(host) // 2)]
        else:
            pos = [tuple(int(v) for v in p) for p in unit_pos]
            if grid is None:
                pmax = int(patch.max()) if patch.numel() else -1
                grid = int(round((pmax + 1) ** 0.5)) if pmax >= 0 else 1
    # the output as ordered pieces: (sort key, slots) with slots a host run (start, length) or a tensor
    pieces: list[tuple[tuple, object]] = []
    raster: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []  # grid crops' dominant (tokens, slots, r, c)
    k_off = t_off = 0
    for u, d_u, t_u in per_unit:
        nd, nt = int(d_u.numel()), int(t_u.numel())
        d_run, t_run = (k_off, nd), (n_keep + t_off, nt)
        k_off += nd
        t_off += nt
        if mode == "spatial":
            src = torch.cat([d_u, t_u]).to(dev)
            slots = torch.cat([torch.arange(d_run[0], d_run[0] + nd, device=dev),
                               torch.arange(t_run[0], t_run[0] + nt, device=dev)])
            pieces.append(((0, u, 0), slots[torch.argsort(src, stable=True)]))
        elif mode == "grid_raster" and pos is not None and pos[u][0] >= 0:
            raster.append((d_u.to(dev), torch.arange(d_run[0], d_run[0] + nd, device=dev), pos[u][0], pos[u][1]))
            pieces.append(((4, u, 0), t_run))
        else:
            pieces.append(((0, u, 0), d_run))
            pieces.append(((0, u, 1), t_run))
    if raster:
        # grid crops' dominant outputs: patches by global raster position, then [CLS] tokens by slot
        width = (max(c for *_, c in raster) + 1) * grid
        rows_span = (max(r for *_, r, _ in raster) + 1) * grid
        after = rows_span * width  # every [CLS] sorts after every patch
        keys, slots = [], []
        for tok, sl, r, c in raster:
            p = patch.to(dev)[tok]
            key = (r * grid + torch.div(p, grid, rounding_mode="floor")) * width + (c * grid + p % grid)
            keys.append(torch.where(p < 0, after + sl, key))
            slots.append(sl)
        keys, slots = torch.cat(keys), torch.cat(slots)
        pieces.append(((2, 0, 0), slots[torch.argsort(keys)]))
    pieces.append(((5, 0, 0), (k_off, n_newlines)))
    pieces.sort(key=lambda x: x[0])
    # identity without looking at the device: every host run in place, and any device piece covering
    # exactly its own output range (then compare it)
    at, maybe_identity, device_pieces = 0, True, []
    for _, sl in pieces:
        length = sl[1] if isinstance(sl, tuple) else int(sl.numel())
        if isinstance(sl, tuple):
            maybe_identity &= length == 0 or sl[0] == at
        else:
            device_pieces.append((at, sl))
        at += length
    if maybe_identity and not device_pieces:
        return None
    parts, run = [], []
    for _, sl in pieces:
        if isinstance(sl, tuple):
            run.append(sl)
        else:
            if run:
                parts.append(_arange_runs(run, dev))
                run = []
            parts.append(sl)
    if run:
        parts.append(_arange_runs(run, dev))
    order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=dev)
    if maybe_identity and not captured and torch.equal(order, torch.arange(order.numel(), device=dev)):
        return None
    return order


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 cosine similarities of the rows of ``a`` (M, D) and ``b`` (N, D; default ``a``) -> (M, N); rows
    normalised by their norm clamped at 1e-12 (a zero row gives zeros)."""
    an = a.float() / a.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if b is None:
        return an @ an.T
    return an @ (b.float() / b.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)).T


def text_to_image_score(text: torch.Tensor, visual: torch.Tensor, temperature: float = 100.0,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """AdaV's s_j: for each text token a softmax over visual tokens of ``temperature`` x cosine
    similarity, then the max over text tokens. text (Tt, D), visual (N, D) -> (N,), fp32.
    ``mask`` (Tt,) bool: only these text rows count (a padded text block, or the question among the
    text; no boolean indexing, so no host sync). The values of ``text[mask]`` up to the matmul's rounding (a
    different row count may round the last bit differently on a CPU); a mask with no row gives zeros."""
    p = torch.softmax(temperature * cosine_matrix(text, visual), dim=1)
    if mask is not None:
        p = p.masked_fill(~mask.to(p.device)[:, None], 0.0)  # probabilities are > 0: a masked row never wins
    return p.max(dim=0).values if p.shape[0] else p.new_zeros(p.shape[1])


def merge_tokens(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Merged (contextual) tokens of ``sel`` from rows of ``x`` (n, D), computed in fp32 (``sel.merge_kept``: the
    kept tokens with a slot join their target too)."""
    tg = sel.targets.to(x.device)
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if not sel.merge_kept:
        taken[sel.keep.to(x.device)] = True
    taken[tg] = True
    assign = sel.assign.to(x.device).masked_fill(taken, -1)  # not assign[taken] = -1: a boolean index syncs
    c = tg.numel()
    xf = x.float()
    m = assign >= 0  # tokens merged somewhere; the others add zero (no data-dependent shapes)
    slot = assign.clamp(min=0)
    sums = torch.zeros(c, x.shape[1], device=x.device, dtype=torch.float32)
    counts = torch.zeros(c, device=x.device, dtype=torch.float32)
    if c:
        sums.index_add_(0, slot, xf * m[:, None])
        counts.index_add_(0, slot, m.float())
    if sel.rule == "target_plus_mean":
        return xf[tg] + sums / counts.clamp(min=1)[:, None]
    if sel.rule == "mean":
        return (xf[tg] + sums) / (counts + 1)[:, None]
    raise ValueError(f"unknown merge rule {sel.rule!r}")


# ----------------------------------------------------------------------------------------------
# In-LLM schedules: layer-average budgets (FastV, DART, PyramidDrop, SparseVLM) and the last-row
# top-k of PyramidDrop's stage (VScan's too)
# ----------------------------------------------------------------------------------------------

#: in-LLM schedules are stated for LLaVA-1.5-7B: 32 decoder layers ...
REFERENCE_DEPTH = 32
#: ... and 576 visual tokens
REFERENCE_TOKENS = 576


def round_half_up(x: Fraction | float) -> int:
    """Nearest integer, halves rounded up (Python's round() rounds halves to even)."""
    return math.floor(Fraction(x) + Fraction(1, 2))


def equivalent_kept_count(budget: int, n_visual: int, layer: int, num_layers: int) -> int:
    """FastV's kept count after layer K for an equivalent (layer-average) budget B:
    n_K = (L*B - K*N) / (L - K), rounded half up, clipped to 0..N. Exact rational arithmetic."""
    L, K, N = int(num_layers), int(layer), int(n_visual)
    if not 1 <= K < L:
        raise ValueError(f"FastV layer K={K} must be in 1..{L - 1}")
    num, den = L * int(budget) - K * N, L - K
    n = (2 * num + den) // (2 * den)  # round_half_up(num / den) in integers (traceable: no Fraction)
    return max(0, min(N, n))


def scaled_count(n_visual: int, count_of_576: int) -> int:
    """A count stated for 576 candidates, for a sample with N visual tokens: floor(N * c / 576)."""
    return (int(n_visual) * int(count_of_576)) // REFERENCE_TOKENS


def stage_layer_counts(n_visual: int, layers: Sequence[int], counts: Sequence[int], num_layers: int) -> list[int]:
    """Visual tokens in the input of every decoder layer for a pure drop schedule: N before
    ``layers[0]``, ``counts[s]`` from ``layers[s]`` on (a count never exceeds the previous one)."""
    out, cur, bounds = [], int(n_visual), [*layers, num_layers]
    out += [cur] * bounds[0]
    for s, c in enumerate(counts):
        cur = min(cur, int(c))
        out += [cur] * (bounds[s + 1] - bounds[s])
    return out


def fit_stage_counts(n_visual: int, counts: Sequence[int], layers_ref: Sequence[int], layers: Sequence[int],
                     num_layers: int, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Stage counts for ``layers`` on a ``num_layers``-deep LLM with the same layer average as
    ``counts`` after ``layers_ref`` on the ``reference_depth``-layer LLM they were stated for (our
    design). Unchanged on the reference depth; otherwise every count is scaled by one factor
    alpha = (L * E_ref - K_1 * N) / sum_s len_s * c_s (len_s = layers stage s spans on the new
    depth), rounded half up and clipped to 0..N, so the schedule keeps its shape. When even
    alpha = 0 overshoots (K_1 * N / L > E_ref) all counts are 0: the closest reachable average."""
    n = int(n_visual)
    if int(num_layers) == int(reference_depth) and tuple(layers) == tuple(layers_ref):
        return tuple(min(n, int(c)) for c in counts)
    ref_total = sum(stage_layer_counts(n, layers_ref, counts, reference_depth))
    target = Fraction(ref_total * int(num_layers), int(reference_depth))
    bounds = [*layers, num_layers]
    spans = [bounds[s + 1] - bounds[s] for s in range(len(counts))]
    denom = sum(sp * min(n, int(c)) for sp, c in zip(spans, counts))
    if denom == 0:
        return tuple(0 for _ in counts)
    alpha = max(Fraction(0), (target - layers[0] * n) / denom)
    return tuple(max(0, min(n, round_half_up(alpha * min(n, int(c))))) for c in counts)


def last_row_topk(last_row_attn: torch.Tensor, visual: torch.Tensor, k: int, numerics: str = "ours",
                  method: str = "pdrop") -> torch.Tensor:
    """PyramidDrop's stage rule (VScan's too): ``last_row_attn`` (H, S) = the last instruction token's attention
    probabilities under the boundary layer's q/k, per head. Returns the indices (into ``visual``)
    of the top-``k`` visual tokens by head-mean attention, ascending (ties: lower index).
    ``numerics="official"``: the rows cast to float16, the official (H, 1, S) mean over heads, the
    visual columns, the mean over the one query row, all in fp16, then ``torch.topk``."""
    check_numerics(method, numerics)
    if numerics == "official":
        per_head = last_row_attn.to(torch.float16)[:, None]  # (H, 1, S) as the official attn_weights
        scores = per_head.mean(dim=0)[:, visual].mean(dim=0)  # heads, then the query row(s)
        return scores.topk(max(0, min(int(k), scores.numel()))).indices.sort().values
    scores = last_row_attn.float().mean(0)[visual]
    return topk_desc(scores, k).sort().values


# ----------------------------------------------------------------------------------------------
# VScan's stage 1 (arXiv 2505.22654; official ``llava_arch.py`` ``encode_images``): per unit, a windowed
# local scan of a shallow CLIP layer's [CLS] row, a global scan of a deep one, every other token merged into
# its most similar pick. Used by VScan (baselines/vscan.py) and by TRIO's "w/ VE" option (baselines/trio.py,
# ``encoder="vscan"``: the official TRIO README's default command runs the same stage before the LLM).
# docs/methods/vscan.md has the layer / window mappings and the reference mode.
# ----------------------------------------------------------------------------------------------

#: the local scan's encoder layer: official ``attentions[5]`` of CLIP-L/14's 24 layers
VSCAN_LOCAL_LAYER = 5
#: the CLIP-L/14 tower depth the official layers are stated for
REFERENCE_TOWER = 24
#: official 6 x 6 windows on the 24 x 24 grid: 4 per side
VSCAN_WINDOWS_PER_SIDE = 4
#: a local quota not divisible by the window count: "drop" (official) or "global" (ours)
VSCAN_REMAINDERS = ("drop", "global")
#: official dtype of the scans' [CLS] rows and of the merge features (``.to(images.dtype)``, fp16 projector)
VSCAN_OFFICIAL_DTYPE = torch.float16
#: rows of the official cosine evaluated at a time (same values, bounded memory)
VSCAN_COSINE_CHUNK = 128


def _vscan_official_scans(a_loc, a_glob, unit, patch, pruned_tok, num_units, rows, cols, s, k_win, g_unit):
    """Reference-mode scans (official calls): a_loc / a_glob (T,) fp16 head means. Local: ``torch.topk``
    (k_win) of each window's row-major score vector (windows cut by the grid edge padded with -inf, a
    pad never kept). Global: per unit the row of its patch scores (Video-LLaVA: the frame's [CLS] as one
    more column) with the local picks set to 0, ``torch.topk`` (k = g_unit[u]); -inf = absent. Returns
    the (T,) bool masks of the local and global picks (they may overlap, as the official indices)."""
    dev = a_loc.device
    n = a_loc.numel()
    P = rows * cols
    is_patch = pruned_tok & (patch >= 0)
    ninf = torch.tensor(float("-inf"), dtype=a_loc.dtype, device=dev)
    # (U, P + 1) token index of each unit's patch (n = absent); column P = the unit's [CLS] (video)
    slot = torch.where(is_patch, unit.clamp(min=0) * (P + 1) + patch.clamp(min=0), num_units * (P + 1))
    is_cls = pruned_tok & (patch < 0) & (unit >= 0)
    slot = torch.where(is_cls, unit.clamp(min=0) * (P + 1) + P, slot)
    tok = torch.full((num_units * (P + 1) + 1,), n, dtype=torch.long, device=dev)
    tok = tok.scatter_(0, slot, torch.arange(n, device=dev))[:-1].view(num_units, P + 1)
    loc_ext = torch.cat([a_loc, ninf.reshape(1)])
    # local: (U * nw, s * s) window vectors, row-major inside each window
    nwr, nwc = math.ceil(rows / s), math.ceil(cols / s)
    cell, w_id = torch.arange(s * s, device=dev), torch.arange(nwr * nwc, device=dev)
    dy, dx = torch.div(cell, s, rounding_mode="floor"), cell % s
    wi, wj = torch.div(w_id, nwc, rounding_mode="floor"), w_id % nwc
    r, c = wi[:, None] * s + dy[None], wj[:, None] * s + dx[None]  # (nw, s*s)
    pidx = torch.where((r < rows) & (c < cols), r * cols + c, torch.full_like(r, P))  # P -> pad (no [CLS] here)
    wtok = tok[:, :P].gather(1, pidx.clamp(max=P - 1).reshape(1, -1).expand(num_units, -1)).view(num_units, -1, s * s)
    wtok = torch.where((pidx < P)[None], wtok, torch.full_like(wtok, n)).reshape(-1, s * s)
    local = torch.zeros(n + 1, dtype=torch.bool, device=dev)
    k = min(int(k_win), s * s)
    if k > 0:
        picked = torch.topk(loc_ext[wtok], k, dim=1)[1]
        ptok = wtok.gather(1, picked)
        local[ptok] = loc_ext[ptok] > float("-inf")
    local = local[:n] & is_patch
    # global: the local picks zeroed (official), absent -inf
    g = torch.where(local, torch.zeros((), dtype=a_glob.dtype, device=dev), a_glob)
    glob_ext = torch.cat([g, ninf.reshape(1)])
    width = P + 1 if bool(is_cls.any()) else P  # the [CLS] column only where a unit has one (video)
    gtok = tok[:, :width]
    grow = glob_ext[gtok]
    glob = torch.zeros(n + 1, dtype=torch.bool, device=dev)
    ks = [min(int(x), width) for x in g_unit]
    if len(set(ks)) == 1:  # one batched call, as the official (B, 576) topk
        if ks[0] > 0:
            ti = gtok.gather(1, torch.topk(grow, ks[0], dim=1)[1])
            glob[ti] = glob_ext[ti] > float("-inf")
    else:
        for u, ku in enumerate(ks):
            if ku > 0:
                ti = gtok[u].gather(0, torch.topk(grow[u][None], ku, dim=1)[1][0])
                glob[ti] = glob_ext[ti] > float("-inf")
    glob = glob[:n] & pruned_tok
    return local, glob


def _vscan_official_assign(features, unit, targets, others_mask):
    """Reference-mode assignment: per unit ``F.cosine_similarity`` of the fp16 features of its other tokens
    against its targets (official (1, R, 1, D) x (1, 1, m, D), dim 3), ``argmax`` = first maximum.
    Returns (T,) long: the index into ``targets`` of each other token, -1 elsewhere."""
    dev = features.device
    n = unit.numel()
    x = features.to(VSCAN_OFFICIAL_DTYPE)
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    t_unit = unit[targets]
    for u in torch.unique(t_unit).tolist():
        slots = torch.nonzero(t_unit == u).flatten()
        others = torch.nonzero(others_mask & (unit == u)).flatten()
        if others.numel() == 0:
            continue
        ret = x[targets[slots]][None, None]  # (1, 1, m, D)
        best = [F.cosine_similarity(x[others[a:a + VSCAN_COSINE_CHUNK]][None, :, None], ret, dim=3).argmax(dim=2)[0]
                for a in range(0, others.numel(), VSCAN_COSINE_CHUNK)]
        assign[others] = slots[torch.cat(best)]
    return assign


def split_budget(budget: int) -> tuple[int, int]:
    """(stage 1 per unit, stage 2 per unit) for ``budget`` equivalent tokens per unit (the layer average
    with the stage at half depth): stage 2 = B // 2, stage 1 = 2B - stage 2 (64 -> 96 / 32, official;
    128 -> 192 / 64, 192 -> 288 / 96, the spec's design)."""
    s2 = int(budget) // 2
    return 2 * int(budget) - s2, s2


def local_layer_for(num_vision_layers: int) -> int:
    """The local scan's encoder layer (0-based, as ``attentions[i]``): official 5 of 24, scaled as
    floor(5 * n / 24) (0 on the tiny 3-layer towers, strictly below their select layer 1)."""
    return (VSCAN_LOCAL_LAYER * int(num_vision_layers)) // REFERENCE_TOWER


def window_side(grid: int, windows_per_side: int = VSCAN_WINDOWS_PER_SIDE) -> int:
    """Window side s in patches: ``windows_per_side`` windows per side (official 4: 6 x 6 on 24 x 24)
    where every window still holds at least 2 x 2 patches, else fewer (the tiny 4 x 4 grid: 2 x 2 windows
    of 2 x 2); s = ceil(grid / windows per side)."""
    wps = max(1, min(int(windows_per_side), int(grid) // 2))
    return max(1, math.ceil(int(grid) / wps))


def vscan_stage1(local_attn: torch.Tensor, global_attn: torch.Tensor, features: torch.Tensor,
                 unit: torch.Tensor, patch: torch.Tensor, grid: tuple[int, int], budget: int, *,
                 window: int | None = None, local_ratio: float = 0.5, remainder: str = "drop",
                 unit_host: torch.Tensor | None = None, return_scans: bool = False, numerics: str = "ours",
                 layout=None, local_host: tuple | None = None):
    """VScan's stage 1 for one sample (all its units).

    local_attn / global_attn: (H, T) or (T,) [CLS] query rows of the local / global layer (head mean
    taken here, fp32); features: (T, D) projected tokens (merge space); unit: (T,) unit id (-1 = NeXT
    newline, kept as layout); patch: (T,) row-major patch index in the unit's ``grid`` (-1 = [CLS], e.g. a
    Video-LLaVA frame's, which is a global-scan candidate only); budget: T per unit (a unit with at most T
    tokens is kept whole); window: window side (None = :func:`window_side`); remainder: ``drop`` (official:
    a local quota not divisible by the window count is lost) or ``global`` (given to the global scan);
    unit_host: host copy of ``unit`` (avoids a device read). ``layout`` (the planned
    :func:`llava.ops.unit_layout` of ``unit``) and ``local_host`` (per unit its local picks,
    :func:`local_counts`, from the host structure): no host read at all (the fast path's captured prefill).

    Returns a :class:`Selection`: ``keep`` = newlines and whole units, ``targets`` = the scanned tokens,
    ``assign`` = nearest target of the same unit (cosine), rule ``mean`` in projected space, ``order`` =
    ascending token index. With ``return_scans`` also the (T,) bool masks of the local and global picks.
    ``numerics="official"``: reference mode (module doc): fp16 scores, the official ``torch.topk`` calls
    (local picks zeroed in the global row), fp16 ``F.cosine_similarity`` for the assignment.
    """
    check_numerics("vscan", numerics)
    if remainder not in VSCAN_REMAINDERS:
        raise ValueError(f"vscan: remainder must be one of {VSCAN_REMAINDERS}, got {remainder!r}")
    dev = features.device
    n = int(unit.numel())
    if layout is not None:  # planned on the host: the sizes are Python ints, nothing read here
        if numerics == "official" or local_host is None:
            raise ValueError("vscan: a planned layout needs numerics='ours' and the planned local counts")
        uh = None
        num_units, sizes = layout.num_units, list(layout.num_stock)
    else:
        uh = (unit_host if unit_host is not None else unit.cpu()).to(torch.long)
        num_units = int(uh.max()) + 1 if n and int(uh.max()) >= 0 else 0
        sizes = torch.bincount(uh[uh >= 0], minlength=num_units).tolist() if num_units else []
    T = int(budget)
    pruned = [s > T for s in sizes]
    no_scan = torch.zeros(n, dtype=torch.bool, device=dev)
    if not any(pruned):
        sel = Selection(keep=torch.arange(n, device=dev))
        return (sel, no_scan, no_scan) if return_scans else sel
    official = numerics == "official"
    sdt = VSCAN_OFFICIAL_DTYPE if official else torch.float32  # official: rows cast to fp16, head mean in fp16
    a_loc = local_attn.to(sdt).reshape(-1, n).mean(0)
    a_glob = global_attn.to(sdt).reshape(-1, n).mean(0)
    rows, cols = int(grid[0]), int(grid[1])
    s = window_side(max(rows, cols)) if window is None else int(window)
    nwr, nwc = math.ceil(rows / s), math.ceil(cols / s)
    nw = nwr * nwc
    k_win = int(T * local_ratio) // nw
    n_local_quota = int(T * local_ratio)
    g_official = T - n_local_quota

    if official:
        pruned_h = torch.tensor(pruned + [False], dtype=torch.bool)
        pruned_tok_h = pruned_h[uh]
        pruned_tok = pruned_tok_h.to(dev)
        unit_d = unit.to(dev).long()
        if remainder == "global":  # per unit: T minus its local picks (one host read)
            local, _ = _vscan_official_scans(a_loc, a_glob, unit_d, patch.to(dev).long(), pruned_tok, num_units, rows,
                                       cols, s, k_win, [0] * num_units)
            n_loc = torch.bincount(unit_d[local], minlength=num_units).tolist()
            g_list = [T - x for x in n_loc]
        else:
            g_list = [g_official] * num_units
        local, glob = _vscan_official_scans(a_loc, a_glob, unit_d, patch.to(dev).long(), pruned_tok, num_units, rows,
                                      cols, s, k_win, g_list)
        picked = local | glob
        targets = torch.nonzero(picked).flatten()  # the one host read (picks may overlap, official)
        assign = _vscan_official_assign(features, unit_d, targets, pruned_tok & ~picked)
        keep_h = (~pruned_tok_h).nonzero().flatten()
        keep = keep_h.to(dev)
        order = torch.argsort(torch.cat([keep, targets])) if keep_h.numel() else None
        sel = Selection(keep=keep, targets=targets, assign=assign, rule="mean", space="projected", order=order)
        return (sel, local, glob) if return_scans else sel

    # ---- local scan: rank within (unit, window) by A_loc, descending, ties to the lower index
    if layout is not None:
        pruned_idx = [layout.tokens[u] for u in range(num_units) if pruned[u]]
        pruned_tok = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, torch.cat(pruned_idx), True)
    else:
        pruned_h = torch.tensor(pruned + [False], dtype=torch.bool)  # index -1 (newline) -> False
        pruned_tok_h = pruned_h[uh]  # host: token belongs to a unit being pruned
        pruned_tok = pruned_tok_h.to(dev)
    unit_d = unit.to(dev).long()
    p = patch.to(dev).long()
    in_window = pruned_tok & (p >= 0)
    r, c = torch.div(p.clamp(min=0), cols, rounding_mode="floor"), p.clamp(min=0) % cols
    win = unit_d.clamp(min=0) * nw + torch.div(r, s, rounding_mode="floor") * nwc + torch.div(c, s, rounding_mode="floor")
    sentinel = num_units * nw
    win = torch.where(in_window, win, torch.full_like(win, sentinel))
    o1 = torch.sort(a_loc, descending=True, stable=True).indices
    o2 = o1[torch.sort(win[o1], stable=True).indices]  # by window, then score desc, then index
    counts = torch.zeros(sentinel + 1, dtype=torch.long, device=dev).scatter_add_(0, win, torch.ones_like(win))
    starts = counts.cumsum(0) - counts
    w_sorted = win[o2]
    rank = torch.arange(n, device=dev) - starts[w_sorted]
    local = torch.zeros(n, dtype=torch.bool, device=dev)
    local[o2] = (rank < k_win) & (w_sorted < sentinel)

    # ---- global scan: per unit, the top-g of the rest by A_glob (padded unit x token matrix)
    maxn = max(sizes)
    if layout is not None:  # each unit's tokens ascending (= the stable sort by unit), n = padding column
        mat = torch.stack([F.pad(layout.tokens[u], (0, maxn - sizes[u]), value=n) for u in range(num_units)])
    else:
        order_h = torch.sort(uh, stable=True).indices
        starts_h = [0]
        for sz in [int((uh < 0).sum())] + sizes:
            starts_h.append(starts_h[-1] + sz)
        mat_h = torch.full((num_units, maxn), n, dtype=torch.long)  # n = padding column
        for u, sz in enumerate(sizes):
            a = starts_h[u + 1]
            mat_h[u, :sz] = order_h[a:a + sz]
        mat = mat_h.to(dev)
    neg = torch.tensor(float("-inf"), device=dev)
    g_scores = torch.where(pruned_tok & ~local, a_glob, neg)
    g_scores = torch.cat([g_scores, neg.reshape(1)])[mat]  # (U, maxn); padding -inf
    g_order = torch.sort(g_scores, dim=1, descending=True, stable=True).indices
    n_local = torch.zeros(num_units + 1, dtype=torch.long, device=dev).scatter_add_(
        0, torch.where(local, unit_d, torch.full_like(unit_d, num_units)), torch.ones_like(unit_d))[:num_units]
    if remainder == "global":
        g_unit = T - n_local  # (U,) on the device: each pruned unit ends with exactly T tokens
    else:
        g_unit = torch.full((num_units,), g_official, dtype=torch.long, device=dev)
    take = torch.arange(maxn, device=dev)[None] < g_unit[:, None]
    glob = torch.zeros(n + 1, dtype=torch.bool, device=dev)
    glob[torch.gather(mat, 1, g_order)] = take & torch.isfinite(torch.gather(g_scores, 1, g_order))
    glob = glob[:n] & pruned_tok

    # ---- how many targets: host-known unless a pruned unit's windows are cut (NeXT spatial_unpad)
    if remainder == "global":
        total = T * sum(pruned)
    else:
        full_local = sum(min(k_win, min(s, rows - i * s) * min(s, cols - j * s))
                         for i in range(nwr) for j in range(nwc))
        partial = [u for u, sz in enumerate(sizes) if pruned[u] and sz < rows * cols]
        n_loc = [full_local if pruned[u] else 0 for u in range(num_units)]
        if partial and local_host is not None:  # planned on the host from the structure (local_counts)
            for u in partial:
                n_loc[u] = int(local_host[u])
        elif partial:
            got = n_local.tolist()  # the one host read (cut windows)
            for u in partial:
                n_loc[u] = got[u]
        total = sum(n_loc[u] + g_official for u in range(num_units) if pruned[u])
    picked = local | glob
    targets = masked_take(torch.arange(n, device=dev), picked, total)

    # ---- merge: each other token of a pruned unit -> most similar target of the same unit (cosine)
    x = features.float()
    xn = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = xn @ xn[targets].T  # (T, m)
    same = unit_d[:, None] == unit_d[targets][None]
    sim = torch.where(same, sim, neg)
    nearest = sim.argmax(dim=1) if targets.numel() else torch.zeros(n, dtype=torch.long, device=dev)
    assign = torch.where(pruned_tok & ~picked, nearest, torch.full_like(nearest, -1))

    if layout is not None:  # newlines and whole units, ascending (a static count)
        kept_parts = [layout.newlines] + [layout.tokens[u] for u in range(num_units) if not pruned[u]]
        keep = torch.sort(torch.cat(kept_parts)).values
    else:
        keep_h = (~pruned_tok_h).nonzero().flatten()  # newlines and whole units (host layout)
        keep = keep_h.to(dev)
    order = None
    if keep.numel():
        order = torch.argsort(torch.cat([keep, targets]))
    sel = Selection(keep=keep, targets=targets, assign=assign, rule="mean", space="projected", order=order)
    return (sel, local, glob) if return_scans else sel


def local_counts(unit: torch.Tensor, patch: torch.Tensor, grid: tuple[int, int], budget: int, *,
                 window: int | None = None, local_ratio: float = 0.5) -> tuple[int, ...]:
    """Per unit, how many tokens the local scan of :func:`vscan_stage1` picks (0 for a unit kept whole),
    from the host structure only: the sum over its windows of min(k, patches present in the window) (a
    LLaVA-NeXT 'spatial_unpad' crop's windows may be cut). ``unit`` / ``patch``: host tensors. The fast
    path plans it (``baselines.vscan.VScan.plan_static``) so that the captured stage reads no count back."""
    u_h, p_h = unit.long(), patch.long()
    num_units = int(u_h.max()) + 1 if u_h.numel() and int(u_h.max()) >= 0 else 0
    T = int(budget)
    rows, cols = int(grid[0]), int(grid[1])
    s = window_side(max(rows, cols)) if window is None else int(window)
    nwr, nwc = math.ceil(rows / s), math.ceil(cols / s)
    k_win = int(T * local_ratio) // (nwr * nwc)
    out = []
    for u in range(num_units):
        mine = u_h == u
        if int(mine.sum()) <= T:
            out.append(0)
            continue
        p = p_h[mine & (p_h >= 0)]
        win = torch.div(torch.div(p, cols, rounding_mode="floor"), s, rounding_mode="floor") * nwc \
            + torch.div(p % cols, s, rounding_mode="floor")
        out.append(int(torch.bincount(win, minlength=nwr * nwc).clamp(max=k_win).sum()))
    return tuple(out)

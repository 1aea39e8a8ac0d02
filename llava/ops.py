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
    """Merged (contextual) tokens of ``sel`` from rows of ``x`` (n, D), computed in fp32."""
    tg = sel.targets.to(x.device)
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
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

"""Merging primitives shared by several methods: VisionZip-style contextual merges (and their official order),
per-unit selections and their output order, cosine similarities, AdaV's text-to-image score and the engine's one
merge (:func:`merge_tokens`, fp32; :func:`merge_tokens_sequential`, the official codes' arithmetic). Part of :mod:`llava.ops`."""

from __future__ import annotations

import torch

from ..selection import Selection
from .select import isin_small, masked_take, topk_desc

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
        rest.index_fill_(0, pos, False)  # not rest[pos] = False: that copies the scalar from the host (no capture)
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
    remaining = masked_take(cand, ~isin_small(cand, keep), cand.numel() - keep.numel())
    targets, assign = contextual_merge(metric, remaining, contextual, n)
    return Selection(keep=keep, targets=targets, assign=assign, rule=rule, space=space)


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
    kept tokens with a slot join their target too); ``sel.arithmetic == "sequential"``: in ``x``'s own dtype, one
    member at a time (:func:`merge_tokens_sequential`)."""
    if sel.arithmetic == "sequential":
        return merge_tokens_sequential(x, sel)
    tg = sel.targets.to(x.device)
    assign = sel.members(x.shape[0], x.device)  # the tokens merged somewhere: their slots; the others -1
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
    if sel.rule == "weighted_mean":
        return (xf[tg] + sums) / (counts + 1 + 1e-6)[:, None]
    raise ValueError(f"unknown merge rule {sel.rule!r}")


def merge_tokens_sequential(x: torch.Tensor, sel: Selection) -> torch.Tensor:
    """The merged tokens of ``sel`` in the official codes' own arithmetic on a CPU (reference modes): each group's
    members added one at a time in ``sel.merge_order`` (default: ascending token index) into an fp32 accumulator,
    the sum rounded to ``x``'s dtype once, the rule's division in that dtype - what PyTorch's CPU ``scatter_add_``
    (expanded index) and ``index_add_`` do for fp16 (they accumulate in fp32) and exactly their fp32 sums.

    - ``mean`` (VScan's ``token_merging``): sum = x[target] + x[j] for each assigned j; sum / (1 + count);
    - ``weighted_mean`` (SparseVLM's ``cluster_and_merge``): w = 1 / (size + 1e-6) in ``x``'s dtype (size: the
      target and its assigned tokens), each member's x[j] * w rounded, the target at its own place in the order;
    - ``target_plus_mean``: x[target] + sum(x[j]) / count.

    Returns (c, D) in ``x.dtype``. One host read (the largest group, the number of add rounds): reference modes
    only, never a captured prefill. (On CUDA the official fp16 merges use atomic adds in no fixed order.)"""
    dev, dt = x.device, x.dtype
    n, D = x.shape
    tg = sel.targets.to(dev)
    c = tg.numel()
    if c == 0:
        return x.new_zeros(0, D)
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    if not sel.merge_kept:
        taken[sel.keep.to(dev)] = True
    taken[tg] = True
    slot = sel.assign.to(dev).masked_fill(taken, -1)
    counts = torch.zeros(c, dtype=torch.long, device=dev).index_add_(0, slot.clamp(min=0), (slot >= 0).long())
    if sel.rule == "weighted_mean":  # the target is a member too, visited at its own place in the order
        slot = slot.index_put((tg,), torch.arange(c, device=dev))
        w = torch.ones(c, dtype=dt, device=dev) / ((counts + 1).to(dt) + 1e-6)
        rows = x * w[slot.clamp(min=0)][:, None]  # the official x * norm_weight, rounded to x's dtype
        acc = torch.zeros(c, D, dtype=torch.float32, device=dev)
    elif sel.rule in ("mean", "target_plus_mean"):
        rows = x
        acc = x[tg].float() if sel.rule == "mean" else torch.zeros(c, D, dtype=torch.float32, device=dev)
    else:
        raise ValueError(f"unknown merge rule {sel.rule!r}")
    order = torch.arange(n, device=dev) if sel.merge_order is None else sel.merge_order.to(dev)
    L = order.numel()
    s = slot[order]  # (L,) the slot of each visited token, -1: not merged
    key = torch.where(s >= 0, s, torch.full_like(s, c))
    by_slot = torch.sort(key, stable=True).indices  # visited tokens grouped by slot, in visiting order
    first = torch.searchsorted(key[by_slot].contiguous(), torch.arange(c + 1, device=dev))
    rank = torch.arange(L, device=dev) - first[key[by_slot]]
    members = torch.full((c + 1, L + 1), n, dtype=torch.long, device=dev)  # n: a zero row
    members[key[by_slot], rank] = order[by_slot]
    # the one host read: the largest group (the add rounds), and the members visited against those assigned
    expected = (slot >= 0).sum()
    rounds, visited, expected = torch.stack([(first[1:] - first[:-1]).max(), first[c], expected]).tolist()
    if visited != expected:
        raise ValueError(f"Selection.merge_order visits {visited} of the {expected} tokens to merge: it must hold "
                         "every merged token once")
    padded = torch.cat([rows, rows.new_zeros(1, D)]).float()
    for r in range(rounds):
        acc = acc + padded[members[:c, r]]  # one fp32 add per group and round (+0 is exact)
    acc = acc.to(dt)  # the accumulator written back to the rows' dtype
    if sel.rule == "mean":
        return acc / (counts + 1).to(dt)[:, None]
    if sel.rule == "target_plus_mean":
        return x[tg] + acc / counts.clamp(min=1).to(dt)[:, None]
    return acc

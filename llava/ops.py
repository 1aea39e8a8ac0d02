"""Small token-selection primitives shared by several methods (one implementation each).

All are pure functions over tensors; scores are compared in fp32.
"""

from __future__ import annotations

import torch

from .method import Selection


def topk_desc(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, best first; ties broken by the lower index
    (methods.md 0.6). ``k`` is clipped to the number of scores."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of every entry by descending score (ties: lower index ranks first)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, scores.numel() + 1, device=scores.device)
    return ranks


def uniform_targets(num_remaining: int, contextual: int) -> torch.Tensor:
    """VisionZip's merge targets: positions 0, s, 2s, ... (s = max(1, R // C)) of the remaining
    list, the first C of them."""
    if contextual <= 0 or num_remaining <= 0:
        return torch.zeros(0, dtype=torch.long)
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step)[:contextual]


def contextual_merge(metric: torch.Tensor, remaining: torch.Tensor, contextual: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip-style contextual tokens over the ``remaining`` token indices (in their order).

    metric: (n, d) per-token merge metric (e.g. the vision layer's head-mean keys); cosine
    similarity is used. Returns ``(targets, assign)``: target token indices (C,) and, for all ``n``
    tokens, the target slot each remaining non-target token joins (argmax cosine, ties to the lowest
    slot) or -1. Pair with ``Selection(..., rule="target_plus_mean")`` for VisionZip's
    ``target + mean(assigned)``.
    """
    assign = torch.full((n,), -1, dtype=torch.long, device=metric.device)
    pos = uniform_targets(remaining.numel(), contextual).to(remaining.device)
    targets = remaining[pos]
    if targets.numel() == 0:
        return targets, assign
    others = remaining[~torch.isin(torch.arange(remaining.numel(), device=remaining.device), pos)]
    if others.numel():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        sim = m[others] @ m[targets].T  # (R - C, C)
        assign[others] = sim.argmax(dim=1)  # first maximum = lowest target slot
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
    remaining = cand[~torch.isin(cand, keep)]
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


def best_product_split(u: torch.Tensor, w: torch.Tensor, total: int) -> tuple[int, int]:
    """AdaV's adaptive split: k1 + k2 = ``total`` maximising (sum of the k1 largest u) x (sum of the
    k2 largest w); ``u``, ``w`` sorted descending. Infeasible splits (k1 > len(u) or k2 > len(w)) are
    skipped; the first maximiser (smallest k1) wins. If no split is feasible, takes all of both."""
    cu = torch.cat([u.new_zeros(1), u.float().cumsum(0)])
    cw = torch.cat([w.new_zeros(1), w.float().cumsum(0)])
    k1 = torch.arange(0, total + 1)
    k2 = total - k1
    ok = (k1 <= u.numel()) & (k2 <= w.numel())
    if not bool(ok.any()):
        return int(u.numel()), int(w.numel())
    val = torch.full((total + 1,), -float("inf"))
    val[ok] = cu[k1[ok]].cpu() * cw[k2[ok]].cpu()
    best = int(torch.argmax(val))  # first maximum
    return best, total - best


def block_order(per_unit: list, n_newlines: int, unit_pos: torch.Tensor | None, patch: torch.Tensor,
                mode: str = "unit") -> torch.Tensor | None:
    """Output permutation for a multi-unit selection whose outputs are laid out as
    [dominant of unit 0, dominant of unit 1, ..., newlines][contextual of unit 0, unit 1, ...].

    per_unit: [(unit, dominant token indices, contextual target indices)] in unit order.
    mode ``unit``: per unit [dominant, contextual], units in order, newlines last.
    ``spatial``: per unit, dominant and contextual tokens by source index (each merged token at its
    target's place). ``grid_raster`` (VisionZip / VisionDrop LLaVA-NeXT re-assembly): units without a
    grid position (the base crop) as in ``unit``; then the grid crops' dominant patches by their
    row-major position on the full (rows x grid) x (cols x grid) patch grid; then those crops'
    [CLS] tokens; then their contextual tokens. Returns None for the identity order.
    """
    n_keep = sum(int(d.numel()) for _, d, _ in per_unit) + n_newlines
    seq = []  # (sort key, output slot)
    grid = int(round((int(patch.max()) + 1) ** 0.5)) if patch.numel() and int(patch.max()) >= 0 else 1
    k_off = t_off = 0
    for u, d_u, t_u in per_unit:
        d_slots = list(range(k_off, k_off + d_u.numel()))
        t_slots = list(range(n_keep + t_off, n_keep + t_off + t_u.numel()))
        k_off += d_u.numel()
        t_off += t_u.numel()
        if mode == "spatial":
            src = torch.cat([d_u, t_u])
            slots = d_slots + t_slots
            for j in torch.argsort(src, stable=True).tolist():
                seq.append(((0, u, int(src[j]), 0), slots[j]))
        elif mode == "grid_raster" and unit_pos is not None and int(unit_pos[u, 0]) >= 0:
            r, c = int(unit_pos[u, 0]), int(unit_pos[u, 1])
            for t, slot in zip(d_u.tolist(), d_slots):
                p = int(patch[t])
                seq.append(((3, 0, 0, slot) if p < 0 else (2, r * grid + p // grid, c * grid + p % grid, 0), slot))
            seq.extend(((4, u, slot, 0), slot) for slot in t_slots)
        elif mode in ("unit", "grid_raster"):
            seq.extend(((0, u, 0, slot), slot) for slot in d_slots)
            seq.extend(((0, u, 1, slot), slot) for slot in t_slots)
        else:
            raise ValueError(f"order mode must be unit / spatial / grid_raster, got {mode!r}")
    seq.extend(((5, i, 0, 0), slot) for i, slot in enumerate(range(k_off, k_off + n_newlines)))
    seq.sort(key=lambda x: x[0])
    order = torch.tensor([slot for _, slot in seq], dtype=torch.long)
    return None if torch.equal(order, torch.arange(order.numel())) else order

"""VScan's stage 1 (its local and global scans, their merge and the official reference-mode calls), shared by VScan
and TRIO's "w/ VE" option. Part of :mod:`llava.ops`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..selection import Selection
from .select import check_numerics, masked_take

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
    ninf = torch.full((), float("-inf"), dtype=a_loc.dtype, device=dev)  # a kernel, not an upload
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


def _vscan_official_assign(features, unit, targets, others_mask, dtype=VSCAN_OFFICIAL_DTYPE):
    """Reference-mode assignment: per unit ``F.cosine_similarity`` of the fp16 features of its other tokens
    against its targets (official (1, R, 1, D) x (1, 1, m, D), dim 3), ``argmax`` = first maximum.
    Returns (T,) long: the index into ``targets`` of each other token, -1 elsewhere."""
    dev = features.device
    n = unit.numel()
    x = features.to(dtype)
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
                 layout=None, local_host: tuple | None = None, official_dtype: torch.dtype = VSCAN_OFFICIAL_DTYPE):
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
    (local picks zeroed in the global row), fp16 ``F.cosine_similarity`` for the assignment. ``official_dtype``: the
    dtype of those scores and of the assignment in reference mode, the official ``.to(images.dtype)`` (fp16 under the
    official eval scripts; the VScan method passes the run's own dtype, so an fp32 run scans in fp32 as the official
    code run in fp32 does).
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
    sdt = official_dtype if official else torch.float32  # official: rows cast to images.dtype, head mean in it
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
        assign = _vscan_official_assign(features, unit_d, targets, pruned_tok & ~picked, official_dtype)
        keep_h = (~pruned_tok_h).nonzero().flatten()
        keep = keep_h.to(dev)
        order = torch.argsort(torch.cat([keep, targets])) if keep_h.numel() else None
        # the official token_merging: fp16 scatter_add_ in ascending token order, then / (1 + count)
        sel = Selection(keep=keep, targets=targets, assign=assign, rule="mean", space="projected", order=order,
                        arithmetic="sequential")
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
    neg = torch.full((), float("-inf"), device=dev)  # a kernel, not an upload (capturable)
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

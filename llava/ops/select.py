"""Ranking and selection primitives shared by several methods: the ``numerics`` check, top-k with ties to the
lower index, the greedy max-min (DivPrune / CDPruner), ``masked_take`` (a known count, no host read) and the
unit layout of a sample's visual tokens (one host read). Part of :mod:`llava.ops`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import Option

#: the ``numerics`` option of every method with official code: our documented numerics, or the reference
#: mode that reproduces the official implementation's dtypes and orderings (docs/evaluation.md)
NUMERICS = ("ours", "official")
#: that option's declaration (``option_defaults``), checked when the method is built
NUMERICS_OPTION = Option("ours", NUMERICS, doc="official: the reference mode (the official code's arithmetic; eager "
                                                "engine)")


def check_numerics(method: str, numerics: str) -> None:
    """Refuse a ``numerics`` value other than :data:`NUMERICS`, naming the method."""
    if numerics not in NUMERICS:
        raise ValueError(f"{method}: numerics must be one of {NUMERICS}, got {numerics!r}")


def topk_desc(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, best first; ties broken by the lower index
    (docs/methods/README.md, common rules). ``k`` is clipped to the number of scores."""
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


def _device_group_key(p: MaxMinProblem) -> tuple:
    """Problems the device loop solves together: the same token count, picks, form and device."""
    return (p.dist.shape[0], _num_picks(p), p.weight is None, p.taken is None, float(p.fill), str(p.dist.device))


def _greedy_max_min_device_batch(ps: "list[MaxMinProblem]") -> list[torch.Tensor]:
    """The device loop of one or several problems of one :func:`_device_group_key`, unrolled ``k`` times with
    static shapes on stacked (P, n) rows: each pick is one set of kernels for all of them (a LLaVA-NeXT image's
    five crops: five times fewer launches), no host read, the same fp32 ops as the host loop of
    :func:`greedy_max_min`, so every problem's picks are the host loop's and the ones it gets alone, bit for bit
    (row-wise elementwise ops, a row's argmax its first maximum)."""
    p0 = ps[0]
    dev, k = p0.dist.device, _num_picks(p0)
    if k == 0:
        return [torch.empty(0, dtype=torch.long, device=dev) for _ in ps]
    n, P = p0.dist.shape[0], len(ps)
    rows_of = lambda ts: ts[0][None] if P == 1 else torch.stack(ts)  # noqa: E731  (one problem: a view, no copy)
    dist = rows_of([p.dist.float() for p in ps])  # (P, n, n)
    mind = rows_of([p.min_dist.float().reshape(-1) for p in ps])  # (P, n)
    w = None if p0.weight is None else rows_of([p.weight.float().reshape(-1) for p in ps])
    if p0.taken is None:
        taken = torch.zeros(P, n, dtype=torch.bool, device=dev)
    else:  # as the host loop reads it: a bool mask, or a number > 0.5
        taken = rows_of([p.taken.reshape(-1) if p.taken.dtype == torch.bool else p.taken.float().reshape(-1) > 0.5
                         for p in ps])
    fill = torch.full((), p0.fill, dtype=torch.float32, device=dev)  # rounded to fp32, as np.float32(fill)
    rows = torch.arange(P, device=dev)
    picks = []
    if w is None and p0.fill == float("-inf"):
        # DivPrune's form: a taken token's score is -inf, kept inside ``mind`` itself (minimum(-inf, d) == -inf), and
        # a copy of the distances with -inf on the diagonal makes the update mark the pick itself (min(mind[j],
        # dist[j, j]) == -inf): a pick is three kernels (argmax, the row's gather, the minimum), not five. A token's
        # own distance never enters another's minimum, so the untaken tokens' values are the host loop's, bit for
        # bit, and so are the picks
        mind = torch.where(taken, fill, mind)  # a new tensor: the in-place writes below touch no input
        if P == 1 and p0.dist.dtype == torch.float32:  # one fp32 problem's rows are a view of its input: copied
            dist = dist.clone()  # (stacked rows, or a cast from half precision, are a new tensor already)
        dist.diagonal(dim1=1, dim2=2).fill_(p0.fill)
        for _ in range(k):
            j = mind.argmax(1)  # (P,): each row's first maximum
            picks.append(j)
            torch.minimum(mind, dist[rows, j], out=mind)
        return list(torch.stack(picks, 1).unbind(0))
    # copies once (one problem's rows are views of its inputs), then updated in place: an out-of-place index_put is
    # a copy kernel and an index kernel on a GPU, each pick
    taken, mind = taken.clone(), mind.clone()
    true = torch.ones((), dtype=torch.bool, device=dev)
    for _ in range(k):
        sc = mind if w is None else w * mind
        sc = torch.where(taken, fill, sc)  # the taken tokens' score: below every candidate's
        j = sc.argmax(1)  # (P,): each row's first maximum
        picks.append(j)
        taken.index_put_((rows, j), true)
        torch.minimum(mind, dist[rows, j], out=mind)
    out = torch.stack(picks, 1)  # (P, k)
    return list(out.unbind(0))


def greedy_max_min(problems: "list[MaxMinProblem]", device_loop: bool = False) -> list[torch.Tensor]:
    """Solve greedy max-min selections (DivPrune's rule, and its relevance-weighted form), on the host
    (default) or on the device (``device_loop=True``).

    **Host loop** (default; the eager engine). On a GPU the greedy loop is sequential and launch-bound:
    about seven small kernels per pick, one pick per kept token (measured on an H100: ~100 us per pick,
    20-110 ms per prefill at 64-192 tokens per crop). Here every problem's tensors go to the host in
    **one** copy (one sync for all of them), the loop runs in numpy (a few microseconds per pick, no
    kernel), and the picks come back in one copy to the device.

    **Device loop** (``device_loop=True``; a prefill captured in a CUDA graph or compiled with
    ``torch.compile(fullgraph=True)``, where no host read or copy may happen): the loop runs in torch on
    the ``dist``'s device, unrolled ``k`` times with static shapes, without any host synchronisation;
    problems of one token count, pick count and form (a LLaVA-NeXT image's crops) run as one loop over
    stacked rows, one set of kernels per pick for all of them. The number of picks must then be known on the host: a problem with ``taken``
    must give ``num_taken`` (ValueError otherwise).

    Both give the same picks, bit for bit, and the same as the loop in torch fp32 on any device: the
    inputs are cast to fp32, and the loop does only exact elementwise IEEE ops (multiply, minimum)
    and argmax (first maximum on both). Returns each problem's picks in pick order (long; on the
    first problem's ``dist`` device for the host loop, on each problem's own for the device loop)."""
    if device_loop:  # problems of one size and form solved together (one set of kernels per pick for all)
        groups: dict = {}
        for i, p in enumerate(problems):
            groups.setdefault(_device_group_key(p), []).append(i)
        out = [None] * len(problems)
        for idx in groups.values():
            for i, picks in zip(idx, _greedy_max_min_device_batch([problems[i] for i in idx])):
                out[i] = picks
        return out
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


def isin_small(elements: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``torch.isin(elements, test)`` for the token-index sets of a selection (hundreds of elements), as one
    broadcast comparison: ``torch.isin``'s CUDA kernel takes a sort-and-unique path past a size threshold, and
    ``unique`` reads its output size on the host (a sync a CUDA graph cannot record; seen on an H200: VisionZip on
    576 tokens, while the tiny model's 16 took the brute-force path)."""
    if test.numel() == 0:
        return torch.zeros(elements.shape, dtype=torch.bool, device=elements.device)
    return (elements.reshape(-1, 1) == test.reshape(1, -1)).any(-1).reshape(elements.shape)


def device_ints(values, device, dtype=torch.long) -> torch.Tensor:
    """A short host list of ints as a tensor on ``device`` built by kernels only: one ``arange`` per run of
    consecutive values, one ``full`` per run of equal ones, concatenated. Never an upload of host data, so a
    prefill recorded as a CUDA graph can hold it (the values are kernel arguments, baked into the graph like the
    plan's shapes); ``torch.tensor(values, device=)`` is a host-to-device copy a capture refuses."""
    vals = [int(v) for v in values]
    parts, i, n = [], 0, len(vals)
    while i < n:
        j = i + 1
        if j < n and vals[j] == vals[i]:
            while j < n and vals[j] == vals[i]:
                j += 1
            parts.append(torch.full((j - i,), vals[i], dtype=dtype, device=device))
        else:
            while j < n and vals[j] == vals[j - 1] + 1:
                j += 1
            parts.append(torch.arange(vals[i], vals[j - 1] + 1, dtype=dtype, device=device))
        i = j
    if not parts:
        return torch.zeros(0, dtype=dtype, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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


#: the official SUBSET_RATIO default of DivPrune's code and of OTPrune's run_OTPrune.sh (56 of 576)
SUBSET_RATIO = 0.098


def subset_picks(n: int, budget: int | None, units: int, ratio: float | None) -> int:
    """Picks for a scope of ``n`` candidates spanning ``units`` units: ``budget`` per unit, else the official
    ``int(round(ratio * n))`` (``ratio`` None: :data:`SUBSET_RATIO`); never more than ``n``. DivPrune, OTPrune."""
    if budget is not None:
        return min(n, budget * units)
    return min(n, int(round((SUBSET_RATIO if ratio is None else ratio) * n)))

"""Shared primitives, with hand-worked answers."""

import pytest
import torch

from llava.ops import merge_tokens
from llava.ops import contextual_merge, dominant_contextual, rank_desc, topk_desc, uniform_targets


def test_topk_and_rank_break_ties_by_lower_index():
    s = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.1])
    assert topk_desc(s, 3).tolist() == [3, 1, 2]
    assert topk_desc(s, 10).tolist() == [3, 1, 2, 0, 4]
    assert rank_desc(s).tolist() == [4, 2, 3, 1, 5]


def test_uniform_targets():
    assert uniform_targets(10, 3).tolist() == [0, 3, 6]
    assert uniform_targets(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert uniform_targets(7, 0).tolist() == []


def test_visionzip_merge_worked_example():
    # 6 tokens; dominant = top-2 by score = tokens 4 and 1; remaining [0, 2, 3, 5], C = 2 -> step 2,
    # targets = remaining positions 0, 2 = tokens 0 and 3. Token 2's key is closest to token 3's,
    # token 5's to token 0's.
    scores = torch.tensor([0.1, 0.8, 0.2, 0.3, 0.9, 0.0])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.2]])
    sel = dominant_contextual(scores, keys, dominant=2, contextual=2)
    assert sel.keep.tolist() == [1, 4]
    assert sel.targets.tolist() == [0, 3]
    assert sel.assign.tolist() == [-1, -1, 1, -1, -1, 0]
    x = torch.arange(12.0).view(6, 2)  # token i = [2i, 2i+1]
    merged = merge_tokens(x, sel)
    # target_plus_mean: token0 + token5 = [0,1]+[10,11]; token3 + token2 = [6,7]+[4,5]
    assert merged.tolist() == [[10.0, 12.0], [10.0, 12.0]]
    sel.rule = "mean"
    assert merge_tokens(x, sel).tolist() == [[5.0, 6.0], [5.0, 6.0]]


def test_contextual_merge_ties_go_to_lowest_target():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets, assign = contextual_merge(keys, torch.tensor([0, 1, 2, 3]), 2, 4)
    assert targets.tolist() == [0, 2]
    assert assign.tolist() == [-1, 0, -1, 0]  # token 3 is orthogonal to both targets: tie -> slot 0


def test_scale_layers():
    from llava.ops import scale_layers

    assert scale_layers([8, 16, 24], 32) == (8, 16, 24)
    assert scale_layers([8, 16, 24], 40) == (10, 20, 30)
    assert scale_layers([8, 16, 24], 4) == (1, 2, 3)
    assert scale_layers([2, 6, 15], 4) == (1, 2, 3)  # 0.25 -> 1, 0.75 -> 1 -> bumped to 2, 1.875 -> 2 -> 3


def test_best_product_split_worked_examples():
    from llava.ops import best_product_split

    u = torch.tensor([5.0, 1.0, 1.0])
    w = torch.tensor([3.0, 2.0, 2.0])
    # total 3: k1=0 -> 0; k1=1 -> 5*(3+2)=25; k1=2 -> 6*3=18; k1=3 -> 7*0=0  => (1, 2)
    assert best_product_split(u, w, 3) == (1, 2)
    # total 4: k1=1 -> 5*7=35 ; k1=2 -> 6*5=30 ; k1=3 -> 7*3=21 ; k1=0/4 infeasible or 0 => (1, 3)
    assert best_product_split(u, w, 4) == (1, 3)
    # ties: u = w = [1, 1]; total 2: k1=1 -> 1*1 = 1 is the only non-zero => (1, 1)
    assert best_product_split(torch.ones(2), torch.ones(2), 2) == (1, 1)
    # too few candidates: take everything
    assert best_product_split(torch.ones(1), torch.ones(1), 5) == (1, 1)


def test_block_order_modes_by_hand():
    from llava.ops import block_order

    patch = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, -1])  # two 2x2 units (tokens 0-3, 4-7), a [CLS] extra 8
    # unit 0: dominant [1, 3], contextual [0]; unit 1: dominant [8 (cls), 5], contextual [6]
    per_unit = [(0, torch.tensor([1, 3]), torch.tensor([0])), (1, torch.tensor([8, 5]), torch.tensor([6]))]
    # outputs: slots 0..3 = dominant [1, 3, 8, 5]; slots 4, 5 = contextual [0, 6]
    assert block_order(per_unit, 0, None, patch, "unit").tolist() == [0, 1, 4, 2, 3, 5]
    # spatial: unit 0 by source 0(c),1,3; unit 1 by source 5, 6(c), 8
    assert block_order(per_unit, 0, None, patch, "spatial").tolist() == [4, 0, 1, 3, 5, 2]
    # grid_raster: unit 0 is the base (pos -1); unit 1 sits at grid (0, 1) of a 1x2 crop grid:
    # base [1, 3, ctx 0], then unit 1's patch 5 (global row 0, col 2 + 1 = 3), its [CLS], its contextual
    pos = torch.tensor([[-1, -1], [0, 1]])
    assert block_order(per_unit, 0, pos, patch, "grid_raster").tolist() == [0, 1, 4, 3, 2, 5]
    # two newline tokens after the dominant ones (slots 4, 5; contextual now 6, 7) close the block
    assert block_order(per_unit, 2, None, patch, "unit").tolist() == [0, 1, 6, 2, 3, 7, 4, 5]


def _block_order_reference(per_unit, n_newlines, unit_pos, patch, mode="unit"):
    """llava.ops.block_order as it was before it was vectorised (one host sync per kept token)."""
    n_keep = sum(int(d.numel()) for _, d, _ in per_unit) + n_newlines
    seq = []
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
        else:
            seq.extend(((0, u, 0, slot), slot) for slot in d_slots)
            seq.extend(((0, u, 1, slot), slot) for slot in t_slots)
    seq.extend(((5, i, 0, 0), slot) for i, slot in enumerate(range(k_off, k_off + n_newlines)))
    seq.sort(key=lambda x: x[0])
    order = torch.tensor([slot for _, slot in seq], dtype=torch.long)
    return None if torch.equal(order, torch.arange(order.numel())) else order


def _random_next_sample(g, side=4, crops=((0, 0), (0, 1), (1, 0), (1, 1)), cls_extra=True):
    """A LLaVA-NeXT-like flat block: a base crop and grid crops of side x side patches (grid crops
    partly unpadded), newline tokens, and (optionally) one extra [CLS] candidate per unit at the end;
    a random VisionZip-like selection per unit: dominant [CLS + top patches] and contextual targets."""
    unit, patch = [], []
    pos = [(-1, -1)] + list(crops)
    for u in range(len(pos)):
        keep_rows = side if u == 0 else int(torch.randint(1, side + 1, (1,), generator=g))
        for p in range(keep_rows * side):
            unit.append(u)
            patch.append(p)
        unit.append(-1)  # a newline after each unit (the layout does not matter to the order)
        patch.append(-1)
    n_stock = len(unit)
    if cls_extra:
        unit += list(range(len(pos)))
        patch += [-1] * len(pos)
    unit, patch = torch.tensor(unit), torch.tensor(patch)
    per_unit = []
    for u in range(len(pos)):
        idx = torch.nonzero(unit == u).flatten()
        pats = idx[patch[idx] >= 0]
        cls = idx[patch[idx] < 0]
        perm = pats[torch.randperm(pats.numel(), generator=g)]
        nd = int(torch.randint(0, pats.numel() + 1, (1,), generator=g))
        nt = int(torch.randint(0, pats.numel() - nd + 1, (1,), generator=g))
        dom = perm[:nd].sort().values
        if cls.numel() and bool(torch.rand(1, generator=g) < 0.7):
            dom = torch.cat([cls[:1], dom])
        per_unit.append((u, dom, perm[nd:nd + nt]))
    n_newlines = int((unit < 0).sum())
    return per_unit, n_newlines, torch.tensor(pos), patch, unit, n_stock


def test_block_order_equals_the_per_token_reference():
    from llava.ops import block_order, unit_layout

    g = torch.Generator().manual_seed(0)
    seen_identity = 0
    for trial in range(60):
        crops = [((0, 0), (0, 1)), ((0, 0), (0, 1), (1, 0), (1, 1)), ((0, 0), (1, 0), (2, 0))][trial % 3]
        per_unit, nl, pos, patch, unit, n_stock = _random_next_sample(g, crops=crops, cls_extra=trial % 2 == 0)
        if trial % 5 == 0:  # contextual-free selections can give the identity
            per_unit = [(u, d, t[:0]) for u, d, t in per_unit]
        lay = unit_layout(unit, patch, n_stock, pos)
        for mode in ("unit", "spatial", "grid_raster"):
            for n_nl in (0, nl):
                ref = _block_order_reference(per_unit, n_nl, pos, patch, mode)
                for got in (block_order(per_unit, n_nl, pos, patch, mode),
                            block_order(per_unit, n_nl, lay.unit_pos, patch, mode, grid=lay.grid)):
                    assert (got is None) == (ref is None), (trial, mode)
                    if ref is not None:
                        assert torch.equal(got, ref), (trial, mode)
                seen_identity += ref is None
        ref = _block_order_reference(per_unit, nl, None, patch, "grid_raster")  # no grid positions: as "unit"
        got = block_order(per_unit, nl, None, patch, "grid_raster")
        assert (got is None and ref is None) or torch.equal(got, ref)
    assert seen_identity  # both outcomes were exercised


def test_block_order_grid_raster_reads_the_host_once():
    from llava.ops import block_order
    from llava.syncs import SyncCounter

    g = torch.Generator().manual_seed(1)
    per_unit, nl, pos, patch, _, _ = _random_next_sample(g, side=8)
    with SyncCounter() as c:
        block_order(per_unit, nl, pos, patch, "grid_raster")
    assert c.total == 1, c.counts  # unit_pos and the grid size together; nothing per token
    host_pos = [tuple(p) for p in pos.tolist()]
    with SyncCounter() as c:
        block_order(per_unit, nl, host_pos, patch, "grid_raster", grid=8)
        block_order(per_unit, nl, None, patch, "unit")
        block_order(per_unit, nl, None, patch, "spatial")
    assert c.total == 0, c.counts


def test_unit_layout_groups_as_boolean_masks_do():
    from llava.ops import unit_layout
    from llava.syncs import SyncCounter

    g = torch.Generator().manual_seed(2)
    for trial in range(10):
        _, _, pos, patch, unit, n_stock = _random_next_sample(g, cls_extra=trial % 2 == 0)
        if trial % 3 == 0:  # video-like: a stock [CLS] opening each unit
            patch = torch.where((unit >= 0) & (torch.arange(unit.numel()) < n_stock) & (patch == 0), -1, patch)
        with SyncCounter() as c:
            lay = unit_layout(unit, patch, n_stock, pos)
        assert c.total == 1
        idx = torch.arange(unit.numel())
        assert lay.num_units == int(unit.max()) + 1 and lay.unit_pos == [tuple(p) for p in pos.tolist()]
        assert lay.grid == 4 and torch.equal(lay.newlines, idx[unit < 0])
        assert lay.num_newline_stock == int(((unit < 0) & (idx < n_stock)).sum())
        for u in range(lay.num_units):
            mine = idx[unit == u]
            assert torch.equal(lay.tokens[u], mine)
            assert torch.equal(lay.cls[u], mine[patch[mine] < 0])
            assert torch.equal(lay.patches[u], mine[patch[mine] >= 0])
            assert lay.num_stock[u] == int((mine < n_stock).sum())
            assert lay.num_cls_stock[u] == int(((patch[mine] < 0) & (mine < n_stock)).sum())
            assert lay.num_patch_stock[u] == int(((patch[mine] >= 0) & (mine < n_stock)).sum())
    empty = unit_layout(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert empty.num_units == 0 and empty.newlines.numel() == 0 and empty.grid == 1
    only_newlines = unit_layout(torch.full((3,), -1))
    assert only_newlines.num_units == 0 and only_newlines.newlines.tolist() == [0, 1, 2]


def test_masked_take_and_the_device_split():
    from llava.ops import best_product_split, best_product_split_k1, masked_take

    x = torch.tensor([5, 6, 7, 8, 9])
    m = torch.tensor([False, True, False, True, True])
    assert masked_take(x, m, 3).tolist() == [6, 8, 9]
    assert masked_take(x, torch.ones(5, dtype=torch.bool), 5).tolist() == x.tolist()
    assert masked_take(x, torch.zeros(5, dtype=torch.bool), 0).tolist() == []
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        u = torch.rand(int(torch.randint(0, 6, (1,), generator=g)), generator=g).sort(descending=True).values
        w = torch.rand(int(torch.randint(0, 6, (1,), generator=g)), generator=g).sort(descending=True).values
        total = int(torch.randint(0, 12, (1,), generator=g))
        k1 = best_product_split_k1(u, w, total)
        split = best_product_split(u, w, total)
        assert (k1 is None) == (total > u.numel() + w.numel())
        assert split == ((u.numel(), w.numel()) if k1 is None else (int(k1), total - int(k1)))


# ---------------------------------------------------------------------------------------------- greedy max-min
def _torch_max_min(dist, k, min_dist, taken=None, weight=None, fill=float("-inf")):
    """The device loop greedy_max_min replaces (DivPrune's / ConsensusDrop's former code): one argmax per pick."""
    n = dist.shape[0]
    taken = torch.zeros(n, dtype=torch.bool) if taken is None else taken.clone()
    mind, picks = min_dist.clone(), []
    for _ in range(min(k, n - int(taken.sum()))):
        s = mind if weight is None else weight * mind
        j = s.masked_fill(taken, fill).argmax().view(1)
        picks.append(int(j))
        taken = taken.index_fill(0, j, True)
        mind = torch.minimum(mind, dist.index_select(0, j)[0])
    return picks


def test_greedy_max_min_worked_examples():
    from llava.ops import MaxMinProblem, greedy_max_min

    D = torch.tensor([[0., 1, 4, 2], [1, 0, 3, 5], [4, 3, 0, 6], [2, 5, 6, 0]])
    # token 0 taken: scores D[0] = 1 4 2 -> pick 2; min(D[0], D[2]) = 0 1 0 2 -> pick 3
    taken = torch.tensor([True, False, False, False])
    assert greedy_max_min([MaxMinProblem(D, 2, D[0].clone(), taken)])[0].tolist() == [2, 3]
    # weighted, nothing taken, distance term 1: w = 1 3 .5 1 -> pick 1; min(1, D[1]) = 1 0 1 1,
    # scores 1 -1 .5 1 -> the first maximum, 0
    w = torch.tensor([1., 3, .5, 1])
    prob = MaxMinProblem(D, 2, torch.ones(4), weight=w, fill=-1.0)
    assert greedy_max_min([prob])[0].tolist() == [1, 0]
    # k is clipped to the tokens not taken; k = 0 and no problems give nothing
    assert greedy_max_min([MaxMinProblem(D, 9, D[0].clone(), taken)])[0].tolist() == [2, 3, 1]
    assert greedy_max_min([MaxMinProblem(D, 0, D[0].clone())])[0].tolist() == []
    assert greedy_max_min([]) == []


@pytest.mark.parametrize("seed", range(6))
def test_greedy_max_min_equals_the_device_loop(seed):
    """Bit-identical picks to the torch loop, with duplicated rows (tied distances), zero weights (tied
    scores), forced picks and several problems solved in one call."""
    from llava.ops import MaxMinProblem, greedy_max_min

    g = torch.Generator().manual_seed(seed)
    probs, refs = [], []
    for n, k in ((40, 12), (23, 23), (64, 5)):
        x = torch.randn(n, 8, generator=g)
        x[n // 2:n // 2 + 4] = x[:4]  # duplicates: distance ties
        xn = x / x.norm(dim=1, keepdim=True)
        dist = (1.0 - xn @ xn.T).clamp(min=0)
        w = torch.rand(n, generator=g).masked_fill(torch.rand(n, generator=g) < 0.3, 0.0)
        taken = torch.zeros(n, dtype=torch.bool)
        taken[torch.randperm(n, generator=g)[:3]] = True
        mind = dist[:, taken].amin(1)
        for weight, fill in ((None, float("-inf")), (w, -1.0)):
            probs.append(MaxMinProblem(dist, k, mind, taken, weight, fill))
            refs.append(_torch_max_min(dist, k, mind, taken, weight, fill))
    got = greedy_max_min(probs)
    assert [p.tolist() for p in got] == refs
    assert all(p.dtype == torch.long for p in got)


def test_greedy_max_min_reads_the_host_once_and_launches_no_kernel_per_pick():
    from llava.ops import MaxMinProblem, greedy_max_min
    from llava.syncs import OpCounter, SyncCounter

    x = torch.randn(60, 8)
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.T
    ops = {}
    for k in (2, 40):
        probs = [MaxMinProblem(dist, k, dist[0].clone()) for _ in range(3)]
        with SyncCounter() as s:
            greedy_max_min(probs)
        assert s.total == 1, dict(s.counts)  # one copy to the host for all three problems
        with OpCounter() as c:
            greedy_max_min(probs)
        ops[k] = c.total
    assert ops[2] == ops[40]  # no op per pick


def test_merge_tokens_reads_nothing_from_the_device():
    """A boolean-mask assignment (assign[taken] = -1) would read the mask's count on a GPU."""
    from llava.selection import Selection
    from llava.syncs import SyncCounter

    x = torch.arange(20.0).reshape(10, 2)
    sel = Selection(keep=torch.tensor([0, 3]), targets=torch.tensor([5, 7]),
                    assign=torch.tensor([-1, 0, 1, 0, 0, 1, 1, -1, 0, 1]), rule="mean")
    with SyncCounter() as c:
        out = merge_tokens(x, sel)
    assert c.total == 0, dict(c.counts)
    # slot 0 (target 5): rows 1, 4, 8 (row 3 is kept: ignored); slot 1 (target 7): rows 2, 6, 9 (5 is a target)
    assert torch.equal(out, torch.stack([(x[5] + x[1] + x[4] + x[8]) / 4, (x[7] + x[2] + x[6] + x[9]) / 4]))


def test_cosine_matrix_by_hand():
    from llava.ops import cosine_matrix

    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)  # a zero row gives zeros, not NaN
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = cosine_matrix(a, b)
    assert c.dtype == torch.float32
    assert c.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)], [0.0, 0.0]]
    assert cosine_matrix(b).tolist() == [[1.0, 0.0], [0.0, 1.0]]

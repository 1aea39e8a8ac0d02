"""Shared primitives, with hand-worked answers."""

import torch

from llava.engine import merge_tokens
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

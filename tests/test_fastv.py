"""FastV (baselines/fastv.py): the pure functions on hand-built tensors, then the method on the
tiny models of all three families (4 decoder layers, so K = 2 of 32 layers scales to K = 1)."""

from fractions import Fraction

import pytest
import torch
from conftest import FAMILIES, make_batch, slice_batch

from baselines.fastv import (FastV, equivalent_kept_count, fastv_select, layer_schedule, ratio_kept_count,
                             round_half_up)
from llava.method import get_method
from llava.models import load

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


# ------------------------------------------------------------------------------ pure functions


def test_fastv_select_uses_the_head_mean_of_the_last_row():
    # 6 tokens: 0 = prefix, 1..4 = visual, 5 = last prompt token. Two heads (values exact in binary):
    #   head 0: [.125, .125,  .5, .125,  .25, .125]
    #   head 1: [.125, .375,  0., .125, .375, .125]
    #   mean  : [.125, .25,  .25, .125, .3125, .125]
    # visual columns 1..4 -> scores [.25, .25, .125, .3125] (indices into the visual tokens 0..3)
    # k=2: best is visual 3 (.3125), then the tie .25 between visual 0 and 1 -> the lower index, 0.
    # Head 0 alone would pick visual 1 (.5) and 3 (.25): the head mean matters.
    row = torch.tensor([[0.125, 0.125, 0.5, 0.125, 0.25, 0.125],
                        [0.125, 0.375, 0.0, 0.125, 0.375, 0.125]])
    visual = torch.tensor([1, 2, 3, 4])
    assert fastv_select(row, visual, 2).tolist() == [0, 3]  # ascending (original) order
    assert fastv_select(row, visual, 3).tolist() == [0, 1, 3]
    assert fastv_select(row[:1], visual, 2).tolist() == [1, 3]
    assert fastv_select(row, visual, 10).tolist() == [0, 1, 2, 3]  # k clipped to N
    assert fastv_select(row, visual, 0).tolist() == []


@pytest.mark.parametrize("budget,k2,k3", [(192, 166, 152), (128, 98, 82), (64, 30, 11)])
def test_equivalent_budget_formula_matches_the_spec_table(budget, k2, k3):
    # n_K = (32 B - K 576) / (32 - K):
    #   K=2: 192 -> 4992/30 = 166.4 -> 166; 128 -> 2944/30 = 98.13 -> 98; 64 -> 896/30 = 29.87 -> 30
    #   K=3: 192 -> 4416/29 = 152.28 -> 152; 128 -> 2368/29 = 81.66 -> 82; 64 -> 320/29 = 11.03 -> 11
    assert equivalent_kept_count(budget, 576, 2, 32) == k2
    assert equivalent_kept_count(budget, 576, 3, 32) == k3
    # and the layer average of the resulting schedule is within half a token per stage of B:
    e = sum(layer_schedule(576, 2, k2, 32)) / 32
    assert abs(e - budget) <= 0.5 * 30 / 32


def test_equivalent_count_rounds_half_up_and_clips():
    # L=3, K=1, N=4, B=3: (9 - 4) / 2 = 2.5 -> 3 (Python's round() would give 2)
    assert equivalent_kept_count(3, 4, 1, 3) == 3
    assert round_half_up(Fraction(5, 2)) == 3 and round_half_up(Fraction(-1, 2)) == 0
    # the tiny LLM (L=4, K=1), N=16: B=8 -> (32 - 16) / 3 = 5.33 -> 5
    assert equivalent_kept_count(8, 16, 1, 4) == 5
    assert equivalent_kept_count(100, 16, 1, 4) == 16  # budget above N: keep all
    assert equivalent_kept_count(3, 16, 1, 4) == 0  # (12 - 16) / 3 < 0: nothing left to keep
    with pytest.raises(ValueError):
        equivalent_kept_count(8, 16, 4, 4)


def test_ratio_count_truncates_like_the_official_int():
    # int(576 * (1 - R)): 50% -> 288, 75% -> 144, 90% -> int(57.6) = 57, 0% -> all
    assert [ratio_kept_count(576, r) for r in (0.5, 0.75, 0.9, 0.0, 1.0)] == [288, 144, 57, 576, 0]
    assert ratio_kept_count(16, 0.5) == 8 and ratio_kept_count(52, 0.5) == 26


def test_method_options_and_layer_scaling():
    m = get_method("fastv")
    assert (m.layer, m.ratio, m.position_mode, m.budget) == (2, 0.5, "keep", None)
    for depth, k in ((32, 2), (40, 2), (4, 1)):
        m.setup(num_layers=depth, num_vision_layers=24, family="llava")
        assert m.llm_layers == (k,)
    m = FastV(layer=3, scale_layers=False)
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert m.llm_layers == (3,)
    m = FastV(192)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.layer_counts(576) == [576, 576] + [166] * 30
    with pytest.raises(ValueError, match="either"):
        FastV(192, ratio=0.5)
    with pytest.raises(ValueError):
        FastV(ratio=1.5)
    with pytest.raises(TypeError):
        FastV(drop=0.5)


# ------------------------------------------------------------------------------ tiny models


def _expected(family, n, budget):
    # K = 1 on the 4-layer LLM: n_1 = (4 B - N) / 3, half up, clipped to 0..N
    n1 = max(0, min(n, round_half_up(Fraction(4 * budget - n, 3))))
    return [n] + [n1] * 3


@ALL
def test_per_layer_counts_follow_the_equivalent_budget(rt):
    budget = {"llava": 8, "llava_next": 20, "video_llava": 64}[rt.family]
    eng = rt.prune("fastv", budget)
    with torch.no_grad():
        rt.model(**make_batch(rt))
    for s in eng.stats.samples:
        assert s.visual_per_layer == _expected(rt.family, s.visual_candidates, budget)
    if rt.family == "llava":  # N = 16: (32 - 16) / 3 = 5.33 -> 5, E = (16 + 3 * 5) / 4 = 7.75
        assert eng.stats.samples[0].visual_per_layer == [16, 5, 5, 5]
        assert eng.stats.samples[0].visual_layer_avg == 7.75
    if rt.family == "video_llava":  # N = 136: (256 - 136) / 3 = 40 exactly, E = 64
        assert [s.visual_per_layer for s in eng.stats.samples] == [[136, 40, 40, 40]] * 3
        assert eng.stats.visual_layer_avg == 64.0
    if rt.family == "llava_next":  # N = 52 / 36 / 40 -> 28/3 -> 9, 44/3 -> 15, 40/3 -> 13
        assert [s.visual_per_layer[1] for s in eng.stats.samples] == [9, 15, 13]
    eng = rt.prune("fastv")  # R = 0.5: int(N / 2)
    with torch.no_grad():
        rt.model(**make_batch(rt))
    assert [s.visual_per_layer for s in eng.stats.samples] == [
        [s.visual_candidates] + [s.visual_candidates // 2] * 3 for s in eng.stats.samples]


@pytest.fixture(scope="module")
def eager():
    """Stock eager-attention twins (same seed, same weights) whose attention maps are the reference."""
    return {f: load(f"tiny:{f}", seed=1, attn_implementation="eager") for f in ("llava", "video-llava")}


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
def test_selection_is_the_top_k_of_layer_k_minus_1_last_row(rt, eager):
    """Independent reference: the unpruned eager model's own attention of layer K-1 = 0."""
    one = slice_batch(make_batch(rt), 2, rt)
    ref = eager[rt.family.replace("_", "-")].model
    with torch.no_grad():
        att = ref(**one, output_attentions=True).attentions[0][0]  # (H, S, S) of decoder layer 0
    ids = one["input_ids"][0]
    tok = rt.model.config.video_token_id if rt.family == "video_llava" else rt.model.config.image_token_id
    vis = torch.nonzero(ids == tok).flatten()
    scores = att[:, -1].mean(0)[vis]
    k = {"llava": 5, "video_llava": 40}[rt.family]
    expected = torch.topk(scores, k).indices.sort().values
    eng = rt.prune("fastv", {"llava": 8, "video_llava": 64}[rt.family])
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)

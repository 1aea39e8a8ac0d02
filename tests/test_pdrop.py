"""PyramidDrop (baselines/pdrop.py): schedules, the stage selection on
hand-built values, then the method on the tiny models (stages 8/16/24 or 2/6/16 of 32 layers map to
1/2/3 of the 4-layer LLM)."""

import pytest
import torch
from conftest import FAMILIES, make_batch, slice_batch

from baselines.pdrop import (PyramidDrop, equivalent_tokens, fit_stage_counts, pdrop_select, scaled_count,
                             solve_lambda, stage_layer_counts)
from llava.models import load

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def at_depth(m, depth=32):
    m.setup(num_layers=depth, num_vision_layers=24, family="llava")
    return m


# ------------------------------------------------------------------------------ pure functions


def test_stage_select_top_k_of_the_last_instruction_row():
    # 7 tokens: 0 prefix, 1..5 visual, 6 = last instruction token; 2 heads (binary-exact values)
    #   head 0: [0, .25, .5, 0, .125, 0, .125] ; head 1: [0, .25, 0, .5, .125, .125, 0]
    #   mean visual columns: [.25, .25, .25, .125, .0625]
    # k=2: three-way tie at .25 -> the two lower indices 0 and 1; k=4 adds visual 3.
    row = torch.tensor([[0, .25, .5, 0, .125, 0, .125], [0, .25, 0, .5, .125, .125, 0]])
    vis = torch.arange(1, 6)
    assert pdrop_select(row, vis, 2).tolist() == [0, 1]
    assert pdrop_select(row, vis, 4).tolist() == [0, 1, 2, 3]


def test_default_schedule_is_the_official_one():
    # layer_list [8, 16, 24], ratios 0.5 / 0.25 / 0.125 of 576 -> 288 / 144 / 72
    # E = (8*576 + 8*288 + 8*144 + 8*72) / 32 = (576 + 288 + 144 + 72) / 4 = 270
    m = at_depth(PyramidDrop())
    assert m.llm_layers == (8, 16, 24) and m.position_mode == "reindex"
    assert m.stage_counts(576) == (288, 144, 72)
    assert equivalent_tokens(m.layer_counts(576)) == 270.0


@pytest.mark.parametrize("budget,counts,e", [(192, (300, 200, 110), 191.0), (128, (303, 110, 36), 126.25),
                                             (64, (66, 30, 17), 62.125)])
def test_budget_table_and_its_equivalent_tokens(budget, counts, e):
    # stages before layers 2 / 6 / 16 of 32:
    #   192: (2*576 + 4*300 + 10*200 + 16*110) / 32 = (1152 + 1200 + 2000 + 1760) / 32 = 6112/32 = 191
    #   128: (1152 + 4*303 + 10*110 + 16*36) / 32 = (1152 + 1212 + 1100 + 576) / 32 = 4040/32 = 126.25
    #    64: (1152 + 4*66 + 10*30 + 16*17) / 32 = (1152 + 264 + 300 + 272) / 32 = 1988/32 = 62.125
    m = at_depth(PyramidDrop(budget))
    assert m.llm_layers == (2, 6, 16)
    assert m.stage_counts(576) == counts
    lc = m.layer_counts(576)
    assert lc == [576] * 2 + [counts[0]] * 4 + [counts[1]] * 10 + [counts[2]] * 16
    assert equivalent_tokens(lc) == e


def test_counts_scale_with_the_sample_visual_count():
    # floor(N * c / 576): Video-LLaVA's 2056 tokens and the tiny models' 136 and 16
    assert [scaled_count(2056, c) for c in (300, 200, 110)] == [1070, 713, 392]  # 1070.8, 713.9, 392.6
    assert [scaled_count(136, c) for c in (300, 200, 110)] == [70, 47, 25]  # 70.8, 47.2, 25.97
    assert [scaled_count(16, c) for c in (300, 200, 110)] == [8, 5, 3]  # 8.33, 5.56, 3.06
    m = at_depth(PyramidDrop(192))
    assert m.stage_counts(2880) == (1500, 1000, 550)  # NeXT 'spatial', 5 crops: 5x the 576 schedule


def test_fit_keeps_the_32_layer_average_on_other_depths():
    # N = 136, table 192 -> (70, 47, 25) after layers 2/6/16 of 32:
    #   32-layer total = 2*136 + 4*70 + 10*47 + 16*25 = 272 + 280 + 470 + 400 = 1422, E = 44.4375
    # 4 layers, stages 1/2/3: target total = 1422 * 4/32 = 177.75; minus the first layer's 136 = 41.75
    #   alpha = 41.75 / (70 + 47 + 25) = 0.29401 -> 20.58, 13.82, 7.35 -> (21, 14, 7), E = 178/4 = 44.5
    assert fit_stage_counts(136, (70, 47, 25), (2, 6, 16), (1, 2, 3), 4) == (21, 14, 7)
    # N = 16 -> (8, 5, 3): total 32 + 32 + 50 + 48 = 162 -> 20.25 on 4 layers; 4.25 / 16 = 0.2656
    #   -> 2.13, 1.33, 0.80 -> (2, 1, 1), E = 20/4 = 5.0 (target 5.0625)
    assert fit_stage_counts(16, (8, 5, 3), (2, 6, 16), (1, 2, 3), 4) == (2, 1, 1)
    # unchanged on the reference depth
    assert fit_stage_counts(576, (300, 200, 110), (2, 6, 16), (2, 6, 16), 32) == (300, 200, 110)
    # unreachable (the first layer alone exceeds the target): all zero
    assert fit_stage_counts(16, (1, 0, 0), (2, 6, 16), (1, 2, 3), 4) == (0, 0, 0)
    assert stage_layer_counts(16, (1, 2, 3), (2, 1, 1), 4) == [16, 2, 1, 1]


def test_lambda_for_other_budgets():
    # E/N = (8 + 8 lam + 8 lam^2 + 8 lam^3) / 32; the official lam = 0.5 gives 1.875 / 4 = 270/576
    assert solve_lambda((8, 16, 24), 32, 270 / 576) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError, match="unreachable"):
        solve_lambda((8, 16, 24), 32, 100 / 576)  # below 8/32 = 144/576
    m = at_depth(PyramidDrop(200))  # not in the table: geometric, E within a token of 200
    assert m.llm_layers == (8, 16, 24)
    assert abs(equivalent_tokens(m.layer_counts(576)) - 200) < 1.0
    m = at_depth(PyramidDrop(576))  # everything: lam = 1
    assert m.stage_counts(576) == (576, 576, 576)
    with pytest.raises(ValueError):
        at_depth(PyramidDrop(100))


def test_options():
    with pytest.raises(ValueError, match="either"):
        PyramidDrop(192, ratios=[0.5, 0.25, 0.1])
    with pytest.raises(ValueError):
        PyramidDrop(ratios=[0.5, 0.25])  # 3 default layers
    m = at_depth(PyramidDrop(ratios=[0.5], layer_list=[4]), 4)  # 4 of 32 -> before layer 1 of 4 (clipped)
    assert m.llm_layers == (1,) and m.stage_counts(16) == (8,)
    m = at_depth(PyramidDrop(layer_list=[2, 3], ratios=[0.5, 0.25], scale_layers=False), 4)
    assert m.llm_layers == (2, 3) and m.layer_counts(16) == [16, 16, 8, 4]


# ------------------------------------------------------------------------------ tiny models


@ALL
def test_per_layer_counts(rt):
    eng = rt.prune("pdrop")  # official 0.5 / 0.25 / 0.125 of N
    with torch.no_grad():
        rt.model(**make_batch(rt))
    for s in eng.stats.samples:
        n = s.visual_candidates
        assert s.visual_per_layer == [n, n // 2, n // 4, n // 8]
    eng = rt.prune("pdrop", 192)
    with torch.no_grad():
        rt.model(**make_batch(rt))
    for s in eng.stats.samples:
        assert s.visual_per_layer == eng.method.layer_counts(s.visual_candidates)
    exp = {"llava": [16, 2, 1, 1], "video_llava": [136, 21, 14, 7]}  # worked out in the fit test above
    if rt.family in exp:
        assert [s.visual_per_layer for s in eng.stats.samples] == [exp[rt.family]] * 3
    if rt.family == "llava_next":  # N = 52: floor(52 * c / 576) = (27, 18, 9); 32-layer total
        # 2*52 + 4*27 + 10*18 + 16*9 = 536 -> 67 on 4 layers, minus 52 = 15, alpha = 15/54 = 5/18:
        # 27 * 5/18 = 7.5 -> 8 (half up), 18 * 5/18 = 5, 9 * 5/18 = 2.5 -> 3
        assert eng.stats.samples[0].visual_per_layer == [52, 8, 5, 3]


@pytest.fixture(scope="module")
def eager():
    return load("tiny:video-llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["video-llava"], indirect=True)
def test_first_stage_uses_the_next_layer_attention_of_the_last_token(rt, eager):
    """Independent reference: before the first stage nothing was pruned, so the stage-1 signal is
    the unpruned eager model's own layer-1 attention row of the last token."""
    one = slice_batch(make_batch(rt), 0, rt)
    with torch.no_grad():
        att = eager.model(**one, output_attentions=True).attentions[1][0]  # decoder layer 1 (H, S, S)
    vis = torch.nonzero(one["input_ids"][0] == rt.model.config.video_token_id).flatten()
    expected = torch.topk(att[:, -1].mean(0)[vis], 68).indices.sort().values
    eng = rt.prune("pdrop")
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    # later stages select among the survivors: 34 of 68, then 17 of 34
    assert eng.selections[(1, 0)].keep.numel() == 34 and int(eng.selections[(1, 0)].keep.max()) < 68
    assert eng.selections[(2, 0)].keep.numel() == 17

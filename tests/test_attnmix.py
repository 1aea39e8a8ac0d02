"""AttnMix (AdaV): worked examples of its pure functions, and integration on the tiny models."""

import math

import pytest
import torch
from conftest import FAMILIES, make_batch

from attnmix import adav_budget, adav_select, text_to_image_score
from llava.method import BudgetError


def test_text_to_image_score_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vis = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # text 0: cos = [1, 0, 1/sqrt2]; text 1: cos = [0, 1, 1/sqrt2]; temperature 1
    e = [math.e, 1.0, math.exp(2 ** -0.5)]
    p0 = [x / sum(e) for x in e]
    p1 = [p0[1], p0[0], p0[2]]
    expect = [max(p0[i], p1[i]) for i in range(3)]
    assert text_to_image_score(text, vis, temperature=1.0).tolist() == pytest.approx(expect, abs=1e-6)
    # temperature 100 sharpens to the best match: each text token puts ~all mass on its twin
    s = text_to_image_score(text, vis)
    assert s[0] > 0.99 and s[1] > 0.99 and s[2] < 1e-12


def test_budget_arithmetic_matches_official_tables():
    assert adav_budget(64, 1) == {"k": 32, "kept": 64, "n0": 16, "adaptive": 32}
    assert adav_budget(192, 1) == {"k": 96, "kept": 192, "n0": 48, "adaptive": 96}
    assert adav_budget(720, 5) == {"k": 72, "kept": 720, "n0": 180, "adaptive": 360}
    assert adav_budget(288, 5) == {"k": 28, "kept": 280, "n0": 70, "adaptive": 140}
    assert adav_budget(144, 5) == {"k": 14, "kept": 140, "n0": 35, "adaptive": 70}
    assert adav_budget(136, 8) == {"k": 8, "kept": 128, "n0": 32, "adaptive": 64}


S = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.05, 0.2, 0.6, 0.0])
ONE_UNIT = [torch.arange(8)]


def test_adaptive_split_by_hand():
    # budget 4, one unit: k=2, V_b=4, n0=1, K=2.
    # L_t = top-4 by s = [0, 6, 2, 3]; L_c = top-4 by a = [1, 4, 3, 6].
    # guaranteed: 0 (text) and 1 ([CLS]); rest u = s[6,2,3] = [.6,.5,.3], w = a[4,3,6] = [.7,.6,.3]
    # K=2: k1=0 -> 0; k1=1 -> .6*.7 = .42; k1=2 -> 1.1*0 = 0  => one pick each: 6 and 4
    a = torch.tensor([0.1, 0.8, 0.05, 0.6, 0.7, 0.0, 0.3, 0.2])
    assert adav_select(S, a, ONE_UNIT, 4).tolist() == [0, 1, 4, 6]


def test_duplicates_released_vs_corrected():
    # a makes token 6 the best remaining [CLS] pick while the text list also picks it:
    # L_c = [1, 6, 3, 7]; split again (1, 1): text picks [0, 6], [CLS] picks [1, 6]
    a = torch.tensor([0.1, 0.8, 0.05, 0.6, 0.0, 0.0, 0.7, 0.2])
    assert adav_select(S, a, ONE_UNIT, 4, allow_duplicates=True).tolist() == [0, 1, 6, 6]
    # corrected: the [CLS] list skips 6 and takes its next best, 3
    assert adav_select(S, a, ONE_UNIT, 4).tolist() == [0, 1, 3, 6]


def test_crop_offset_quirk_on_two_units():
    # 2 units of 4 tokens (flat 0..3 and 4..7), budget 4 -> k = 1: per unit top-2 by a.
    a = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.1, 0.8, 0.6])
    units = [torch.arange(4), torch.arange(4, 8)]
    s = torch.zeros(8)
    # unit 0 -> local [1, 2] -> global [1, 2]; unit 1 -> local [2, 3] -> global [6, 7]
    assert adav_select(s, a, units, 4, variant="cls").tolist() == [1, 2, 6, 7]
    # released: unit 1's local picks offset by its index 1 instead of 4 -> [3, 4]
    assert adav_select(s, a, units, 4, variant="cls", crop_offset_bug=True).tolist() == [1, 2, 3, 4]


ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


@ALL
def test_token_counts_follow_adav_arithmetic(rt):
    inputs = make_batch(rt)
    budget = 8 if rt.family != "video_llava" else 64
    eng = rt.prune("attnmix", budget)
    with torch.no_grad():
        out = rt.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3
    for b, s in enumerate(eng.stats.samples):
        sel = eng.selections[("vision", b)]
        if rt.family == "llava_next":  # counts per crop layout: test_next_counts_per_crop_layout
            assert s.visual_entering_llm == sel.keep.numel()
        else:
            n_units = {"llava": 1, "video_llava": 8}[rt.family]
            assert s.visual_entering_llm == adav_budget(budget, n_units)["kept"]  # 8 and 64
        assert s.visual_layer_avg == s.visual_entering_llm
        assert sel.keep.unique().numel() == sel.keep.numel()  # corrected: no duplicates


def test_next_counts_per_crop_layout(runtimes):
    rt = runtimes["llava-next"]
    inputs = make_batch(rt)
    eng = rt.prune("attnmix", 8)
    with torch.no_grad():
        rt.model(**inputs)
    # 40x70 -> 56x112 pinpoint (3 crops), grid 4x8 unpadded to 4x7: 4 newlines;
    # 56x56 -> 56x112 (ties 112x112 on effective pixels, wastes less): 3 crops, 4x8 -> 4x4: 4 newlines;
    # 90x30 -> 112x56: 3 crops, grid 8x4 unpadded to 8x3: 8 newlines.  k = floor(4 / 3) = 1 -> V_b = 6
    crops = [3, 3, 3]
    newlines = [4, 4, 8]
    for s, c, nl in zip(eng.stats.samples, crops, newlines):
        assert s.visual_entering_llm == 2 * ((8 // 2) // c) * c + nl


def test_too_small_budget_is_a_clear_error(runtimes):
    rt = runtimes["video-llava"]
    rt.prune("attnmix", 8)  # 8 frames: k = floor(4 / 8) = 0
    with pytest.raises(BudgetError, match="keeps nothing"):  # one `error:` line in ask / eval run
        with torch.no_grad():
            rt.model(**make_batch(rt, n=1))
    rt.unprune()


def test_released_quirks_run_end_to_end(runtimes):
    from llava.models import load

    rt = load("tiny:llava-next", next_layout="spatial")
    inputs = make_batch(rt)
    eng = rt.prune("attnmix", 12, crop_offset_bug=True, allow_duplicates=True)
    with torch.no_grad():
        rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # 'spatial': no newlines; every sample has 3 crops: k = 6 // 3 = 2 -> V_b = 12 (duplicates count twice)
    assert [s.visual_entering_llm for s in eng.stats.samples] == [12, 12, 12]


def test_masked_text_rows_give_the_eager_selection():
    """The fast path's padded text block (pad rows masked out) selects what the eager rows select: s from
    ``text_to_image_score(mask=)`` equals s of the rows themselves, and AdaV's split runs on the device."""
    g = torch.Generator().manual_seed(0)
    text, vis = torch.randn(9, 16, generator=g), torch.randn(24, 16, generator=g)
    mask = torch.arange(16) < 9
    padded = torch.cat([text, torch.randn(7, 16, generator=g)])
    s = text_to_image_score(text, vis)
    torch.testing.assert_close(text_to_image_score(padded, vis, mask=mask), s, rtol=1e-5, atol=1e-7)
    a = torch.rand(24, generator=g)
    units = [torch.arange(12), torch.arange(12, 24)]
    for budget in (4, 8, 12, 20):
        keep = adav_select(s, a, units, budget)
        assert keep.numel() == adav_budget(budget, 2)["kept"] and torch.equal(keep, keep.unique())

"""Seed methods on hand-built 3-crop NeXT signals (per-crop index offsets) and through the CLI."""

import pytest
import torch
from conftest import FAMILIES

from llava.cli import ask
from llava.method import get_method
from llava.signals import VisionSignals


def three_crop_signals():
    """3 crops x 4 patches (flat 0-3, 4-7, 8-11); [CLS] attention peaks at local patches 2 and 3 in
    crop 0, 0 and 1 in crop 1, 1 and 3 in crop 2."""
    a = torch.tensor([.1, .2, .9, .8, .7, .6, .1, .0, .1, .5, .2, .4])
    feats = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    return VisionSignals(
        features=feats, vision_features=feats.clone(), unit=torch.arange(3).repeat_interleave(4),
        patch=torch.arange(4).repeat(3), unit_kind="crop", grid=(2, 2),
        text_embeds=torch.randn(3, 8), question_mask=torch.tensor([False, True, False]),
        cls_attn=a[None].repeat(2, 1), keys=feats.clone(),
        unit_pos=torch.tensor([[-1, -1], [0, 0], [0, 1]]))


def test_consensusdrop_offsets_picks_per_crop():
    m = get_method("consensusdrop", 2, fusion="encoder_only", merge="none")
    m.setup(num_layers=32, num_vision_layers=24, family="llava_next")
    sel = m.select_vision(three_crop_signals())
    # crop 0 local {2,3} -> 2,3; crop 1 local {0,1} -> 4,5; crop 2 local {1,3} -> 9,11
    assert sel.keep.tolist() == [2, 3, 4, 5, 9, 11]


def test_attnmix_offsets_per_crop_and_the_released_offset_bug():
    m = get_method("attnmix", 6, variant="cls")
    m.setup(num_layers=32, num_vision_layers=24, family="llava_next")
    sig = three_crop_signals()
    # k = floor(3 / 3) = 1 -> top-2 per crop by a: same picks as above
    assert m.select_vision(sig).keep.tolist() == [2, 3, 4, 5, 9, 11]
    m = get_method("attnmix", 6, variant="cls", crop_offset_bug=True)
    m.setup(num_layers=32, num_vision_layers=24, family="llava_next")
    # released: crop i's local picks + i: crop 1 {0,1}+1 -> 1,2; crop 2 {1,3}+2 -> 3,5 (sorted, duplicates)
    assert m.select_vision(sig).keep.tolist() == [1, 2, 2, 3, 3, 5]


def test_visiondrop_stage0_per_crop_offsets_and_grid_raster():
    m = get_method("visiondrop", 8, schedule=((2, 0), (1, 0), (1, 0), (1, 0)), cls_token=False)
    m.setup(num_layers=32, num_vision_layers=24, family="llava_next")
    sig = three_crop_signals()
    sig.unit_pos = torch.tensor([[-1, -1], [0, 1], [0, 0]])  # crop 2 is the left one, crop 1 the right one
    sel = m.select_vision(sig)
    assert sorted(sel.keep.tolist()) == [2, 3, 4, 5, 9, 11]
    # grid_raster: base crop first (2, 3); on the 2x4 patch grid, crop 2 (left) local 1 -> (0, 1),
    # local 3 -> (1, 1); crop 1 (right) local 0 -> (0, 2), local 1 -> (0, 3). Row-major: 9, 4, 5, 11
    assert sel.keep[sel.order].tolist() == [2, 3, 9, 4, 5, 11]


# the 64-of-576 (11%) equivalent on the tiny models, in each method's own budget convention
BUDGET_64 = {
    "consensusdrop": {"llava": 2, "llava_next": 2, "video_llava": 2},  # per image / crop / frame
    "visiondrop": {"llava": 2, "llava_next": 2, "video_llava": 4},  # layer average per unit (video needs a >= 3)
    "attnmix": {"llava": 2, "llava_next": 10, "video_llava": 16},  # total per sample (k >= 1 per unit; 5 crops)
}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
@pytest.mark.parametrize("method", sorted(BUDGET_64))
def test_cli_runs_each_seed_method_on_each_family(rt, method):
    budget = BUDGET_64[method][rt.family]
    res = ask(None, "what color is the circle on the left?", method=method, budget=budget, rt=rt, max_new_tokens=4)
    assert res["method"]["method"] == method and res["method"]["budget"] == budget
    assert 0 < res["visual_entering_llm"] < res["visual_candidates"]
    assert res["visual_layer_avg"] <= res["visual_entering_llm"]
    assert isinstance(res["answer"], str)

"""VisionDrop: schedules, worked examples of both stages, and integration on the tiny models."""

import pytest
import torch
from conftest import FAMILIES, make_batch

from visiondrop import image_schedule, llm_stage_select, stage0_unit, video_schedule


@pytest.mark.parametrize("budget", [32, 64, 128, 192])
def test_image_schedule_averages_to_the_budget(budget):
    sched = image_schedule(budget)
    # four layer groups of 8 (layers 1-8 at the entry count, 9-16, 17-24, 25-32)
    assert sum(d + c for d, c in sched) / 4 == budget
    assert sched[0][0] + sched[0][1] == 1.5 * budget  # the 1.5x entry rule
    f = budget // 32
    assert sched == tuple((d * f, c * f) for d, c in ((42, 6), (30, 5), (22, 4), (16, 3)))


def test_video_schedule_matches_the_spec_example():
    # a = 32 per frame: stage 0 84+12 per frame (768 total); totals 112+16, 70+10, 42+6; E = 256
    s = video_schedule(32)
    assert s == ((84, 12), (112, 16), (70, 10), (42, 6))
    assert (8 * 96 + 128 + 80 + 48) / 4 == 8 * 32


def test_stage0_by_hand():
    # 5 patches (0-4) + a [CLS] (5); a = [.1, .5, .2, .4, .0, (cls) .9]; D0 = 3 incl. [CLS], C0 = 1
    a = torch.tensor([0.1, 0.5, 0.2, 0.4, 0.0, 0.9])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0], [0.9, 0.1], [1.0, 1.0]])
    dom, tg, asg = stage0_unit(a, keys, torch.arange(5), torch.tensor([5]), 3, 1, 6)
    assert dom.tolist() == [5, 1, 3]  # [CLS] first, then top-2 patches ascending
    # remaining [0, 2, 4] -> one target at position 0 = token 0; 2 and 4 merge into it
    assert tg.tolist() == [0] and asg.tolist() == [-1, -1, 0, -1, 0, -1]


def test_llm_stage_by_hand():
    score = torch.tensor([0.3, 0.1, 0.25, 0.05, 0.2, 0.1])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1], [0.0, 2.0], [0.1, 1.0]])
    sel = llm_stage_select(score, keys, dominant=3, contextual=1)
    # top-3 by score: 0, 2, 4 (current order kept); rest [1, 3, 5] -> target token 1 (position 0)
    assert sel.keep.tolist() == [0, 2, 4] and sel.targets.tolist() == [1]
    assert sel.assign.tolist() == [-1, -1, -1, 0, -1, 0]


ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


@ALL
def test_per_layer_counts_follow_the_schedule(rt):
    inputs = make_batch(rt)
    budget = 4 if rt.family == "video_llava" else 8
    eng = rt.prune("visiondrop", budget)
    with torch.no_grad():
        out = rt.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3
    assert eng.llm_layers == (1, 2, 3)  # 8/16/24 of 32 scaled to the tiny 4-layer LLM
    if rt.family == "llava":
        # image_schedule(8) = (11,2), (8,1), (6,1), (4,1): layers see 13, 9, 7, 5
        expect = [[13, 9, 7, 5]] * 3
    elif rt.family == "video_llava":
        # video_schedule(4) = (10,2) per frame x 8 = 96, then totals 16, 8, 8; E = 32 = 8 x 4
        expect = [[96, 16, 8, 8]] * 3
    else:
        # 3 crops per sample; stage 0 per crop 13 (fewer when unpadding leaves a grid crop only 8 tokens:
        # then its 8 patches + [CLS] = 9) + newlines; LLM stages (8+1, 6+1, 4+1) x 3 crops
        expect = [[3 * 13 + 4, 27, 21, 15], [13 + 9 + 9 + 4, 27, 21, 15], [13 + 9 + 9 + 8, 27, 21, 15]]
    assert [s.visual_per_layer for s in eng.stats.samples] == expect
    assert [s.visual_layer_avg for s in eng.stats.samples] == [sum(e) / 4 for e in expect]


def test_llava_cls_enters_the_llm_first(runtimes):
    rt = runtimes["llava"]
    eng = rt.prune("visiondrop", 8)
    with torch.no_grad():
        rt.model(**make_batch(rt, n=1))
    sel = eng.selections[("vision", 0)]
    assert int(sel.keep[0]) == 16 and sel.keep.numel() == 11 and sel.targets.numel() == 2
    eng = rt.prune("visiondrop", 8, cls_token=False)
    with torch.no_grad():
        rt.model(**make_batch(rt, n=1))
    assert bool((eng.selections[("vision", 0)].keep < 16).all())

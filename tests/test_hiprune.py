"""HiPrune: a hand-worked grid (wrap and clamp of the buffers, register count, ascending output), the
official selection transcribed and run on random attention maps of the official shapes, and the engine
on the three tiny CLIP families (the official code on the eager tower's attention maps, layouts). Keep-all,
cache, batching, tokens per unit, the refusal of other families: tests/test_method_guarantees.py."""

import copy

import pytest
import torch
from conftest import layout, llm_visual_rows, make_batch

import baselines.hiprune  # noqa: F401  (registers "hiprune")
from baselines.hiprune import HiPrune, anchor_count, hiprune, unit_budgets


def one_unit(n):
    return torch.zeros(n, dtype=torch.long), torch.arange(n)


# ------------------------------------------------------------------ pure function, worked by hand


def test_worked_6x6_wrap_clamp_and_registers():
    # 6x6 grid, one unit. T = 13, alpha = 0.8: a = round(13 * 0.8 / 5) = round(2.08) = 2 anchors.
    obj = torch.zeros(36)
    obj[5], obj[30] = 0.9, 0.8  # anchors: top-right corner 5, bottom-left corner 30
    obj[12] = 0.7  # third: not an anchor
    # buffers of 5:  4, 6 (wraps to the next row), 5-6 = -1 -> clamp 0, 11
    # buffers of 30: 29 (wraps from the previous row's end), 31, 24, 36 -> clamp 35
    U = {0, 4, 5, 6, 11, 24, 29, 30, 31, 35}
    deep = torch.full((36,), 0.01)
    deep[0] = deep[5] = 0.99  # in U: never registers
    deep[20], deep[14] = 0.5, 0.4
    deep[21] = deep[22] = 0.3  # tie: the lower index 21
    keep = hiprune(obj, deep, *one_unit(36), 13, (6, 6), alpha=0.8)
    # registers = T - |U| = 13 - 10 = 3: 20, 14, 21
    assert keep.tolist() == sorted(U | {14, 20, 21})
    # T = |U|: no register
    assert hiprune(obj, deep, *one_unit(36), 10, (6, 6), alpha=1.0).tolist() == sorted(U)  # a = round(2.0)
    # anchors in the middle: 4 distinct neighbours each; an anchor next to another shares nothing extra
    obj2 = torch.zeros(36)
    obj2[14] = obj2[15] = 1.0
    u2 = {14, 13, 15, 8, 20} | {15, 14, 16, 9, 21}
    assert hiprune(obj2, deep, *one_unit(36), 9, (6, 6), alpha=1.0).tolist() == sorted(u2 | {0})  # 8 + 1 register


def test_anchor_count_is_python_round():
    assert [anchor_count(t, 0.1) for t in (64, 128, 192)] == [1, 3, 4]  # official budgets
    assert anchor_count(25, 0.1) == 0 and anchor_count(75, 0.1) == 2  # 0.5 -> 0, 1.5 -> 2 (half to even)
    # T = 2, alpha 0.1 (the tiny 64-of-576 budget): no anchor, the top-T by the deep layer only
    obj, deep = torch.rand(16), torch.tensor([float(i % 5) for i in range(16)]) / 8
    assert hiprune(obj, deep, *one_unit(16), 2, (4, 4)).tolist() == [4, 9]


def test_overflow_when_u_exceeds_t():
    # T = 3, alpha = 1: a = round(0.6) = 1 anchor with 4 buffers -> |U| = 5 > T: anchor, then the buffers
    # by the object score (our choice; the official code would ask topk for a negative count)
    obj = torch.zeros(16)
    obj[5], obj[9], obj[6] = 1.0, 0.5, 0.2
    keep = hiprune(obj, torch.rand(16), *one_unit(16), 3, (4, 4), alpha=1.0)
    assert keep.tolist() == [5, 6, 9]


def test_units_newlines_cls_and_absent_patches():
    # unit 0: 2x2 grid, patches 0..3; newline; unit 1: [CLS] + patches 0, 1, 3 (patch 2 absent, unpad-like)
    unit = torch.tensor([0, 0, 0, 0, -1, 1, 1, 1, 1])
    patch = torch.tensor([0, 1, 2, 3, -1, -1, 0, 1, 3])
    obj = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0, 0.5, 0.1, 0.2, 0.9])
    deep = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.0, 0.9, 0.5, 0.1, 0.3])
    # T = 2, alpha 0.1: no anchors -> top-2 patches by deep: unit 0 {0, 2}; unit 1 {6, 8}; newline kept
    assert hiprune(obj, deep, unit, patch, 2, (2, 2)).tolist() == [0, 2, 4, 6, 8]
    assert hiprune(obj, deep, unit, patch, 2, (2, 2), keep_newlines=False).tolist() == [0, 2, 6, 8]
    # cls_token keep: [CLS] + top-1 patch in unit 1
    assert hiprune(obj, deep, unit, patch, 2, (2, 2), cls_token="keep").tolist() == [0, 2, 4, 5, 6]
    # alpha 5, T = 2: a = 2 anchors per unit. Unit 0: anchors 1, 3 -> U = {0, 1, 2, 3} > T: the anchors.
    # Unit 1 (patch 2 absent): anchors 3 (0.9), 1 (0.2) among the present patches; buffers 0 (1-1, 1-2
    # clamped), 2 (absent: skipped), 3+1, 3+2 clamped to 3 -> U = {0, 1, 3} > T: the anchors, tokens 7, 8
    got = hiprune(obj, deep, unit, patch, 2, (2, 2), alpha=5.0, keep_newlines=False).tolist()
    assert got == [1, 3, 7, 8]
    # T >= tokens of a unit: kept whole ([CLS] too)
    assert hiprune(obj, deep, unit, patch, 4, (2, 2)).tolist() == list(range(9))


def test_per_image_total_budget_split():
    # NeXT-like: image 0 = base + 2 grid crops, image 1 = base only; official int(R / N_img)
    pos = [(-1, -1), (0, 0), (0, 1), (-1, -1)]
    assert unit_budgets(4, 10, "per_image_total", pos) == [3, 3, 3, 10]
    assert unit_budgets(4, 10, "per_unit", pos) == [10] * 4
    assert unit_budgets(2, 7, "per_image_total", [(-1, -1), (-1, -1)]) == [7, 7]  # LLaVA-1.5 / frames


def test_options_and_layers():
    m = HiPrune(64)
    assert m.config() == {"method": "hiprune", "budget": 64, "position_mode": "keep", "alpha": 0.1,
                          "object_layer": 9, "object_layer_reference": 24, "deep_layer": -2,
                          "budget_mode": "per_unit", "cls_token": "drop", "keep_newlines": True,
                          "numerics": "ours"}
    assert m.vision_stage and not m.needs_vision_attention
    assert m.vision_attention_layers == (9, -2)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")  # CLIP-L: official layers 9 and -2
    assert m.vision_attention_layers == (9, -2)
    m.setup(num_layers=2, num_vision_layers=3, family="llava")  # tiny tower: round(9 * 3 / 24) = 1
    assert m.vision_attention_layers == (1, -2)
    m = HiPrune(64, object_layer=2, object_layer_reference=None)
    m.setup(num_layers=2, num_vision_layers=3, family="video_llava")
    assert m.vision_attention_layers == (2, -2)
    with pytest.raises(ValueError):
        HiPrune(64, object_layer=5, object_layer_reference=None).setup(num_layers=2, num_vision_layers=3,
                                                                        family="llava")
    for fam in ("qwen2_5_vl", "llava_onevision"):
        with pytest.raises(ValueError, match="CLIP"):
            HiPrune(64).setup(num_layers=2, num_vision_layers=3, family=fam)
    for bad in (dict(cls_token="rank"), dict(budget_mode="total"), dict(alpha=-1), dict(object_layer=0)):
        with pytest.raises(ValueError):
            HiPrune(64, **bad)
    with pytest.raises(ValueError):
        HiPrune()


# ------------------------------------------------------------------ the official selection transcribed


def official_index_masks(all_image_attentions, select_layer, object_layer, retention, alpha, side=24):
    """Danielement321/HiPrune ``encode_images`` (LLaVA/llava/model/llava_arch.py), selection part, on a
    list of (B, H, S, S) attention maps; ``side`` generalises the hard-coded 24 / 575 to other grids."""
    B, N = all_image_attentions[select_layer].shape[0], all_image_attentions[select_layer].shape[-1] - 1
    visual_token_num = int(int(retention) / B)
    deep_attention = all_image_attentions[select_layer].mean(dim=1).mean(dim=1)[:, 1:]
    shallow_attention = all_image_attentions[object_layer - 1].mean(dim=1).mean(dim=1)[:, 1:]
    shallow_token_num = round(visual_token_num * float(alpha) / 5)
    index_masks = []
    for i in range(B):
        idx = torch.topk(shallow_attention[i].unsqueeze(0), k=shallow_token_num, dim=1)[1]
        idx = torch.cat([idx, idx - 1, idx + 1, idx - side, idx + side], dim=1)
        idx = idx.clamp(0, N - 1)
        idx = torch.unique(idx, sorted=False).unsqueeze(0)
        deep_token_num = visual_token_num - idx.shape[1]
        available = torch.zeros(1, N, dtype=torch.bool)
        available.scatter_(1, idx, 1)
        deep_attention[i] -= available.int().squeeze()
        deep_idx = torch.topk(deep_attention[i].unsqueeze(0), k=deep_token_num, dim=1)[1]
        token_indices = torch.sort(torch.cat([idx, deep_idx], dim=1), dim=1)[0]
        index_mask = torch.zeros(1, N, dtype=torch.bool)
        index_mask.scatter_(1, token_indices, True)
        index_masks.append(index_mask)
    return torch.cat(index_masks, dim=0)


@pytest.mark.parametrize("T", [64, 128, 192])
def test_selection_equals_official_on_random_attention(T):
    g = torch.Generator().manual_seed(T)
    # 24 layers of (1, 16, 577, 577) softmax maps would be 500 MB; only layers 8 and 22 are read
    maps = [None] * 24
    for li in (8, 22):
        maps[li] = (torch.randn(1, 16, 577, 577, generator=g) * 3).softmax(-1)
    # plant a top-row and a right-edge anchor so that the clamp and the row wrap are exercised
    maps[8][0, :, :, 1 + 3] += 0.2
    maps[8][0, :, :, 1 + 24 * 5 + 23] += 0.15
    maps[8] = maps[8] / maps[8].sum(-1, keepdim=True)
    ref = official_index_masks(maps, -2, 9, T, 0.1)[0]
    # engine signal: per-head column mean over all 577 query rows, [CLS] dropped (patch columns)
    recv = {v: maps[li][0].mean(1)[:, 1:] for v, li in ((9, 8), (-2, 22))}
    keep = hiprune(recv[9].mean(0), recv[-2].mean(0), *one_unit(576), T, (24, 24), alpha=0.1)
    assert keep.numel() == T == int(ref.sum())
    assert keep.tolist() == torch.nonzero(ref).flatten().tolist()
    assert {3, 0, 2, 4, 27}.issubset(set(keep.tolist()))  # anchor 3: clamp -> 0 (3 - 24 < 0)
    if T >= 128:  # a = 3, 4: the second anchor 143 (row 5, last column): 143 + 1 = 144 wraps to row 6
        assert {143, 142, 144, 119, 167}.issubset(set(keep.tolist()))


def test_method_reads_received_attention_of_its_layers():
    m = HiPrune(13, alpha=0.8, object_layer_reference=None, object_layer=1)
    m.setup(num_layers=2, num_vision_layers=3, family="llava")

    class Sig:  # the fields HiPrune reads (VisionSignals' names)
        def unit_layout(self, patch=False, stock=False, pos=False):
            from llava.ops import unit_layout
            return unit_layout(self.unit, self.patch if patch else None, None, self.unit_pos if pos else None)

    sig = Sig()
    obj = torch.zeros(36)
    obj[5], obj[30] = 0.9, 0.8
    deep = torch.full((36,), 0.01)
    deep[20], deep[14], deep[21] = 0.5, 0.4, 0.3
    sig.received_attn = {1: torch.stack([obj * 2, obj * 0]), -2: torch.stack([deep, deep])}
    sig.unit, sig.patch = one_unit(36)
    sig.grid, sig.unit_pos = (6, 6), None
    assert m.select_vision(sig).keep.tolist() == [0, 4, 5, 6, 11, 14, 20, 21, 24, 29, 30, 31, 35]


# ------------------------------------------------------------------ tiny models


def official_llm_rows(tower, pixels, projector, T, object_layer, alpha):
    """Official ``encode_images`` end to end on the eager tower (one unit per call, as batch 1), for a
    4x4 tiny grid: select layer -2 features, index mask, projected features kept in order. (n, T, D)."""
    tower = copy.deepcopy(tower)
    tower.set_attn_implementation("eager")
    out_rows = []
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        feats = projector(out.hidden_states[-2][:, 1:])
        for i in range(pixels.shape[0]):
            maps = [a[i:i + 1].float() for a in out.attentions]
            mask = official_index_masks(maps, -2, object_layer, T, alpha, side=4)[0]
            out_rows.append(feats[i][mask])
    return torch.stack(out_rows)


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
@pytest.mark.parametrize("T,alpha", [(3, 0.1), (6, 1.0), (12, 1.0)])  # a = 0, round(1.2) = 1, round(2.4) = 2
def test_llm_input_equals_official_hiprune(rt, T, alpha):
    inputs = make_batch(rt)
    rt.prune("hiprune", T, alpha=alpha)
    rows = llm_visual_rows(rt, inputs)
    core = rt.model.model
    if rt.family == "video_llava":  # per frame, [CLS] dropped (cls_token "drop")
        tower, pixels = core.video_tower, inputs["pixel_values_videos"].flatten(0, 1)
    else:
        tower, pixels = core.vision_tower, inputs["pixel_values"]
    assert len(tower.encoder.layers) == 3  # object layer round(9 * 3 / 24) = 1 -> attentions[0]
    ref = official_llm_rows(tower, pixels, core.multi_modal_projector, T, 1, alpha)
    per_sample = ref.shape[0] // 3
    for b in range(3):
        expected = ref[b * per_sample:(b + 1) * per_sample].flatten(0, 1)
        assert rows[b].shape == expected.shape
        torch.testing.assert_close(rows[b], expected, atol=1e-5, rtol=1e-4)


def test_video_cls_keep(runtimes):
    rt = runtimes["video-llava"]
    inputs = make_batch(rt)
    try:
        eng = rt.prune("hiprune", 4, cls_token="keep")
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [32] * 3
    finally:
        rt.unprune()


def test_next_spatial_layout_per_image_total(runtimes):
    rt = runtimes["llava-next"]
    rt.processor.next_layout = "spatial"
    try:
        inputs = make_batch(rt)
        assert layout(rt, inputs) == [([16, 16, 16], 0)] * 3
        eng = rt.prune("hiprune", 5)
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [15, 15, 15]
        eng = rt.prune("hiprune", 10, budget_mode="per_image_total")  # int(10 / 3) = 3 per crop
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [9, 9, 9]
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"

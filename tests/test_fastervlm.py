"""FasterVLM: hand-worked per-unit top-k, the official code transcribed as a reference, token
accounting on the three tiny families. Keep-all, tokens per unit, batching:
tests/test_method_guarantees.py."""

import copy

import pytest
import torch
from conftest import layout, llm_visual_rows, make_batch

from baselines.fastervlm import FasterVLM, fastervlm


# ------------------------------------------------------------------ pure function, worked by hand


def test_top_t_per_crop_with_index_offsets_and_head_mean():
    # 3 crops of 4 tokens (0-3, 4-7, 8-11), 2 heads, values in 1/16 (exact in fp32), T = 2 per crop.
    h0 = torch.tensor([1, 6, 5, 3, 8, 1, 1, 5, 3, 3, 0, 10]) / 16
    h1 = torch.tensor([7, 0, 5, 3, 2, 1, 9, 3, 3, 3, 6, 0]) / 16
    # head mean (x16):   4  3  5  3 | 5  1  5  4 | 3  3  3  5
    # crop 0: 2 (5), 0 (4)            (head 0 alone would take 1, 2)
    # crop 1: 4 and 6 (5 each)        (head 0 alone: 4, 7)
    # crop 2: 11 (5), then 8, 9, 10 tie at 3 -> lower index 8
    unit = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    keep = fastervlm(torch.stack([h0, h1]), unit, torch.arange(12) % 4, 2)
    assert keep.tolist() == [0, 2, 4, 6, 8, 11]
    # T >= tokens of a unit: the unit is kept whole
    assert fastervlm(torch.stack([h0, h1]), unit, torch.arange(12) % 4, 4).tolist() == list(range(12))


def test_newline_tokens_are_layout():
    # NeXT 'spatial_unpad'-like: crop 0 = 0, 1; newline 2; crop 1 = 3, 4; newline 5. T = 1.
    attn = torch.tensor([[0.2, 0.6, 0.0, 0.7, 0.1, 0.0]])
    unit = torch.tensor([0, 0, -1, 1, 1, -1])
    patch = torch.tensor([0, 1, -1, 0, 1, -1])
    assert fastervlm(attn, unit, patch, 1).tolist() == [1, 2, 3, 5]
    assert fastervlm(attn, unit, patch, 1, keep_newlines=False).tolist() == [1, 3]


def test_video_cls_token_modes():
    # 2 frames of [CLS] + 2 patches; head-mean scores [.5, .1, .3 | .05, .2, .1]
    attn = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.2, 0.1]])
    unit = torch.tensor([0, 0, 0, 1, 1, 1])
    patch = torch.tensor([-1, 0, 1, -1, 0, 1])
    assert fastervlm(attn, unit, patch, 1).tolist() == [2, 4]  # drop (official video branch): patches only
    assert fastervlm(attn, unit, patch, 1, cls_token="rank").tolist() == [0, 4]  # [CLS] 0 wins frame 0
    assert fastervlm(attn, unit, patch, 1, cls_token="keep").tolist() == [0, 3]  # [CLS] + top-0 patches
    assert fastervlm(attn, unit, patch, 2, cls_token="keep").tolist() == [0, 2, 3, 4]
    assert fastervlm(attn, unit, patch, 3).tolist() == [0, 1, 2, 3, 4, 5]  # T >= 3 tokens: all, [CLS] too


def test_options():
    m = FasterVLM(64)
    assert m.config() == {"method": "fastervlm", "budget": 64, "position_mode": "keep", "cls_token": "drop",
                          "keep_newlines": True, "numerics": "ours"}
    assert m.needs_vision_attention and m.vision_stage
    with pytest.raises(ValueError):
        FasterVLM()
    with pytest.raises(ValueError):
        FasterVLM(64, cls_token="first")


# ------------------------------------------------------------------ the official code as reference


def official_fastervlm(tower, pixels, projector, T):
    """Theia-4869/FasterVLM ``feature_select`` ('patch': drop [CLS], attention row 0 over patches) +
    ``encode_images`` (mean over heads, top-T, index mask, project, keep masked in order); the
    video branch's ``encode_videos`` is the same per frame. Returns (n, T, D)."""
    tower = copy.deepcopy(tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        image_features = out.hidden_states[-2][:, 1:]
        image_attentions = out.attentions[-2][:, :, 0, 1:].mean(dim=1)
        token_indices = torch.topk(image_attentions, k=T, dim=1)[1]
        index_masks = torch.zeros(image_features.shape[:2], dtype=torch.bool).scatter_(1, token_indices, True)
        feats = projector(image_features)
    return torch.stack([f[m] for f, m in zip(feats, index_masks)])


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
def test_llm_input_equals_official_fastervlm(rt):
    """T = 3 per image (LLaVA-1.5) / per frame (Video-LLaVA, [CLS] dropped as the video branch)."""
    inputs = make_batch(rt)
    rt.prune("fastervlm", 3)
    rows = llm_visual_rows(rt, inputs)
    core = rt.model.model
    if rt.family == "video_llava":
        tower, pixels = core.video_tower, inputs["pixel_values_videos"].flatten(0, 1)
    else:
        tower, pixels = core.vision_tower, inputs["pixel_values"]
    ref = official_fastervlm(tower, pixels, core.multi_modal_projector, 3)
    per_sample = ref.shape[0] // 3
    for b in range(3):
        expected = ref[b * per_sample:(b + 1) * per_sample].flatten(0, 1)
        assert rows[b].shape == (3 * per_sample, expected.shape[-1])
        torch.testing.assert_close(rows[b], expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ tiny models: accounting, generate


def test_next_spatial_layout_is_exactly_t_per_crop(runtimes):
    rt = runtimes["llava-next"]
    rt.processor.next_layout = "spatial"
    try:
        inputs = make_batch(rt)
        assert layout(rt, inputs) == [([16, 16, 16], 0)] * 3
        eng = rt.prune("fastervlm", 5)
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [15, 15, 15]
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"

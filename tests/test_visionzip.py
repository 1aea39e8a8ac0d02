"""VisionZip: hand-worked selections, the official code transcribed as a reference, token accounting
on the three tiny families. Keep-all, tokens per unit, batching:
tests/test_method_guarantees.py."""

import copy

import pytest
import torch
from conftest import layout, llm_visual_rows, make_batch

from baselines.visionzip import VisionZip, default_split, visionzip
from llava.ops import merge_tokens


def outputs(x, sel):
    """The tokens a Selection feeds, in feeding order (what the engine materialises)."""
    out = torch.cat([x[sel.keep], merge_tokens(x, sel)]) if sel.targets is not None else x[sel.keep]
    return out[sel.order] if sel.order is not None else out


# ------------------------------------------------------------------ pure function, worked by hand

# One Video-LLaVA-like frame: token 0 is its [CLS] (a visual token), tokens 1..7 are patches.
UNIT = torch.zeros(8, dtype=torch.long)
PATCH = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6])
ATTN = torch.tensor([[0.30, 0.05, 0.20, 0.02, 0.10, 0.08, 0.15, 0.10],   # head 0 alone: patches 2, 6
                     [0.40, 0.05, 0.02, 0.03, 0.30, 0.10, 0.05, 0.05]])  # head 1 alone: patches 4, 5
# summed over heads: [.70, .10, .22, .05, .40, .18, .20, .15] -> best patches 4 (.40), 2 (.22), 6 (.20)
KEYS = torch.tensor([[5.0, 5.0], [1.0, 0.0], [3.0, -1.0], [2.0, 0.5], [-1.0, 2.0], [0.0, 1.0], [0.1, 3.0], [1.0, 1.0]])
X = torch.stack([torch.arange(8.0), torch.ones(8)], 1)  # token i = [i, 1]


def test_dominant_is_cls_plus_top_patches_by_head_sum_and_contextual_merge():
    # D = 3, C = 2: dominant = [CLS] 0 + patches 4, 2 -> kept in index order [0, 2, 4].
    # remaining [1, 3, 5, 6, 7] (R = 5), step = 5 // 2 = 2 -> targets at positions 0, 2 = tokens 1, 5.
    # cosine of keys: 3 = [2, .5] -> token 1 [1, 0] (.97 vs .24); 6 = [.1, 3] -> token 5 [0, 1];
    # 7 = [1, 1] is equally close to both (.707) -> lowest slot, token 1.
    sel = visionzip(ATTN, KEYS, UNIT, PATCH, dominant=3, contextual=2)
    assert sel.keep.tolist() == [0, 2, 4]
    assert sel.targets.tolist() == [1, 5]
    assert sel.assign.tolist() == [-1, -1, -1, 0, -1, -1, 1, 0]
    assert sel.rule == "target_plus_mean" and sel.space == "vision"
    # contextual = target + mean(assigned): [1,1] + mean([3,1],[7,1]) = [6, 2]; [5,1] + [6,1] = [11, 2]
    assert outputs(X, sel).tolist() == [[0, 1], [2, 1], [4, 1], [6, 2], [11, 2]]


def test_cls_slot_variants():
    # "patch": D = 3 best patches 2, 4, 6; the [CLS] is an ordinary remaining token:
    # remaining [0, 1, 3, 5, 7], step 2 -> targets 0, 3. 1 = [1, 0] -> 3 (.97 vs .71);
    # 5 = [0, 1] -> 0 (.71 vs .24); 7 = [1, 1] -> 0 (1.0 vs .86).
    sel = visionzip(ATTN, KEYS, UNIT, PATCH, 3, 2, cls_slot="patch")
    assert sel.keep.tolist() == [2, 4, 6]
    assert sel.targets.tolist() == [0, 3]
    assert sel.assign.tolist() == [-1, 1, -1, -1, -1, 0, -1, 0]
    # "empty": D - 1 = 2 patches (4, 2), no [CLS]: remaining [0, 1, 3, 5, 6, 7], step 3 -> targets 0, 5.
    # 1 -> 0 (.71 vs 0); 3 -> 0 (.86 vs .24); 6 -> 5 (.73 vs .999); 7 -> 0 (1.0 vs .71). 4 tokens out.
    sel = visionzip(ATTN, KEYS, UNIT, PATCH, 3, 2, cls_slot="empty")
    assert sel.keep.tolist() == [2, 4]
    assert sel.targets.tolist() == [0, 5]
    assert sel.assign.tolist() == [-1, 0, -1, 0, -1, -1, 1, 0]
    assert sel.num_out == 4
    with pytest.raises(ValueError):
        visionzip(ATTN, KEYS, UNIT, PATCH, 3, 2, cls_slot="first")


# Two LLaVA-1.5/NeXT-like units with a newline between them (stock tokens 0..8) and each unit's
# [CLS] offered as an extra candidate (9 for unit 0, 10 for unit 1): num_stock = 9.
UNIT2 = torch.tensor([0, 0, 0, 0, -1, 1, 1, 1, 1, 0, 1])
PATCH2 = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, -1, -1])
ATTN2 = torch.tensor([[1, 8, 3, 3, 0, 5, 2, 5, 1, 15, 15]]) / 16.0
X2 = torch.stack([torch.arange(11.0), torch.ones(11)], 1)


def test_per_unit_blocks_with_extra_cls_candidates_and_newline():
    # D = 2, C = 1 per unit. Unit 0: [CLS] 9 + best patch 1; remaining [0, 2, 3] -> target 0 (step 3),
    # 2 and 3 join it. Unit 1: [CLS] 10 + best patch of 5, 6, 7, 8 (5 and 7 tie at 5/16 -> lower
    # index 5); remaining [6, 7, 8] -> target 6. The newline is kept after the unit blocks.
    sel = visionzip(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 2, 1, num_stock=9)
    assert sel.keep.tolist() == [9, 1, 10, 5, 4]
    assert sel.targets.tolist() == [0, 6]
    assert sel.assign.tolist() == [-1, -1, 0, 0, -1, -1, -1, 1, 1, -1, -1]
    # outputs [9, 1, 10, 5, 4 | ctx0, ctx1] fed per unit: [CLS0, 1, ctx0, CLS1, 5, ctx1, newline]
    assert sel.order.tolist() == [0, 1, 5, 2, 3, 6, 4]
    assert outputs(X2, sel)[:, 0].tolist() == [9, 1, 0 + 2.5, 10, 5, 6 + 7.5, 4]
    sel = visionzip(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 2, 1, num_stock=9, keep_newlines=False)
    assert sel.keep.tolist() == [9, 1, 10, 5] and sel.order.tolist() == [0, 1, 4, 2, 3, 5]
    # signals without the extra [CLS] candidates: the slot goes to the next-best patch
    # (unit 0: 1, then 2 and 3 tie at 3/16 -> 2; unit 1: 5 and 7), remaining [0, 3] and [6, 8]
    sel = visionzip(ATTN2[:, :9], torch.ones(9, 2), UNIT2[:9], PATCH2[:9], 2, 1)
    assert sel.keep.tolist() == [1, 2, 5, 7, 4] and sel.targets.tolist() == [0, 6]
    assert sel.assign.tolist() == [-1, -1, -1, 0, -1, -1, -1, -1, 1]


def test_next_grid_raster_order_as_official_restore():
    # LLaVA-NeXT-like: base crop (unit 0, tokens 0-3) and a 1 x 2 grid of crops (unit 1 at (0, 0),
    # tokens 4-7; unit 2 at (0, 1), tokens 8-11), 2 x 2 patches each; extra [CLS] 12, 13, 14.
    # D = 2, C = 1: best patch per crop 1 | 6 (patch 2 = row 1, col 0) | 9 (patch 1 = row 0, col 1);
    # targets 0 | 4 | 8 (first of each remaining list).
    unit = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [0, 1, 2])
    patch = torch.tensor([0, 1, 2, 3] * 3 + [-1, -1, -1])
    attn = torch.tensor([[1, 3, 2, 0, 0, 0, 5, 1, 0, 4, 1, 0, 9, 9, 9]]) / 16
    pos = torch.tensor([[-1, -1], [0, 0], [0, 1]])
    sel = visionzip(attn, torch.ones(15, 2), unit, patch, 2, 1, num_stock=12, unit_pos=pos)
    assert sel.keep.tolist() == [12, 1, 13, 6, 14, 9] and sel.targets.tolist() == [0, 4, 8]
    # official restore_image_features_sorted: base [CLS, 1, ctx]; grid dominant patches by position on
    # the full 2 x 4 grid: 9 at (0, 3) before 6 at (1, 0); then the grid [CLS] 13, 14; then ctx 4, 8
    assert sel.order.tolist() == [0, 1, 6, 5, 3, 2, 4, 7, 8]
    sel = visionzip(attn, torch.ones(15, 2), unit, patch, 2, 1, num_stock=12, unit_pos=pos, order="unit")
    assert sel.order.tolist() == [0, 1, 6, 2, 3, 7, 4, 5, 8]


def test_budget_at_least_unit_size_keeps_the_stock_tokens_in_order():
    # D + C = 4 >= 4 tokens per unit: every stock token kept in place, the extra [CLS] not added.
    sel = visionzip(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 3, 1, num_stock=9)
    assert sel.targets is None and sel.is_identity(9)


def test_official_splits_and_overrides():
    assert [default_split(b) for b in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert [default_split(b) for b in (32, 17)] == [(27, 5), (14, 3)]  # NeXT per crop; video per frame
    assert [default_split(b) for b in (2, 4, 6)] == [(2, 0), (3, 1), (5, 1)]  # round(B * 10 / 64)
    m = VisionZip(64)
    assert (m.dominant, m.contextual, m.cls_slot) == (54, 10, "cls") and m.include_cls_candidates
    assert (VisionZip(64, dominant=60).contextual, VisionZip(64, contextual=4).dominant) == (4, 60)
    m = VisionZip(dominant=5, contextual=2)
    assert m.budget == 7 and m.config()["dominant"] == 5
    assert not VisionZip(64, cls_slot="patch").include_cls_candidates
    with pytest.raises(ValueError):
        VisionZip(64, dominant=50, contextual=10)
    with pytest.raises(ValueError):
        VisionZip()
    with pytest.raises(ValueError):
        VisionZip(64, cls_slot="first")
    with pytest.raises(ValueError):
        VisionZip(64, next_order="raster")
    assert VisionZip(64).config()["next_order"] == "grid_raster"


# ------------------------------------------------------------------ the official code as reference


def official_visionzip(tower, pixels, dominant, contextual):
    """dvlab-research/VisionZip ``CLIPVisionTower_VisionZip.forward`` transcribed (eager CLIP with
    attentions; ``dominant_num = dominant - 1`` as ``visionzip()`` sets it). Returns (n, D + C, Dv)."""
    tower = copy.deepcopy(tower)
    tower.set_attn_implementation("eager")
    cap = {}
    layer = tower.encoder.layers[-2].self_attn
    h = layer.k_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("k", o))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
    h.remove()
    attn_weights, hidden_states = out.attentions[-2], out.hidden_states[-2]
    B, S, C = hidden_states.shape
    metric = cap["k"].view(B, S, layer.num_heads, -1).transpose(1, 2).mean(1)  # raw_key_states.mean(1)
    dominant_num, contextual_num = dominant - 1, contextual
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((B, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num + 1, C)
    metric_filtered = metric[mask].view(B, S - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, S - (dominant_num + 1), C)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    rest = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, rest, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(B, tokens_to_merge.shape[1], contextual_num, dtype=hidden_states.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_states_filtered[:, rest, :]) / counts
    contextual_tokens = hidden_states_filtered[:, target_indices, :] + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
def test_llm_input_equals_official_visionzip(rt):
    """LLaVA-1.5: [CLS] + 2 patches + 2 contextual per image, exactly the official tower output
    (projected). Video-LLaVA: the same per frame ([CLS] is a frame token), frames in order."""
    inputs = make_batch(rt)
    rt.prune("visionzip", dominant=3, contextual=2)
    rows = llm_visual_rows(rt, inputs)
    core = rt.model.model
    if rt.family == "video_llava":
        tower, pixels = core.video_tower, inputs["pixel_values_videos"].flatten(0, 1)
    else:
        tower, pixels = core.vision_tower, inputs["pixel_values"]
    with torch.no_grad():
        ref = core.multi_modal_projector(official_visionzip(tower, pixels, 3, 2))
    per_sample = ref.shape[0] // 3
    for b in range(3):
        expected = ref[b * per_sample:(b + 1) * per_sample].flatten(0, 1)
        assert rows[b].shape == expected.shape == (5 * per_sample, expected.shape[-1])
        torch.testing.assert_close(rows[b], expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ tiny models: accounting, generate


def test_next_spatial_layout_is_exactly_budget_per_crop(runtimes):
    rt = runtimes["llava-next"]
    rt.processor.next_layout = "spatial"
    try:
        inputs = make_batch(rt)
        assert [sizes for sizes, nl in layout(rt, inputs)] == [[16, 16, 16]] * 3
        eng = rt.prune("visionzip", 4)  # 3 + 1 per crop
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [12, 12, 12]
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"


def test_cls_slot_empty_feeds_one_token_less(runtimes):
    rt = runtimes["llava"]
    inputs = make_batch(rt)
    eng = rt.prune("visionzip", 6, cls_slot="empty")  # 5 + 1 -> 4 patches + 1 contextual
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    assert [s.visual_entering_llm for s in eng.stats.samples] == [5, 5, 5]

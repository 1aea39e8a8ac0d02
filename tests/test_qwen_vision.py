"""llava.families.qwen_vision on a tiny random-weight Qwen2.5-VL (docs/models.md).

The brute-force reference below works in the processor's merge-block raster order (the order of
`pooler_output`): it un-permutes the captured attention input of the chosen block, rebuilds the
2-D RoPE from hand-computed (h, w) patch coordinates, and takes the full softmax per segment. It is
first checked against the block's own attention output, so it sees the q / k the tower used.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from llava.families.qwen_vision import QwenVisual, encode, project, token_layout

IMAGES = [[1, 12, 8], [1, 4, 6]]          # merged 6x4 = 24 and 2x3 = 6 tokens
VIDEOS = [[2, 8, 8], [2, 4, 4]]           # 2 slices of 4x4 = 16, 2 slices of 2x2 = 4
ROW = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], out_hidden_size=64, tokens_per_second=2),
        text_config=dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=128, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _pixels(grid, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grid), ROW, generator=g)


@pytest.fixture(scope="module")
def images():
    return _pixels(IMAGES, 1), torch.tensor(IMAGES)


@pytest.fixture(scope="module")
def videos():
    return _pixels(VIDEOS, 2), torch.tensor(VIDEOS)


def _hw_positions(grid):
    """(N, 2) (row, col) of each patch in the processor's merge-block order, written out by hand."""
    out = []
    for t, h, w in grid:
        for _ in range(t):
            for br in range(h // 2):
                for bc in range(w // 2):
                    for i in range(2):
                        for j in range(2):
                            out.append((2 * br + i, 2 * bc + j))
    return torch.tensor(out)


def _reference(model, pixel_values, grid, layer, video=False):
    """Brute force in raster order: per head (H, T) received / pooled-query saliency and (T, d) keys."""
    visual = model.model.visual
    attn = visual.blocks[layer].attn
    got = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("x", a[0]), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, o: got.__setitem__("o", o))
    try:
        with torch.no_grad():
            fn = model.model.get_video_features if video else model.model.get_image_features
            fn(pixel_values, torch.tensor(grid))
    finally:
        h1.remove()
        h2.remove()
    wi, _ = get_vision_window_index(torch.tensor(grid), 2, visual.window_size, visual.patch_size)
    rev = torch.argsort(wi)
    n, c = got["x"].shape
    unperm = lambda y: y.reshape(n // 4, 4, -1)[rev].reshape(n, -1)  # noqa: E731
    x, o_tower = unperm(got["x"]), unperm(got["o"])
    heads = attn.num_heads
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).unbind(1)
        k_raw = k.clone()
        cos, sin = visual.rotary_pos_emb(x, _hw_positions(grid))
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (z.transpose(0, 1).double() for z in (q, k, v))
        recv, pooled, o = [], [], []
        a = 0
        for t, h, w in grid:
            for _ in range(t):
                s = slice(a, a + h * w)
                p = torch.softmax(q[:, s] @ k[:, s].transpose(1, 2) * attn.scaling, -1)      # (H, S, S)
                o.append((p @ v[:, s]).transpose(0, 1).reshape(h * w, -1))
                recv.append(p.mean(1))
                qm = q[:, s].mean(1, keepdim=True)
                pooled.append(torch.softmax(qm @ k[:, s].transpose(1, 2) * attn.scaling, -1)[:, 0])
                a += h * w
        o = attn.proj(torch.cat(o).float())
    assert torch.allclose(o, o_tower, atol=1e-5), "reference q/k/v disagree with the tower's attention"
    pool4 = lambda y: y.reshape(heads, -1, 4).sum(-1).float()  # noqa: E731
    keys = k_raw.float().mean(1).reshape(-1, 4, k_raw.shape[-1]).mean(1)
    return pool4(torch.cat(recv, 1)), pool4(torch.cat(pooled, 1)), keys


def _segment_sums(sal, unit):
    n_units = int(unit.max()) + 1
    return torch.zeros(sal.shape[0], n_units, dtype=sal.dtype).index_add_(1, unit, sal)


def test_features_layout_and_projection(model, images):
    pv, grid = images
    vis = encode(model, pv, grid, want_attn=False)
    assert isinstance(vis, QwenVisual)
    with torch.no_grad():
        stock = model.model.get_image_features(pv, grid)
    assert torch.equal(vis.features, torch.cat(stock.pooler_output))
    assert vis.features.dtype == torch.float32 and vis.features.shape == (30, 64)
    unit, patch, grids, sizes, _, _ = token_layout(grid.tolist(), 2)  # the tokens' layout, in this order
    assert sizes == [24, 6]
    assert grids == [(6, 4), (2, 3)]
    assert torch.equal(unit, torch.tensor([0] * 24 + [1] * 6))
    assert torch.equal(patch, torch.cat([torch.arange(24), torch.arange(6)]))
    assert vis.saliency is None and vis.keys is None
    # vision_features = ln_q of the patch states, 4 per merged token, un-permuted from window order
    # (last_hidden_state is still in window order: the trap this module handles).
    assert vis.vision_features.shape == (30, 4 * 32)
    wi, _ = get_vision_window_index(grid, 2, 56, 14)
    with torch.no_grad():
        ref = model.model.visual.merger.ln_q(stock.last_hidden_state).reshape(30, 128)[torch.argsort(wi)]
        proj = project(model, vis.vision_features)
    assert torch.equal(vis.vision_features, ref)
    assert not torch.equal(wi, torch.arange(30))            # the tiny grid really is window-permuted
    assert torch.allclose(proj, vis.features, atol=1e-6, rtol=0)


def _unit(grid):
    """Each merged token's attention segment (an image / a video's temporal slice), :func:`token_layout`'s."""
    return token_layout(grid.tolist(), 2)[0]


@pytest.mark.parametrize("layer", [None, 1, -1])
def test_received_saliency_matches_brute_force(model, images, layer):
    pv, grid = images
    vis = encode(model, pv, grid, want_attn=True, layer=layer)
    ref_recv, _, ref_keys = _reference(model, pv, IMAGES, 3 if layer in (None, -1) else layer)
    assert vis.saliency.dtype == torch.float32 and vis.saliency.shape == (2, 30)
    assert (vis.saliency >= 0).all()
    assert torch.allclose(_segment_sums(vis.saliency, _unit(grid)), torch.ones(2, 2), atol=1e-6)
    assert torch.allclose(vis.saliency, ref_recv, atol=1e-6, rtol=0)
    assert vis.keys.dtype == torch.float32 and vis.keys.shape == (30, 16)
    assert torch.allclose(vis.keys, ref_keys, atol=1e-6, rtol=0)
    chunked = encode(model, pv, grid, want_attn=True, layer=layer, chunk=3)
    assert torch.allclose(chunked.saliency, vis.saliency, atol=1e-6, rtol=0)
    assert torch.equal(chunked.features, vis.features)


def test_pooled_query(model, images):
    pv, grid = images
    vis = encode(model, pv, grid, want_attn=True, saliency="pooled_query")
    _, ref_pooled, _ = _reference(model, pv, IMAGES, 3)
    assert vis.saliency.shape == (2, 30) and vis.saliency.dtype == torch.float32
    assert torch.allclose(_segment_sums(vis.saliency, _unit(grid)), torch.ones(2, 2), atol=1e-6)
    assert torch.allclose(vis.saliency, ref_pooled, atol=1e-6, rtol=0)


def test_images_are_independent(model, images):
    pv, grid = images
    both = encode(model, pv, grid, want_attn=True)
    first = encode(model, pv[:96], grid[:1], want_attn=True)
    second = encode(model, pv[96:], grid[1:], want_attn=True)
    for part, rows in ((first, slice(0, 24)), (second, slice(24, 30))):
        assert torch.allclose(part.features, both.features[rows], atol=1e-5)
        assert torch.allclose(part.vision_features, both.vision_features[rows], atol=1e-5)
        assert torch.allclose(part.saliency, both.saliency[:, rows], atol=1e-6)
        assert torch.allclose(part.keys, both.keys[rows], atol=1e-5)
    both_unit, both_patch, _, _, _, _ = token_layout(grid.tolist(), 2)
    for part, rows in ((grid[:1], slice(0, 24)), (grid[1:], slice(24, 30))):  # each image's layout on its own
        unit, patch, grids, _, _, _ = token_layout(part.tolist(), 2)
        assert torch.equal(patch, both_patch[rows])
        assert torch.equal(unit, torch.zeros(rows.stop - rows.start, dtype=torch.long))
        assert grids == ([(6, 4)] if rows.start == 0 else [(2, 3)])


def test_video(model, videos):
    pv, grid = videos
    vis = encode(model, pv, grid, want_attn=True, video=True)
    with torch.no_grad():
        stock = model.model.get_video_features(pv, grid)
    assert torch.equal(vis.features, torch.cat(stock.pooler_output))
    unit, patch, grids, sizes, _, _ = token_layout(grid.tolist(), 2)  # the tokens' layout, in this order
    assert sizes == [32, 8]
    assert grids == [(4, 4), (4, 4), (2, 2), (2, 2)]
    assert torch.equal(unit, torch.tensor([0] * 16 + [1] * 16 + [2] * 4 + [3] * 4))
    assert torch.equal(patch, torch.cat([torch.arange(16)] * 2 + [torch.arange(4)] * 2))
    assert torch.allclose(_segment_sums(vis.saliency, _unit(grid)), torch.ones(2, 4), atol=1e-6)
    ref_recv, ref_pooled, ref_keys = _reference(model, pv, VIDEOS, 3, video=True)
    assert torch.allclose(vis.saliency, ref_recv, atol=1e-6, rtol=0)
    assert torch.allclose(vis.keys, ref_keys, atol=1e-6, rtol=0)
    pooled = encode(model, pv, grid, want_attn=True, video=True, saliency="pooled_query")
    assert torch.allclose(pooled.saliency, ref_pooled, atol=1e-6, rtol=0)
    assert torch.allclose(project(model, vis.vision_features), vis.features, atol=1e-6, rtol=0)


def test_bad_arguments(model, images):
    pv, grid = images
    with pytest.raises(ValueError, match="window attention"):
        encode(model, pv, grid, want_attn=True, layer=0)
    with pytest.raises(ValueError, match="window attention"):
        encode(model, pv, grid, want_attn=True, layer=2)
    with pytest.raises(ValueError, match="outside"):
        encode(model, pv, grid, want_attn=True, layer=4)
    with pytest.raises(ValueError, match="unknown saliency"):
        encode(model, pv, grid, want_attn=True, saliency="cls")
    # hooks were removed even though nothing ran
    visual = model.model.visual
    assert not visual.merger.ln_q._forward_hooks
    assert all(not b.attn._forward_pre_hooks for b in visual.blocks)


def test_devices_dtypes_and_hooks_removed(model, images):
    pv, grid = images
    vis = encode(model, pv, grid, want_attn=True)
    for name in ("features", "vision_features", "saliency", "keys"):
        assert getattr(vis, name).device == pv.device, name
    for t in token_layout(grid.tolist(), 2)[:2]:  # the layout (unit, patch): host
        assert t.device.type == "cpu" and t.dtype == torch.long
    visual = model.model.visual
    assert not visual.merger.ln_q._forward_hooks
    assert all(not b.attn._forward_pre_hooks for b in visual.blocks)
    assert visual.config._attn_implementation == "sdpa"


def test_bfloat16_model(model, images):
    pv, grid = images
    half = copy.deepcopy(model).to(torch.bfloat16)
    vis = encode(half, pv, grid, want_attn=True)
    with torch.no_grad():
        stock = torch.cat(half.model.get_image_features(pv, grid).pooler_output)
    assert vis.features.dtype == torch.bfloat16 and torch.equal(vis.features, stock)
    assert vis.vision_features.dtype == torch.bfloat16
    assert vis.saliency.dtype == torch.float32 and vis.keys.dtype == torch.float32
    assert torch.allclose(_segment_sums(vis.saliency, _unit(grid)), torch.ones(2, 2), atol=1e-5)
    assert torch.allclose(project(half, vis.vision_features).float(), vis.features.float(), atol=2e-2)

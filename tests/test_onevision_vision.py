"""llava/families/onevision_vision.py on a tiny random-weight LLaVA-OneVision (docs/models.md).

Tiny geometry: 56-px crops of 14-px patches -> 4x4 = 16 patches per crop, pinpoints = multiples of 56
up to 224 (so a 200x210 image takes a 4x4 crop grid and hits the anyres_max_9 interpolation).
Worked-out layouts (checked against the stock packing below):
- 50x100 -> pinpoint 56x112, grid 1x2, map 4x8, nothing to unpad, no interpolation: 16 + 4*(8+1) = 52;
- 60x150 -> pinpoint 112x168, grid 2x3, map 8x12, unpad keeps rows 2..5 (int(60*12/150) = 4 rows,
  padding 2): 16 + 4*(12+1) = 68;
- 200x210 -> pinpoint 224x224, grid 4x4, map 16x16, unpad keeps all (padding (16-15)//2 = 0),
  ratio sqrt(256/144) = 4/3 > 1.1 -> bilinear to 12x12: 16 + 12*(12+1) = 172;
- 56x56 -> base + a 1x1 grid: 16 + 4*(4+1) = 36;
- two images in one sample (batch_num_images=[2]) -> base crop only: 16 + 1 each;
- video, frames of 4x4 pooled to 2x2: F*4 + 1.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

from llava.families.onevision_vision import attention_layer_index, encode_images, encode_videos, project

PINPOINTS = [[56 * a, 56 * b] for a in range(1, 5) for b in range(1, 5)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS,
        image_token_index=250, video_token_index=251)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval().float()
    proc = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=PINPOINTS)
    return model, proc


def _image(h, w, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _inputs(proc, images):
    return proc(images, return_tensors="pt")


def _stock(model, inp, batch_num_images=None):
    with torch.no_grad():
        out = model.model.get_image_features(
            inp["pixel_values"], inp["image_sizes"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", batch_num_images=batch_num_images, return_dict=True)
    return out


def _select_states(model, pixel_values):
    """(crops, 16, 32) select-layer states and the input of the last layer, from an independent run."""
    with torch.no_grad():
        hs = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hs[-1], hs[-2]


@pytest.mark.parametrize("hw,size", [((200, 210), 172), ((50, 100), 52), ((60, 150), 68), ((56, 56), 36)])
def test_sizes_and_features_bit_identical(tiny, hw, size):
    model, proc = tiny
    inp = _inputs(proc, [_image(*hw)])
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], want_attn=True)
    stock = torch.cat(_stock(model, inp).pooler_output)
    assert vis.sizes == [size] and stock.shape[0] == size
    assert vis.features.dtype == stock.dtype and torch.equal(vis.features, stock)
    for t in (vis.vision_features, vis.keys, vis.unit, vis.patch):
        assert t.shape[0] == size
    assert vis.saliency.shape == (2, size)
    assert len(vis.unit_grid) == vis.unit_pos.shape[0] == int(vis.unit.max()) + 1


def test_layout_52_tokens_by_hand(tiny):
    model, proc = tiny
    inp = _inputs(proc, [_image(50, 100)])
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], want_attn=False)
    unit = [0] * 16
    patch = list(range(16))
    for row in range(4):  # map row: crop (0,0) patches, crop (0,1) patches, newline
        unit += [1, 1, 1, 1, 2, 2, 2, 2, -1]
        patch += [4 * row, 4 * row + 1, 4 * row + 2, 4 * row + 3] * 2 + [-1]
    assert vis.unit.tolist() == unit and vis.patch.tolist() == patch
    assert vis.unit_pos.tolist() == [[-1, -1], [0, 0], [0, 1]]
    assert vis.unit_grid == [(4, 4)] * 3
    assert vis.saliency is None and vis.keys is None


def test_unpad_layout_and_index_map(tiny):
    """60x150: the 8x12 grid map keeps rows 2..5 -> crop row 0 local rows 2,3 then crop row 1 rows 0,1."""
    model, proc = tiny
    inp = _inputs(proc, [_image(60, 150)])
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], want_attn=False)
    unit, patch = [0] * 16, list(range(16))
    for crop_row, local_row in [(0, 2), (0, 3), (1, 0), (1, 1)]:
        for c in range(3):
            unit += [1 + 3 * crop_row + c] * 4
            patch += [4 * local_row + x for x in range(4)]
        unit += [-1]
        patch += [-1]
    assert vis.unit.tolist() == unit and vis.patch.tolist() == patch
    assert vis.unit_pos.tolist() == [[-1, -1], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # vision_features: the select-layer state of exactly that (unit, patch), zeros at newlines
    states, _ = _select_states(model, inp["pixel_values"][0, :7])
    nl = vis.unit < 0
    expected = states[vis.unit.clamp(min=0), vis.patch.clamp(min=0)]
    expected[nl] = 0
    assert torch.equal(vis.vision_features, expected)


@pytest.mark.parametrize("case", ["50x100", "60x150", "56x56", "multi"])
def test_projection_reproduces_features_without_interpolation(tiny, case):
    model, proc = tiny
    if case == "multi":
        inp = _inputs(proc, [[_image(50, 100), _image(200, 210, 1)]])
        bni = inp["batch_num_images"]
    else:
        inp = _inputs(proc, [_image(*map(int, case.split("x")))])
        bni = None
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], batch_num_images=bni, want_attn=False)
    nl = vis.unit < 0
    with torch.no_grad():
        projected = project(model, vis.vision_features)
    torch.testing.assert_close(projected[~nl], vis.features[~nl], atol=1e-6, rtol=0)
    assert torch.equal(vis.features[nl], model.model.image_newline.detach().expand(int(nl.sum()), -1))
    assert not vis.vision_features[nl].any()


def test_interpolated_image_matches_independent_interpolation(tiny):
    model, proc = tiny
    inp = _inputs(proc, [_image(200, 210)])
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], want_attn=True)
    states, _ = _select_states(model, inp["pixel_values"][0])  # 17 crops
    grid = torch.zeros(32, 16, 16)
    for r in range(4):
        for c in range(4):
            grid[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = states[1 + 4 * r + c].T.reshape(32, 4, 4)
    # unpad removes nothing here (int(200*16/210) = 15 rows, padding (16-15)//2 = 0); ratio 4/3 -> 12x12
    mixed = F.interpolate(grid[None], [12, 12], mode="bilinear")[0]
    expected = torch.cat([mixed, torch.zeros(32, 12, 1)], dim=2).flatten(1).T
    expected = torch.cat([states[0], expected])
    torch.testing.assert_close(vis.vision_features, expected, atol=1e-6, rtol=0)
    # provenance: output i samples source (i + 0.5) * 4/3 - 0.5 -> nearest 0, 2, 3, 4, 6, 7, ... (ties up)
    near = [0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15]
    unit, patch = list(vis.unit[16:].view(12, 13)), list(vis.patch[16:].view(12, 13))
    for i, src_row in enumerate(near):
        assert unit[i][12] == -1 and patch[i][12] == -1
        assert unit[i][:12].tolist() == [1 + 4 * (src_row // 4) + src_col // 4 for src_col in near]
        assert patch[i][:12].tolist() == [4 * (src_row % 4) + src_col % 4 for src_col in near]
    # mixed tokens: projecting the mixture is not the mixture of projections (GELU), so no equality there
    nl = vis.unit < 0
    assert vis.saliency[:, nl].abs().sum() == 0 and (vis.saliency >= 0).all()


def test_saliency_received_attention_per_crop(tiny):
    """Multi-image sample: each image is one crop, 16 patches + 1 newline; per head the 16 saliency
    values sum to 1 and equal an independent recomputation from the last layer's input."""
    model, proc = tiny
    inp = _inputs(proc, [[_image(50, 100), _image(200, 210, 1)]])
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"],
                        batch_num_images=inp["batch_num_images"], want_attn=True)
    assert vis.sizes == [17, 17]
    assert vis.unit.tolist() == [0] * 16 + [-1] + [1] * 16 + [-1]
    assert vis.patch.tolist() == (list(range(16)) + [-1]) * 2
    assert vis.unit_pos.tolist() == [[-1, -1]] * 2
    sal = vis.saliency
    assert sal.dtype == torch.float32 and (sal >= 0).all()
    torch.testing.assert_close(sal[:, :16].sum(1), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(sal[:, 17:33].sum(1), torch.ones(2), atol=1e-6, rtol=0)
    assert sal[:, 16].abs().sum() == 0 and sal[:, 33].abs().sum() == 0
    # independent: hidden_states[-2] enters the last layer (attention_layer_index(-1, 2) == 1)
    assert attention_layer_index(-1, 2) == 1
    layer = model.model.vision_tower.encoder.layers[1]
    _, x = _select_states(model, inp["pixel_values"][:, 0])
    with torch.no_grad():
        y = layer.layer_norm1(x)
        q = layer.self_attn.q_proj(y).view(2, 16, 2, 16).transpose(1, 2)
        k = layer.self_attn.k_proj(y).view(2, 16, 2, 16).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * layer.self_attn.scale, dim=-1)  # (img, head, q, k)
    received = probs.mean(2)
    torch.testing.assert_close(sal[:, :16], received[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sal[:, 17:33], received[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vis.keys[17:33], k[1].mean(0), atol=1e-6, rtol=1e-5)


def test_saliency_sums_to_one_per_crop_without_unpad(tiny):
    """56x56: base crop + one grid crop, neither unpadded nor interpolated: each crop's 16 values sum to 1."""
    model, proc = tiny
    inp = _inputs(proc, [_image(56, 56)])
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], want_attn=True)
    for u in (0, 1):
        torch.testing.assert_close(vis.saliency[:, vis.unit == u].sum(1), torch.ones(2), atol=1e-6, rtol=0)


def test_signals_independent_of_batch(tiny):
    model, proc = tiny
    alone = _inputs(proc, [_image(50, 100)])
    batch = _inputs(proc, [_image(200, 210), _image(50, 100), _image(60, 150)])
    a = encode_images(model, alone["pixel_values"], alone["image_sizes"], want_attn=True)
    b = encode_images(model, batch["pixel_values"], batch["image_sizes"], want_attn=True)
    assert b.sizes == [172, 52, 68]
    sl = slice(172, 172 + 52)
    first_unit = 17  # the 200x210 image takes units 0..16
    assert torch.equal(b.unit[sl], torch.where(a.unit >= 0, a.unit + first_unit, -1))
    assert torch.equal(b.patch[sl], a.patch)
    assert torch.equal(b.unit_pos[first_unit:first_unit + 3], a.unit_pos)
    # exact on CPU in practice; the tolerance only allows a batched kernel to block differently
    for name in ("features", "vision_features", "keys"):
        torch.testing.assert_close(getattr(b, name)[sl], getattr(a, name), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.saliency[:, sl], a.saliency, atol=1e-6, rtol=0)


def test_video(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    pv = torch.randn(2, 2, 3, 56, 56)  # 2 videos of 2 frames
    vis = encode_videos(model, pv, want_attn=True)
    with torch.no_grad():
        stock = model.model.get_video_features(pv, vision_feature_layer=-1, vision_feature_select_strategy="full",
                                               return_dict=True).pooler_output
    assert stock.shape[1] == 2 * 4 + 1 == 9 and vis.sizes == [9, 9]
    assert torch.equal(vis.features, stock.flatten(0, 1))
    assert vis.unit.tolist() == [0] * 4 + [1] * 4 + [-1] + [2] * 4 + [3] * 4 + [-1]
    assert vis.patch.tolist() == ([0, 1, 2, 3] * 2 + [-1]) * 2
    assert vis.unit_pos.tolist() == [[-1, -1]] * 4 and vis.unit_grid == [(2, 2)] * 4
    # vision_features: the same 2x bilinear pooling of the select-layer 4x4 maps, zero newline rows
    states, _ = _select_states(model, pv.flatten(0, 1))
    pooled = F.interpolate(states.view(4, 4, 4, 32).permute(0, 3, 1, 2), size=[2, 2], mode="bilinear")
    pooled = pooled.permute(0, 2, 3, 1).reshape(2, 8, 32)
    expected = torch.cat([pooled, torch.zeros(2, 1, 32)], dim=1).flatten(0, 1)
    torch.testing.assert_close(vis.vision_features, expected, atol=1e-6, rtol=0)
    # 4 -> 2 bilinear samples at 0.5 and 2.5: each pooled token averages a 2x2 block, so a frame's
    # 4 pooled saliency values sum to 1/4 per head
    for frame in range(4):
        torch.testing.assert_close(vis.saliency[:, vis.unit == frame].sum(1), torch.full((2,), 0.25),
                                   atol=1e-6, rtol=0)
    assert vis.saliency[:, vis.unit < 0].abs().sum() == 0 and vis.keys.shape == (18, 16)


def test_devices_dtypes_and_hooks(tiny):
    model, proc = tiny
    inp = _inputs(proc, [_image(200, 210), _image(50, 100)])
    layers = model.model.vision_tower.encoder.layers
    vis = encode_images(model, inp["pixel_values"], inp["image_sizes"], want_attn=True)
    dev = inp["pixel_values"].device
    for t in (vis.features, vis.vision_features, vis.saliency, vis.keys):
        assert t.device == dev
    assert vis.saliency.dtype == vis.keys.dtype == torch.float32
    assert vis.vision_features.dtype == vis.features.dtype == torch.float32
    for t in (vis.unit, vis.patch, vis.unit_pos):
        assert t.device.type == "cpu" and t.dtype == torch.long
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    vid = encode_videos(model, torch.randn(1, 2, 3, 56, 56), want_attn=True)
    for t in (vid.unit, vid.patch, vid.unit_pos):
        assert t.device.type == "cpu" and t.dtype == torch.long
    # a failing call leaves no hook behind
    with pytest.raises(Exception):
        encode_images(model, inp["pixel_values"][:, :, :2], inp["image_sizes"], want_attn=True)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_placement(tiny):
    import copy

    model, proc = tiny
    model = copy.deepcopy(model).cuda()
    inp = _inputs(proc, [_image(200, 210), _image(50, 100)])
    pv, sizes = inp["pixel_values"].cuda(), inp["image_sizes"].cuda()
    vis = encode_images(model, pv, sizes, want_attn=True)
    with torch.no_grad():
        stock = torch.cat(model.model.get_image_features(pv, sizes, return_dict=True).pooler_output)
    assert torch.equal(vis.features, stock)
    vid = encode_videos(model, torch.randn(1, 2, 3, 56, 56, device="cuda"), want_attn=True)
    for v in (vis, vid):
        for t in (v.features, v.vision_features, v.saliency, v.keys):
            assert t.device.type == "cuda"
        for t in (v.unit, v.patch, v.unit_pos):
            assert t.device.type == "cpu" and t.dtype == torch.long

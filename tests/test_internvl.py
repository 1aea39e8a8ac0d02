"""InternVL (tiny:internvl: InternViT with [CLS], qk-norm and RMSNorm; pixel shuffle 0.5; 112-px tiles of 8 x 8
patches -> 16 tokens; Qwen3 LLM). The generic suites (keep-all, cached == recompute, batch == alone, static cache,
device placement, host syncs) run it through tests/conftest.NEW_FAMILIES; this file checks what is InternVL's own:
the signals pooled through the pixel shuffle, the tiles, the prompt and video frames."""

import pytest
import torch
from conftest import greedy_no_cache, rand_image
from test_engine import GEN

from llava.method import Method
from llava.models import load
from llava.selection import Selection


@pytest.fixture(scope="module")
def rt():
    r = load("tiny:internvl", seed=3)
    yield r
    r.unprune()


class Spy(Method):
    name = "internvl_spy"
    vision_stage = True
    needs_vision_attention = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append(sig)
        return Selection(keep=torch.arange(sig.num_tokens, device=sig.unit.device))


def _one(rt, size=(90, 200), q="what is this?"):
    return rt.processor([q], [rand_image(7, *size)])


def _block(r, c, g=8):
    """Patch indices (row-major in the 8 x 8 grid) of LLM token (r, c) of a 4 x 4 grid, in the pixel shuffle's
    channel order: (2r, 2c), (2r, 2c + 1), (2r + 1, 2c), (2r + 1, 2c + 1)."""
    return [(2 * r + i) * g + 2 * c + j for i in (0, 1) for j in (0, 1)]


def test_processor_tiles_and_prompt(rt):
    inputs = _one(rt)  # 90 x 200: 1 x 2 tiles (closest aspect ratio within 4 tiles) + the thumbnail
    ip = rt.processor.image_processor
    tiles = ip.get_number_of_image_patches(90, 200, {"crop_to_patches": True})
    assert tiles == 3 and inputs["pixel_values"].shape == (3, 3, 112, 112)
    toks = rt.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    a = toks.index("<img>")
    assert toks[:a] == ["<|im_start|>", "user", "\n"]
    assert toks[a + 1:a + 1 + 48] == ["<IMG_CONTEXT>"] * 48
    assert toks[a + 49:] == ["</img>", "\n", "what", "is", "this", "?", "<|im_end|>", "\n", "<|im_start|>",
                             "assistant", "\n"]


def test_cls_saliency_is_pooled_through_the_pixel_shuffle(rt):
    """The signal per LLM token = the sum of the [CLS] attention of the 2 x 2 patches whose channels the token
    concatenates, against transformers' own eager attention maps and explicit block indices."""
    inputs = _one(rt)
    spy = Spy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    sig = spy.seen[0]
    assert sig.num_units == 3 and sig.num_tokens == 48 and sig.unit_grid == [(4, 4)] * 3
    tower = rt.model.model.vision_tower
    rt.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True, return_dict=True)
    finally:
        rt.model.set_attn_implementation("sdpa")
    cls_row = out.attentions[-1][:, :, 0, 1:]  # last layer = the select layer (-1); (tiles, H, 64 patches)
    hs = out.last_hidden_state[:, 1:]  # (tiles, 64, C)
    proj = rt.model.model.multi_modal_projector
    for u in range(3):
        for r in range(4):
            for c in range(4):
                t = u * 16 + r * 4 + c
                assert int(sig.unit[t]) == u and int(sig.patch[t]) == r * 4 + c
                block = _block(r, c)
                torch.testing.assert_close(sig.cls_attn[:, t], cls_row[u][:, block].sum(-1), atol=1e-6, rtol=1e-5)
                # the features concatenate the same 4 patches in the same order
                torch.testing.assert_close(sig.vision_features[t], hs[u, block].reshape(-1))
    with torch.no_grad():
        torch.testing.assert_close(sig.features, proj(sig.vision_features))
    # the test can fail: pooling 4 raster-consecutive patches instead gives another signal
    naive = cls_row.reshape(3, -1, 16, 4).sum(-1).permute(1, 0, 2).reshape(cls_row.shape[1], -1)
    assert not torch.allclose(sig.cls_attn, naive, atol=1e-4)
    # keys: head-mean keys of the same layer, averaged over the token's 4 patches
    layer = tower.encoder.layer[-1]
    with torch.no_grad():
        xn = layer.layernorm_before(out.hidden_states[-2])
        k = layer.attention.k_norm(layer.attention.k_proj(xn))[:, 1:]
        k = k.view(3, 64, layer.attention.num_heads, -1).float().mean(2)
    want = torch.stack([k[u, _block(r, c)].mean(0) for u in range(3) for r in range(4) for c in range(4)])
    torch.testing.assert_close(sig.keys, want, atol=1e-6, rtol=1e-5)


def test_question_tokens_and_tile_units(rt):
    inputs = _one(rt, q="what color is the circle on the left?")
    spy = Spy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    sig = spy.seen[0]
    q = rt.tokenizer("what color is the circle on the left?", add_special_tokens=False).input_ids
    assert sig.question_ids.tolist() == q  # "</img>\n" before and the role tag after are stripped
    assert sig.unit_pos.tolist() == [[-1, -1]] * 3  # the tiling is not a model input


def _video(rt, frames=3, seed=0):
    """A video prompt as transformers' InternVLProcessor writes it: "Frame{i}: <img>" + 16 tokens + "</img>"
    per frame, joined by newlines; the frames are rows of pixel_values."""
    tok = rt.tokenizer
    cfg = rt.model.config
    start, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    ids = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    for f in range(frames):
        if f:
            ids += tok("\n", add_special_tokens=False).input_ids
        ids += tok(f"frame{f + 1} :", add_special_tokens=False).input_ids + [start] + [cfg.image_token_id] * 16 + [end]
    ids += tok("\nwhat happens in the video?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    ids = torch.tensor([ids])
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(frames, 3, 112, 112, generator=g)}


@pytest.mark.parametrize("method", ["none", "visionzip", "fastv", "consensusdrop"])
def test_video_frames_keep_all_is_stock_and_pruned_decodes_consistently(rt, method):
    inputs = _video(rt)
    rt.unprune()
    with torch.no_grad():
        stock = rt.model(**inputs).logits
        stock_gen = rt.model.generate(**inputs, **GEN)
    eng = rt.prune(method, {"none": None, "visionzip": 4, "fastv": 12, "consensusdrop": 4}[method])
    with torch.no_grad():
        logits = rt.model(**inputs).logits
        gen = rt.model.generate(**inputs, **GEN)
    s = eng.stats.samples[0]
    assert s.visual_candidates == 48
    if method == "none":
        assert torch.equal(logits, stock) and torch.equal(gen, stock_gen)
        return
    assert min(s.visual_per_layer) < 48
    if method != "fastv":  # per frame (unit) budgets: 4 tokens (+ merges) of each of the 3 frames
        assert s.visual_entering_llm == 12
    eng.replay = True
    assert torch.equal(gen, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


def test_unsupported_inputs_are_refused_with_the_reason(rt):
    inputs = _one(rt)
    rt.prune("visionzip", 4)
    bad = dict(inputs, pixel_values_videos=torch.zeros(1, 2, 3, 112, 112))
    with pytest.raises(ValueError, match="video frames as pixel_values"):
        with torch.no_grad():
            rt.model(**bad)
    rt.unprune()
    rt.model.config.vision_feature_select_strategy = "full"
    try:
        rt.prune("visionzip", 4)
        with pytest.raises(ValueError, match="needs the \\[CLS\\] removed"):
            with torch.no_grad():
                rt.model(**inputs)
    finally:
        rt.model.config.vision_feature_select_strategy = "default"
        rt.unprune()

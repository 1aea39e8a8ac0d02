"""The pre-tower stage (llava/pre_tower.py, Method.select_pixels) on the tiny Qwen models: the tower runs the kept
tokens' patches only and gives exactly the kept rows of the stock tower whose attention skips the dropped patches (an
independent reference: the stock tower on every patch through an attention function that masks the dropped keys);
Qwen2.5-VL's windows keep their full-grid geometry (worked values); the pruned prefill equals the stock text model run
by hand on the kept tokens at their unpruned positions; keep-all is the stock model; batch == alone; refusals."""

import numpy as np
import pytest
import torch
from conftest import QUESTIONS, rand_image
from PIL import Image

from llava import load
from llava.families.qwen_kept import kept_tower_inputs
from llava.families.qwen_vision import encode
from llava.method import Method, register
from llava.plan import without_tokens
from llava.selection import Selection

GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def flat_image():
    """Constant blocks, so that PixelPrune drops many tokens (a random image keeps nearly all)."""
    arr = np.zeros((112, 168, 3), dtype=np.uint8)
    arr[:, :60] = 200
    arr[40:80, 80:] = (10, 120, 30)
    return Image.fromarray(arr)


@register
class EveryOther(Method):
    """A pre-tower stage for the tests: keeps the even tokens of each image (and so a different count per image)."""

    name = "test_every_other"
    pixel_stage = True

    def select_pixels(self, sig):
        return Selection(keep=torch.arange(0, sig.num_tokens, 2, device=sig.pixels.device))


@pytest.fixture(scope="module", params=["qwen3-vl", "qwen2-vl", "qwen3.5"])
def rt(request):
    return load(f"tiny:{request.param}", seed=1)


def test_without_tokens_worked_values():
    valid = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    drop = torch.tensor([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    # row 0 keeps columns 1, 3, 4; row 1 keeps 0, 4: left-padded to 3
    assert without_tokens(valid, drop).tolist() == [[1, 3, 4], [-1, 0, 4]]


def _masked_reference(model, pixel_values, grid, kept):
    """The stock tower on every patch, each image's attention masked to its kept patches; the kept rows."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    visual = model.model.visual
    sq = visual.spatial_merge_size ** 2
    keep = torch.zeros(sum(h * w for _, h, w in grid) // sq, dtype=torch.bool)
    keep[kept] = True
    per_image, start = [], 0
    for _, h, w in grid:
        per_image.append(keep[start:start + h * w // sq].repeat_interleave(sq))
        start += h * w // sq
    calls = [0]

    def masked(module, q, k, v, attention_mask=None, **kw):
        m = per_image[calls[0] % len(per_image)]
        calls[0] += 1
        bias = torch.zeros(1, 1, q.shape[2], k.shape[2])
        bias[..., ~m] = float("-inf")
        return sdpa_attention_forward(module, q, k, v, attention_mask=bias, **kw)

    AttentionInterface.register("test_masked_ref", masked)
    old = visual.config._attn_implementation
    visual.config._attn_implementation = "test_masked_ref"
    try:
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values, torch.tensor(grid))
    finally:
        visual.config._attn_implementation = old
    assert calls[0] == len(grid) * len(visual.blocks)
    feats = torch.cat(out.pooler_output)[kept]
    deep = (torch.stack([torch.cat(lv) for lv in out.deepstack_features], 1)[kept]
            if getattr(out, "deepstack_features", None) else None)
    return feats, deep


def test_kept_tower_is_the_stock_tower_attending_to_the_kept_patches(rt):
    inputs = rt.processor(QUESTIONS[:2], [rand_image(0, 90, 150), rand_image(1, 100, 70)])
    grid = inputs["image_grid_thw"].tolist()
    n = sum(h * w for _, h, w in grid) // 4
    kept = torch.tensor([0, 1, 4, 6, 7, n - 3, n - 1])  # some of each image
    with torch.no_grad():
        got = encode(rt.model, inputs["pixel_values"], inputs["image_grid_thw"], want_attn=False,
                     kept=kept_tower_inputs(rt.model.model.visual, grid, kept, "cpu"))
    ref, deep = _masked_reference(rt.model, inputs["pixel_values"], grid, kept)
    assert got.features.shape[0] == kept.numel()
    torch.testing.assert_close(got.features, ref, rtol=1e-5, atol=1e-5)
    if deep is not None:  # Qwen3-VL's DeepStack rows: the kept tokens' too
        torch.testing.assert_close(got.deepstack, deep, rtol=1e-5, atol=1e-5)
    # and not the unmasked stock tower's rows (the dropped patches changed the kept ones' attention)
    with torch.no_grad():
        full = torch.cat(rt.model.model.get_image_features(inputs["pixel_values"],
                                                           inputs["image_grid_thw"]).pooler_output)
    assert (full[kept] - ref).abs().max() > 1e-4


def test_windows_keep_their_full_grid_geometry():
    """Qwen2.5-VL (window_size 56, patch 14, merge 2: windows of 2 x 2 merged tokens) on one image of 4 x 6 merged
    tokens: the kept tokens of each window, in window order, the empty windows dropped."""
    rt = load("tiny:qwen2.5-vl", seed=1)
    visual = rt.model.model.visual
    grid = [[1, 8, 12]]
    # merged grid 4 x 6, windows (2 x 2) in raster order: w0 = {0, 1, 6, 7}, w1 = {2, 3, 8, 9}, w2 = {4, 5, 10, 11},
    # w3 = {12, 13, 18, 19}, w4 = {14, 15, 20, 21}, w5 = {16, 17, 22, 23}
    kept = torch.tensor([0, 7, 9, 12, 13, 18, 23])  # w0: 0, 7; w1: 9; w2: none; w3: 12, 13, 18; w4: none; w5: 23
    rows, kw, bounds, reverse = kept_tower_inputs(visual, grid, kept, "cpu")
    assert rows.tolist() == [4 * m + j for m in kept.tolist() for j in range(4)]
    # the kept tokens' places among the kept (0..6) in window order: w0 0, 1; w1 2; w3 3, 4, 5; w5 6
    assert kw["window_index"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert kw["cu_window_seqlens"].tolist() == [0, 8, 12, 24, 28]
    assert kw["max_window_seqlen"] == 12
    assert kw["cu_seqlens"].tolist() == [0, 28] and bounds == [0, 28]
    # a permuted case: keep 2 (w1) and 6 (w0): window order is 6, 2, i.e. the kept places 1, 0
    _, kw, _, reverse = kept_tower_inputs(visual, grid, torch.tensor([2, 6]), "cpu")
    assert kw["window_index"].tolist() == [1, 0] and reverse.tolist() == [1, 0]
    assert kw["cu_window_seqlens"].tolist() == [0, 4, 8]
    # each patch's rotary (h, w) is its own: merged token 23 = row 3, col 5 -> patches (6..7, 10..11)
    _, kw, _, _ = kept_tower_inputs(visual, grid, torch.tensor([23]), "cpu")
    assert kw["position_ids"].tolist() == [[6, 10], [6, 11], [7, 10], [7, 11]]
    # the window tower runs and gives one row per kept token
    inputs = rt.processor(QUESTIONS[:1], [rand_image(0, 112, 168)])
    assert inputs["image_grid_thw"].tolist() == grid
    with torch.no_grad():
        got = encode(rt.model, inputs["pixel_values"], inputs["image_grid_thw"], want_attn=True,
                     kept=kept_tower_inputs(visual, grid, kept, "cpu"))
    assert got.features.shape == (7, rt.model.config.text_config.hidden_size)
    assert got.saliency.shape[1] == 7 and torch.allclose(got.saliency.sum(1), torch.ones(2))


def test_pruned_prefill_is_the_stock_text_model_on_the_kept_tokens():
    rt = load("tiny:qwen3-vl", seed=1)
    model = rt.model
    inputs = rt.processor(QUESTIONS[:1], [flat_image()])
    eng = rt.prune("pixelprune")
    with torch.no_grad():
        out = model.generate(**inputs, **GEN)
    ids = inputs["input_ids"][0]
    vis = (ids == model.config.image_token_id).nonzero().flatten()
    keep = eng.selections[("pixels", 0, 0)]
    keep = keep.keep[:int(keep.count)]
    assert 0 < keep.numel() < vis.numel()
    assert eng.stats.plan.candidates == (vis.numel(),) and eng.stats.plan.segments[0].visual == (keep.numel(),)
    feats, deep = _masked_reference(model, inputs["pixel_values"], inputs["image_grid_thw"].tolist(), keep)
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    first, last = int(vis[0]), int(vis[-1])
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens(ids)
        x = torch.cat([emb[:first], feats, emb[last + 1:]])[None]
        p = torch.cat([pos[:, 0, :first], pos[:, 0, vis[keep]], pos[:, 0, last + 1:]], 1)[:, None]
        at = torch.zeros(1, x.shape[1], dtype=torch.bool)
        at[0, first:first + keep.numel()] = True
        h = model.model.language_model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
                                       position_ids=p, visual_pos_masks=at,
                                       deepstack_visual_embeds=list(deep.unbind(1))).last_hidden_state
    torch.testing.assert_close(out.logits[0][0], model.lm_head(h[:, -1])[0], rtol=1e-5, atol=1e-5)


def _gen(rt, inputs):
    with torch.no_grad():
        out = rt.model.generate(**inputs, **GEN)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def test_keep_all_is_the_stock_model_and_batch_is_alone(rt):
    inputs = rt.processor(QUESTIONS[:2], [flat_image(), rand_image(1, 100, 70)])
    rt.unprune()
    ref = _gen(rt, inputs)
    rt.prune("pixelprune", threshold=-1.0)  # nothing is similar: every token kept
    got = _gen(rt, inputs)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    eng = rt.prune("test_every_other")
    both = _gen(rt, inputs)
    assert eng.stats.plan.segments[0].visual != eng.stats.plan.candidates
    for b in range(2):  # each prompt alone: the same tokens and logits (fp32)
        one = rt.processor(QUESTIONS[b:b + 1], [[flat_image(), rand_image(1, 100, 70)][b]])
        alone = _gen(rt, one)
        assert torch.equal(alone[0][0], both[0][b])
        torch.testing.assert_close(alone[1][0], both[1][b], rtol=1e-5, atol=1e-5)


def test_refusals():
    llava = load("tiny:llava", seed=1)
    with pytest.raises(ValueError, match="pixelprune does not support llava models .* pre_tower"):
        llava.prune("pixelprune")
    with pytest.raises(ValueError, match="pre-tower stage .* does not run on LLaVA-1.5 models: its tower runs whole"):
        llava.prune("test_every_other")  # a method that names no families: the family record refuses it
    with pytest.raises(ValueError, match="a tolerance"):
        llava.prune("pixelprune", 64)
    fast = load("tiny:qwen3-vl", seed=1, fast=True, fast_max_new_tokens=4, fast_backend="none")
    eng = fast.prune("pixelprune")
    inputs = fast.processor(QUESTIONS[:1], [flat_image()])
    with torch.no_grad():
        fast.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert eng.stats.path == "eager" and "pre-tower stage" in eng.stats.path_reason
    rt = load("tiny:qwen3-vl", seed=1)

    class Merges(EveryOther):
        name = "test_every_other_merges"

        def select_pixels(self, sig):
            return Selection(keep=torch.tensor([0]), targets=torch.tensor([1]), assign=torch.zeros(sig.num_tokens,
                                                                                              dtype=torch.long))

    class Unordered(EveryOther):
        name = "test_every_other_unordered"

        def select_pixels(self, sig):
            return Selection(keep=torch.tensor([2, 0]), allow_duplicates=False)

    for cls, msg in ((Merges, "`keep` only, not targets"), (Unordered, "ascending")):
        rt.prune(cls())
        with pytest.raises(ValueError, match=msg), torch.no_grad():
            rt.model.generate(**inputs, max_new_tokens=1, do_sample=False)


def test_the_documented_outside_method(tmp_path):
    """docs/your-method.md's pre-tower example, printed whole, loaded from its file as a user's method (by path,
    ``VTPRUNE_METHODS``), runs through the engine and keeps exactly the tokens whose pixels vary."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = repo / "docs/examples/pretower/flatskip.py"
    page = (repo / "docs/your-method.md").read_text()
    assert path.read_text() in page.replace("\\\\\n", "\\\n")
    spec = importlib.util.spec_from_file_location("flatskip_doc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # registers "flatskip" (for this test only: later tests enumerate every method)
    try:
        _run_flatskip(path, tmp_path)
    finally:
        from llava import method

        method._REGISTRY.pop("flatskip", None)


def _run_flatskip(path, tmp_path):
    import os
    import subprocess
    import sys

    rt = load("tiny:qwen2-vl", seed=1)
    inputs = rt.processor(QUESTIONS[:1], [flat_image()])
    eng = rt.prune("flatskip")
    with torch.no_grad():
        rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    from llava.families.qwen_kept import token_pixels

    vc = rt.model.config.vision_config
    (sig,) = token_pixels(inputs["pixel_values"], inputs["image_grid_thw"].tolist(), vc.patch_size,
                          vc.temporal_patch_size, 2, rt.engine.adapter.pixel_norm)
    busy = sig.pixels.std(-1) > 1e-3
    busy[0] = True
    assert 1 < int(busy.sum()) < sig.num_tokens  # the flat image has flat and busy tokens
    assert eng.stats.plan.segments[0].visual == (int(busy.sum()),)
    env = dict(os.environ, VTPRUNE_METHODS=str(path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "llava.cli", "ask", "--model", "tiny:qwen2-vl", "--question",
                          "what is this?", "--method", "flatskip"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "visual tokens:" in out.stdout


def test_the_device_check_reads_pre_tower_selections():
    """llava.check's device placement wraps select_pixels too: a keep made on the host is found."""
    from llava.check.guarantees import GuaranteeError, check_device_placement

    class HostBorn(EveryOther):
        name = "test_every_other_host_born"

        def select_pixels(self, sig):
            return Selection(keep=torch.arange(0, sig.num_tokens, 2))  # no device: the host's

    rt = load("tiny:qwen2-vl", seed=1)
    assert " pre-tower selections" in check_device_placement(rt, EveryOther())  # 3 images, twice
    with pytest.raises(GuaranteeError, match="select_pixels"):
        check_device_placement(rt, HostBorn())

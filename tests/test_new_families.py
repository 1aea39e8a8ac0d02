"""Qwen2.5-VL and LLaVA-OneVision through the family adapters: what the generic suites
(test_engine, test_gpu_ready, test_device_placement, all parametrised over these families too) do not
cover. Every registered method: cached generation == no-cache recompute; the M-RoPE position
convention; rebuilt token types; videos; FastV's schedule; the family options; refusals."""

import pytest
import torch
from conftest import NEW_FAMILIES, QUESTIONS, greedy_no_cache, rand_image
from test_gpu_ready import METHODS, budget

from llava.check.budgets import PRUNES_RANDOM_IMAGES
from llava.engine import attach
from llava.method import Method
from llava.selection import Selection

NEW = pytest.mark.parametrize("rt", NEW_FAMILIES, indirect=True)
GEN = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)


def batch(rt):
    """Three prompts, three image sizes (Qwen: 6 / 6 / 15 merged tokens; OneVision: different crops)."""
    return rt.processor(QUESTIONS, [rand_image(i, *s) for i, s in enumerate([(60, 90), (100, 70), (90, 150)])])


@NEW
@pytest.mark.parametrize("method", METHODS)
def test_every_method_cached_generation_equals_no_cache_recompute(rt, method):
    inputs = batch(rt)
    eng = rt.prune(method, budget(method, rt.family), **({"seed": 5} if method == "random" else {}),
                   **PRUNES_RANDOM_IMAGES.get(method, {}))
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    if method != "none":
        assert any(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples), "nothing pruned"
    eng.replay = True  # query-aware methods keep the same set while the recompute sees generated tokens
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


@NEW
def test_fastv_schedule_per_layer(rt):
    """Default FastV (R = 0.5; the tiny 4-layer models scale K to 1): N tokens in layer 0, N // 2 after."""
    eng = rt.prune("fastv")
    with torch.no_grad():
        rt.model(**batch(rt))
    got = [s.visual_per_layer for s in eng.stats.samples]
    assert got == [[s.visual_candidates] + [s.visual_candidates // 2] * 3 for s in eng.stats.samples]
    if rt.family in ("qwen2_5_vl", "qwen3_vl", "qwen3_5"):  # one merged token per 2x2 patches of each image's own grid
        grids = batch(rt)["image_grid_thw"]
        assert [s.visual_candidates for s in eng.stats.samples] == (grids.prod(-1) // 4).tolist()


def _lm_inputs(rt, inputs):
    """What the engine hands the language model (captured by a pre-hook)."""
    cap = {}
    h = rt.model.model.language_model.register_forward_pre_hook(lambda m, a, kw: cap.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    finally:
        h.remove()
    return cap


@pytest.mark.parametrize("rt", ["qwen2.5-vl", "qwen3-vl"], indirect=True)
def test_qwen_kept_tokens_keep_their_3d_positions_and_text_keeps_its_own(rt):
    inputs = batch(rt)
    model = rt.model
    stock_pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    eng = rt.prune("random", 2, seed=7)
    cap = _lm_inputs(rt, inputs)
    pos, mask = cap["position_ids"], cap["attention_mask"]
    assert pos.shape[0] == 3  # three M-RoPE rows, no text row (the explicit mask decides)
    img = model.config.image_token_id
    for b in range(3):
        real = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][real]
        orig = stock_pos[:, b][:, real]  # (3, n) positions of the unpruned prompt
        vis = torch.nonzero(ids == img).flatten()
        keep = eng.selections[("vision", b)].keep
        first, last = int(vis[0]), int(vis[-1])
        expect = torch.cat([orig[:, :first], orig[:, vis[keep]], orig[:, last + 1:]], 1)
        got = pos[:, b][:, mask[b].bool()]
        assert torch.equal(got, expect)
        # the text after the image continues after the whole image's extent, as in the stock model
        assert int(got[0, first + keep.numel()]) == int(orig[:, vis].max()) + 1
    assert eng.stats.samples[0].visual_per_layer == [2] * 4


@pytest.mark.parametrize("rt", ["qwen2.5-vl", "qwen3-vl"], indirect=True)
def test_qwen_token_types_are_rebuilt_when_missing(rt):
    """Without mm_token_type_ids transformers silently falls back to 1-D positions; the engine rebuilds them."""
    inputs = batch(rt)
    rt.prune("visionzip", 2)
    with torch.no_grad():
        ref = rt.model(**inputs).logits
        bare = rt.model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert torch.equal(ref, bare)


def _qwen_video(rt, t=2, h=8, w=8, seed=0):
    cfg = rt.model.config
    tok = rt.tokenizer
    n = t * h * w // 4
    text = tok("what happens in the video?", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id] + text])
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == cfg.video_token_id).int() * 2,
            "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g),
            "video_grid_thw": torch.tensor([[t, h, w]]), "second_per_grid_ts": torch.tensor([1.0])}


def _ov_video(rt, frames=2, seed=0):
    cfg = rt.model.config
    tok = rt.tokenizer
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 4 -> pooled 2x2 per frame
    n = frames * ((side + 1) // 2) ** 2 + 1
    text = tok("what happens in the video?", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[cfg.video_token_id] * n + text])
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(1, frames, 3, size, size, generator=g)}


@pytest.mark.parametrize("rt", ["qwen2.5-vl", "llava-onevision"], indirect=True)  # Qwen3-VL: tests/test_qwen3_vl.py
@pytest.mark.parametrize("method", ["none", "visionzip", "fastv", "divprune"])
def test_video_keep_all_is_stock_and_pruned_video_decodes_consistently(rt, method):
    inputs = _qwen_video(rt) if rt.family == "qwen2_5_vl" else _ov_video(rt)
    rt.unprune()
    with torch.no_grad():
        stock = rt.model(**inputs).logits
        stock_gen = rt.model.generate(**inputs, **GEN)
    per_unit = 4 if rt.family == "qwen2_5_vl" else 2  # per temporal slice (16 tokens) / per frame (4 tokens)
    b = {"none": None, "visionzip": per_unit, "fastv": 8, "divprune": per_unit}[method]
    eng = rt.prune(method, b)
    with torch.no_grad():
        logits = rt.model(**inputs).logits
        gen = rt.model.generate(**inputs, **GEN)
    s = eng.stats.samples[0]
    if method == "none":
        assert torch.equal(logits, stock) and torch.equal(gen, stock_gen)
        assert s.visual_candidates == (32 if rt.family == "qwen2_5_vl" else 9)
        return
    assert min(s.visual_per_layer) < s.visual_candidates  # it pruned
    eng.replay = True
    assert torch.equal(gen, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


class _Spy(Method):
    name = "saliency_spy"
    vision_stage = True
    needs_vision_attention = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append(sig.cls_attn.clone())
        return Selection(keep=torch.arange(sig.num_tokens, device=sig.unit.device))


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_qwen_saliency_is_a_named_family_option(rt):
    inputs = batch(rt)
    seen = {}
    for kind in ("received", "pooled_query"):
        spy = _Spy()
        rt.prune(spy, family_options={"qwen_saliency": kind})
        with torch.no_grad():
            rt.model(**inputs)
        seen[kind] = spy.seen
    for a, b in zip(seen["received"], seen["pooled_query"]):
        for s in (a, b):  # one image per sample: a distribution over its merged tokens, per head
            torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[0]), atol=1e-5, rtol=0)
        assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="qwen_saliency must be one of"):
        rt.prune("fastervlm", 2, family_options={"qwen_saliency": "cls"})


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_sparsevlm_v2_rope_gravity_is_refused_on_mrope(rt):
    rt.prune("sparsevlm", 64, version="v2")
    with pytest.raises(ValueError, match="M-RoPE"), torch.no_grad():
        rt.model(**batch(rt))


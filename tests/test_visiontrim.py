"""VisionTrim: hand-worked examples of every piece (budget split, received term, DVTS score, LTAM, adaptive
weighting, TGVC selection and merge), the whole selection on a small unit, options, and the engine on the
three tiny CLIP families (NeXT's tokens per crop, LLM rows = projector(values), the CLIP route). Keep-all, tokens
per unit, cached generation = recompute, batch == alone, the refusal of other families: tests/test_method_guarantees.py."""

import math

import pytest
import torch
from conftest import llm_visual_rows, make_batch

import baselines.visiontrim  # noqa: F401  (registers "visiontrim")
from baselines.visiontrim import (VisionTrim, combine_adaptive, dvts_code_score, local_affinity,
                                  received_from_patches, split_budget, tgvc, visiontrim, visiontrim_units)
from llava.method import Method, get_method

CLIP3 = ["llava", "llava-next", "video-llava"]
ALL = pytest.mark.parametrize("rt", CLIP3, indirect=True)


# ------------------------------------------------------------------ pieces, by hand


def test_split_budget():
    assert split_budget(64) == (48, 16)  # the official loader default
    assert split_budget(128) == (96, 32) and split_budget(192) == (144, 48)
    assert split_budget(4) == (3, 1) and split_budget(3) == (3, 0)
    assert split_budget(64, 8) == (56, 8) and split_budget(4, 9) == (0, 4)


def test_received_term_by_hand():
    # one head, [CLS] + 2 patches; rows = queries. Patch columns: the patch queries give 0.2 + 0.3 to patch 1
    # (0.3 its own) and 0.6 + 0.4 to patch 2 (0.4 its own); [CLS] gives them 0.5 / 0.3.
    A = torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    recv, cls_row = A.mean(0)[None, 1:], A[0][None, 1:]
    r = received_from_patches(recv, cls_row, 3)  # (3 recv - cls) / (3 - 2): patch rows, diagonal included
    torch.testing.assert_close(r, torch.tensor([0.2 + 0.3, 0.6 + 0.4]))
    torch.testing.assert_close(received_from_patches(recv, cls_row, 3, "all"), A.mean(0)[1:])


def test_dvts_score_by_hand():
    m = dvts_code_score(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(m, torch.tensor([[0.5 * 0.6 + 0.5, 0.5 * 0.8]]))
    m = dvts_code_score(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), alpha=1.0)
    torch.testing.assert_close(m, torch.tensor([[0.6, 0.8]]))


def test_local_affinity_by_hand():
    # a 1 x 3 grid, one feature: f = 0, 1, 3; var(F) = 7/3, var(P) = var(0,0,0,0,1,2) = 0.7 (unbiased)
    f = torch.tensor([[[0.0], [1.0], [3.0]]])
    kp = 0.5 * 1 / 0.7  # w3 * |dpos|^2 / var(P) for a horizontal neighbour
    k01, k12 = 1 / (7 / 3) + kp, 4 / (7 / 3) + kp
    want = torch.softmax(torch.tensor([-k01, -k01 - k12, -k12]) / 9, dim=0)
    torch.testing.assert_close(local_affinity(f, 1, 3), want[None])
    with pytest.raises(ValueError, match="grid"):
        local_affinity(f, 2, 2)


def test_combine_adaptive_by_hand():
    # softmax(a) = (.25, .75), variance .125; a flat local term has variance 0 and takes all the weight
    out = combine_adaptive(torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))
    out = combine_adaptive(torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))


def tgvc_example():
    # text t = (1, 0); comparison rows e0 = (1, 0) s = 1, e1 = (0, 1) s = 0, e2 = (.6, .8) s = .6, e3 = (.8, -.6) s = .8
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]]])
    v = torch.arange(1.0, 5.0)[None, :, None].expand(1, 4, 3)  # vision rows 1, 2, 3, 4
    return v, e, torch.tensor([[1.0, 0.0]])


def test_tgvc_by_hand():
    v, e, t = tgvc_example()
    # C = 2: targets e0, e3; metric(h, c) = e_h[0] * c^[0]. Round 1: h = e1 scores 0 for both (first slot),
    # h = e2: .6 * 1 > .6 * .8 -> slot 0; target 0 moves to (1.3, .9), c^[0] = .822 > .8: round 2 the same;
    # target 0 moves to (1.6, 1.8), c^[0] = .664 < .8: round 3 e2 joins target 3.
    tgt, tv = tgvc(v, e, t, None, 2, vtc_times=3)
    assert tgt.tolist() == [[0, 3]]
    torch.testing.assert_close(tv[0, :, 0], torch.tensor([1 + 2.5 + 2.5 + 2, 4 + 3.0]))
    tgt, tv = tgvc(v, e, t, None, 2, vtc_times=1)
    torch.testing.assert_close(tv[0, :, 0], torch.tensor([1 + 2.5, 4.0]))
    # C = 1: the target e0, all others merged into it each round
    tgt, tv = tgvc(v, e, t, None, 1, vtc_times=3)
    assert tgt.tolist() == [[0]] and tv[0, 0, 0].item() == 1 + 3 * 3.0
    # a masked text row does not count: with t2 = (0, 1) masked the same; unmasked, e1 (s = .5) becomes a target
    t2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert tgvc(v, e, t2, torch.tensor([True, False]), 2)[0].tolist() == [[0, 3]]
    assert tgvc(v, e, t2, None, 2)[0].tolist() == [[0, 2]]  # s = .5, .5, .7, .1: e2, then e0 (lower index)


def test_tgvc_embed_fn_recomputes_the_targets():
    """A linear embed_fn (the CLIP route) gives the same targets' rows as the linear update (the llm route)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 20, 6, generator=g)
    W = torch.randn(4, 6, generator=g)
    t = torch.randn(3, 4, generator=g)
    a = tgvc(v, v @ W.T, t, None, 5, embed_fn=lambda x: x @ W.T)
    b = tgvc(v, v @ W.T, t, None, 5)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_whole_selection_by_hand():
    """One unit of 6 patches, budget 4 = 3 + 1. a (= r) ranks patches 5, 4, 3 first; among 0, 1, 2 the text
    picks 1; 0 and 2 merge into it three times: v1 + 3 * mean(v0, v2) = 10 + 3 * 10."""
    H = 1
    cls_attn = torch.tensor([[0.0, 0.1, 0.0, 0.5, 0.6, 0.7]]).expand(H, 6)
    recv = cls_attn * 6 / 7  # r = (7 recv - cls) / 5 = cls: m = cls / |cls|
    vf = torch.arange(6.0)[:, None].expand(6, 2) * 10
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    sel = visiontrim(cls_attn, recv, vf, emb, torch.tensor([[1.0, 0.0]]), None, torch.zeros(6, dtype=torch.long),
                     torch.arange(6), 4)
    assert sel.keep.tolist() == [3, 4, 5] and sel.targets.tolist() == [1] and sel.order is None
    assert (sel.assign == -1).all() and sel.space == "vision"
    torch.testing.assert_close(sel.values[:, 0], torch.tensor([30.0, 40.0, 50.0, 10 + 3 * 10.0]))
    # tgvc_tokens = 0: pure DVTS; budget >= tokens: the identity
    sel = visiontrim(cls_attn, recv, vf, emb, torch.tensor([[1.0, 0.0]]), None, torch.zeros(6, dtype=torch.long),
                     torch.arange(6), 4, tgvc_tokens=0)
    assert sel.keep.tolist() == [1, 3, 4, 5] and sel.targets is None
    sel = visiontrim(cls_attn, recv, vf, emb, torch.tensor([[1.0, 0.0]]), None, torch.zeros(6, dtype=torch.long),
                     torch.arange(6), 6)
    assert sel.is_identity(6) and sel.values is None


def test_units_cls_keep_and_order():
    """Two frames of [CLS] + 4 patches: budget 3 with cls_token keep ([CLS] + 2 + 0), 2 + 1 (drop), budget 4."""
    unit = torch.tensor([0] * 5 + [1] * 5)
    patch = torch.tensor([-1, 0, 1, 2, 3] * 2)
    g = torch.Generator().manual_seed(1)
    cls_attn, recv = torch.rand(2, 10, generator=g), torch.rand(2, 10, generator=g)
    vf, emb = torch.randn(10, 4, generator=g), torch.randn(10, 3, generator=g)
    text = torch.randn(2, 3, generator=g)
    sel = visiontrim(cls_attn, recv, vf, emb, text, None, unit, patch, 3, cls_token="keep")
    assert sel.num_out == 6 and sel.targets is None
    assert patch[sel.keep].tolist().count(-1) == 2 and sel.keep[0] == 0 and sel.keep[3] == 5
    torch.testing.assert_close(sel.values, vf[sel.keep])
    sel = visiontrim(cls_attn, recv, vf, emb, text, None, unit, patch, 3, tgvc_tokens=1)  # 2 + 1 patches per frame
    assert sel.num_out == 6 and sel.targets.numel() == 2 and (patch[sel.keep] >= 0).all()
    assert sel.order.tolist() == [0, 1, 4, 2, 3, 5]  # per frame: dominant, then its complement
    sel = visiontrim(cls_attn, recv, vf, emb, text, None, unit, patch, 4)  # the 4 patches, [CLS] dropped
    assert sel.keep.tolist() == [1, 2, 3, 4, 6, 7, 8, 9] and sel.targets is None


def test_options():
    assert VisionTrim(64).config()["tgvc_tokens"] is None
    for bad in [dict(tgvc_tokens=65), dict(tgvc_tokens=-1), dict(tgvc_tokens=True), dict(dvts_score="x"),
                dict(alpha=2), dict(received_queries="x"), dict(ltam_window=0), dict(vtc_times=-1), dict(text="x"),
                dict(cls_token="x"), dict(numerics="x"), dict(text="clip")]:
        with pytest.raises(ValueError):
            VisionTrim(64, **bad)
    with pytest.raises(ValueError, match="budget"):
        VisionTrim()
    with pytest.raises(TypeError):
        VisionTrim(64, nope=1)
    m = get_method("visiontrim", 64)
    assert m.capture_refusal() is None
    assert "eager" in VisionTrim(64, numerics="official").capture_refusal()
    assert "eager" in VisionTrim(64, text="clip", clip_model="x", llm_tokenizer=lambda ids: "q").capture_refusal()
    with pytest.raises(ValueError, match="not supported"):
        VisionTrim(64).setup(num_layers=2, num_vision_layers=2, family="qwen2_5_vl")


# ------------------------------------------------------------------ tiny models


def test_tokens_entering_llm_next(runtimes):
    """LLaVA-NeXT: B per crop; the newline tokens are dropped once a crop is pruned (every output is
    projected from vision features)."""
    rt = runtimes["llava-next"]
    try:
        inputs = make_batch(rt)
        spy = Spy(4)
        eng = rt.prune(spy)
        with torch.no_grad():
            rt.model(**inputs)
        for (sig, sel), s in zip(spy.seen, eng.stats.samples):
            assert s.visual_entering_llm == 4 * sig.num_units == sel.num_out
    finally:
        rt.unprune()


class Spy(VisionTrim):
    name = "visiontrim_spy"

    def __init__(self, budget, **opts):
        super().__init__(budget, **opts)
        self.seen = []

    def select_vision(self, sig):
        sel = super().select_vision(sig)
        self.seen.append((sig, sel))
        return sel


@ALL
@pytest.mark.parametrize("opts", [dict(), dict(dvts_score="global_local"), dict(numerics="official")],
                         ids=["default", "global_local", "official"])
def test_llm_rows_are_the_projected_values(rt, opts):
    inputs = make_batch(rt)
    spy = Spy(4, **opts)
    rt.prune(spy)
    rows = llm_visual_rows(rt, inputs)
    proj = rt.model.model.multi_modal_projector
    for (sig, sel), got in zip(spy.seen, rows):
        v = sel.values if sel.order is None else sel.values[sel.order]
        with torch.no_grad():
            want = proj(v.to(sig.vision_features.dtype)[None])[0]
        torch.testing.assert_close(got, want.to(got.dtype))
        assert got.shape[0] == 4 * sig.num_units


def test_clip_route_on_tiny_llava(runtimes):
    """text="clip" with a tiny random CLIP model (vision width = the tower's) and stand-in tokenizers: the
    question is decoded, run through the CLIP text tower, and the selection keeps B per image."""
    from transformers import CLIPConfig, CLIPModel

    rt = runtimes["llava"]
    dv = rt.model.config.vision_config.hidden_size
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50, max_position_embeddings=77),
                     vision_config=dict(hidden_size=dv, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14), projection_dim=8)
    torch.manual_seed(0)
    clip = CLIPModel(cfg)
    asked = []

    def llm_tok(ids):
        asked.append(ids)
        return "what is this"

    def clip_tok(text, **kw):
        return {"input_ids": torch.tensor([[1, 5, 6, 7, 2]])}

    try:
        spy = Spy(4, text="clip", clip_model=clip, clip_tokenizer=clip_tok, llm_tokenizer=llm_tok)
        eng = rt.prune(spy)
        inputs = make_batch(rt)
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [4, 4, 4] and len(asked) == 3
        assert all(sel.targets.numel() == 1 for _, sel in spy.seen)
    finally:
        rt.unprune()


def test_reference_mode_computes_in_the_official_models_dtype():
    """numerics="official" computes in ``official_dtype``, the official model's (fp16 under its builder, the
    default; fp32 in a model cast to fp32, what the method passes in an fp32 run): the dominant rows are the
    features in that dtype, the merged rows too."""
    g = torch.Generator().manual_seed(0)
    a, r = torch.rand(1, 12, generator=g), torch.rand(1, 12, generator=g)
    values = torch.randn(1, 12, 5, generator=g) / 3
    embeds, text = torch.randn(1, 12, 4, generator=g), torch.randn(3, 4, generator=g)
    for dt in (torch.float32, torch.float16):
        dom, tgt, dv, tv = visiontrim_units(a, r, values, embeds, text, None, 4, 2, numerics="official",
                                            official_dtype=dt)
        assert torch.equal(dv, values.to(dt).float()[0, dom[0]][None])
        assert torch.equal(tv, tv.to(dt).float())
    default = visiontrim_units(a, r, values, embeds, text, None, 4, 2, numerics="official")
    assert torch.equal(default[2], values.half().float()[0, default[0][0]][None])


def test_clip_route_reference_mode_follows_the_official_text_call(runtimes):
    """text="clip", numerics="official": the question is cut where the official ``truncation=True`` cuts it (the
    CLIP tokenizer's ``model_max_length``), the reference dtype is the run's (the LLM's), and the text tower runs
    in it (a copy cast once when the CLIP model's weights are in another dtype; the model itself untouched)."""
    from transformers import CLIPConfig, CLIPModel

    rt = runtimes["llava"]
    dv = rt.model.config.vision_config.hidden_size
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50, max_position_embeddings=77),
                     vision_config=dict(hidden_size=dv, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14), projection_dim=8)
    torch.manual_seed(0)
    clip = CLIPModel(cfg)

    class ClipTok:
        model_max_length = 5

        def __init__(self):
            self.asked = []

        def __call__(self, text, **kw):
            self.asked.append(kw)
            return {"input_ids": torch.tensor([[1, 5, 6, 7, 2]])}

    tok = ClipTok()
    try:
        spy = Spy(4, text="clip", numerics="official", clip_model=clip, clip_tokenizer=tok,
                  llm_tokenizer=lambda ids: "what is this")
        rt.prune(spy)
        with torch.no_grad():
            rt.model(**make_batch(rt))
        assert [kw["max_length"] for kw in tok.asked] == [5, 5, 5]
        assert all(spy.reference_dtype(sig) == sig.features.dtype for sig, _ in spy.seen)
        half = spy._text_tower(clip, torch.float16)
        assert next(half.parameters()).dtype == torch.float16 and spy._text_tower(clip, torch.float16) is half
        assert next(clip.text_model.parameters()).dtype == torch.float32
        assert spy._text_tower(clip, torch.float32) is clip.text_model
    finally:
        rt.unprune()


def test_is_a_method():
    assert issubclass(VisionTrim, Method) and VisionTrim.families == ("llava", "llava_next", "video_llava")

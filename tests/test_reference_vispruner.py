"""VisPruner reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): Theia-4869/VisPruner at aefa01a
  * ``llava/model/builder.py`` ``load_pretrained_model``: the LLM in fp16 (``torch_dtype``), the vision tower
    cast to fp16 only when ``device_map != 'auto'`` (the eval scripts keep 'auto': the tower runs in fp32);
  * ``llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.forward`` / ``feature_select``: the
    select-layer (-2) features ``.to(images.dtype)`` (fp16, the eval scripts pass fp16 images), the same
    layer's ``attentions[:, :, 0, 1:]`` returned in the tower's dtype (fp32, not cast);
  * ``llava/model/llava_arch.py`` ``encode_images``: T_imp = int(T * ratio); ``mean(dim=1)`` over heads,
    ``argsort(dim=-1, descending=True)`` (unstable); fp16 features divided by their fp16 norm; rounds of
    r = min(8, |R| - T_div): A = R[::2], B = R[1::2], s = max over B of ``a @ b^T`` (fp16), A's survivors
    ``argsort(s, descending=True)[:, r:]`` indexed against ``arange(B)[:, None].expand(-1, |R| // 2 - r)``
    (the two broadcast), R <- survivors ++ B; important ++ R scattered into a boolean index mask.

Compared with ``baselines.vispruner`` on worked examples and random tensors with the official shapes (CLIP
ViT-L/14-336 select layer: 16 heads, 576 patches, 1024-d features; NeXT: 5 crops of 576), fp16 and fp32
inputs, planted duplicate tokens (identical feature rows and [CLS] columns: exact ties in both orderings).
"""

import pytest
import torch
from conftest import FAMILIES

from baselines.vispruner import VisPruner, official_schedule, vispruner

FEATURE_DTYPE = torch.float16  # official select-layer features after .to(images.dtype)
ATTENTION_DTYPE = torch.float32  # official tower attentions (fp32 tower, not cast)


def official_select(image_features, image_attentions, T, ratio):
    """Transcription of ``encode_images``'s index mask: image_features (B, N, C) in the official dtype,
    image_attentions (B, H, N) in the tower's dtype. Returns the kept indices per image / crop."""
    n_img, n_tok, _ = image_features.shape
    t_imp = int(T * ratio)
    t_div = T - t_imp
    ranked = image_attentions.mean(dim=1).argsort(dim=-1, descending=True)
    important, residual = ranked[:, :t_imp], ranked[:, t_imp:]
    unit_rows = image_features / image_features.norm(dim=-1, keepdim=True)
    rows = torch.arange(n_img).unsqueeze(-1)
    while t_div > 0:
        size = residual.shape[1]
        r = min(8, size - t_div)
        if r <= 0:
            break
        toks = unit_rows[rows.expand(-1, size), residual]
        best = (toks[..., ::2, :] @ toks[..., 1::2, :].transpose(-1, -2)).max(dim=-1).values
        survivors = best.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[..., ::2][rows.expand(-1, size // 2 - r), survivors],
                              residual[..., 1::2]], dim=-1)
    chosen = torch.cat([important, residual], dim=-1) if t_div > 0 else important
    mask = torch.zeros(n_img, n_tok, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return [torch.nonzero(m).flatten().tolist() for m in mask]


def official(feats, attn, T, ratio):
    return official_select(feats[None].to(FEATURE_DTYPE), attn[None].to(ATTENTION_DTYPE), T, ratio)[0]


def run(attn, feats, T, ratio, numerics, unit=None, patch=None):
    n = feats.shape[0]
    unit = torch.zeros(n, dtype=torch.long) if unit is None else unit
    patch = torch.arange(n) if patch is None else patch
    return vispruner(attn, feats, unit, patch, T, important_ratio=ratio, numerics=numerics).tolist()


# ------------------------------------------------------------------------------ worked examples


def test_worked_example_attention_ties_follow_the_official_argsort():
    # 24 tokens, head-mean attention [1, 2, 2, 2, 2, 1, 3, 3] x 3: six tokens tie at the top (6, 7, 14, 15, 22,
    # 23). T = 2, ratio 1 (important only): the default mode breaks ties to the lower index -> [6, 7]; the
    # official unstable argsort decides among the six - reference mode calls the same argsort.
    a = torch.tensor([1., 2, 2, 2, 2, 1, 3, 3] * 3)
    attn = torch.stack([a, a]) / 48
    feats = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    off = official(feats, attn, 2, 1.0)
    assert set(off) <= {6, 7, 14, 15, 22, 23} and len(off) == 2
    assert run(attn, feats, 2, 1.0, "official") == off
    assert run(attn, feats, 2, 1.0, "ours") == [6, 7]
    assert off != [6, 7]  # this PyTorch's CPU argsort puts later ties first here


def test_worked_example_odd_residual_official_broadcast_keeps_no_a_token():
    # N = 12, T = 8, ratio .375: T_imp = 3, T_div = 5, |R| = 9, r = min(8, 9 - 5) = 4 = |R| // 2: the
    # official index arange(1)[:, None].expand(-1, 0) broadcasts A's survivors away -> important ++ B
    # = 3 + 4 tokens. Attention order 11, 10, ..., 0: important {11, 10, 9}, R = [8, 7, ..., 0],
    # B = R[1::2] = [7, 5, 3, 1]. Our rule keeps one A token (8 in all).
    attn = torch.arange(1., 13)[None] / 78
    feats = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    assert official_schedule(9, 5) == [(4, 0)]
    assert official(feats, attn, 8, .375) == [1, 3, 5, 7, 9, 10, 11]
    assert run(attn, feats, 8, .375, "official") == [1, 3, 5, 7, 9, 10, 11]
    assert len(run(attn, feats, 8, .375, "ours")) == 8


def test_official_schedule_equals_our_rule_elsewhere():
    # every |R| <= 60 and T_div: the official rounds keep as many A tokens as ours (|A| - r, our r capped
    # at |A|) until the first odd |R| with r = |R| // 2, where the official broadcast keeps no A token
    from baselines.vispruner import removal_schedule

    diverged = 0
    for n in range(1, 61):
        for t_div in range(1, n + 2):
            size = n
            for (r, keep_a), r_ours in zip(official_schedule(n, t_div), removal_schedule(n, t_div)):
                if size % 2 and r == size // 2:
                    assert keep_a == 0 and r_ours == r
                    diverged += 1
                    break
                assert keep_a == (size + 1) // 2 - r_ours and r_ours == min(r, (size + 1) // 2)
                size = keep_a + size // 2
    assert diverged > 0


# ------------------------------------------------------------------------------ random, official shapes


def random_inputs(seed, dtype, n=576, heads=16, dv=1024, dups=64):
    """(heads, n) [CLS] softmax rows and (n, dv) select-layer features; ``dups`` planted duplicate tokens
    (same feature row, same column in every head) and a copy of the top token (a tie at the top)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(heads, n, generator=g) * 1.5
    logits[:, torch.randperm(n, generator=g)[:20]] += 5
    feats = torch.randn(n, dv, generator=g) + 0.5 * torch.randn(dv, generator=g)
    src = torch.randint(0, n, (dups,), generator=g)
    dst = torch.randperm(n, generator=g)[:dups]
    logits[:, dst], feats[dst] = logits[:, src], feats[src]
    top = int(logits.softmax(-1).mean(0).argmax())
    logits[:, 0], feats[0] = logits[:, top], feats[top]
    return logits.softmax(-1).to(dtype), feats.to(dtype)


CASES = [(seed, dtype, T, ratio) for seed in range(2) for dtype in (torch.float16, torch.float32)
         for T, ratio in ((64, .75), (128, .5), (192, .5)) if seed == 0 or T < 192]


@pytest.mark.parametrize("seed,dtype,T,ratio", CASES)
def test_reference_mode_equals_the_official_selection_llava(seed, dtype, T, ratio):
    attn, feats = random_inputs(seed, dtype)
    off = official(feats, attn, T, ratio)
    assert len(off) == T
    assert run(attn, feats, T, ratio, "official") == off


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reference_mode_equals_the_official_selection_next(dtype):
    # NeXT (official 'spatial'): 5 crops of 576 in one encode_images call, T = 32 per crop (ratio .75)
    crops = [random_inputs(20 + b, dtype, dups=32) for b in range(5)]
    attn, feats = torch.cat([c[0] for c in crops], 1), torch.cat([c[1] for c in crops])
    off = official_select(torch.stack([c[1] for c in crops]).to(FEATURE_DTYPE),
                          torch.stack([c[0] for c in crops]).to(ATTENTION_DTYPE), 32, .75)
    unit, patch = torch.arange(5).repeat_interleave(576), torch.arange(576).repeat(5)
    assert run(attn, feats, 32, .75, "official", unit, patch) == [576 * b + i for b in range(5) for i in off[b]]


def test_method_option():
    assert VisPruner(64).numerics == "ours" and VisPruner(64, numerics="official").numerics == "official"
    assert VisPruner(64).config()["numerics"] == "ours"  # recorded like every method's options
    assert VisPruner(64, numerics="official").config()["numerics"] == "official"
    with pytest.raises(ValueError):
        VisPruner(64, numerics="fp16")
    with pytest.raises(ValueError):
        vispruner(torch.rand(2, 8), torch.randn(8, 4), torch.zeros(8, dtype=torch.long), torch.arange(8), 2,
                  numerics="half")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (4,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "vispruner", *ENGINE_ARGS[rt.family], stage="vision")


# ------------------------------------------------------------------------------ the features' dtype = the model's


def test_reference_mode_casts_the_features_to_the_models_dtype(monkeypatch):
    """The official ``clip_encoder.forward`` casts the select-layer features ``.to(images.dtype)``, and its images
    are in the model's dtype (fp16 as its eval scripts run it; the parity harness's fp32 model gets fp32 images, and
    fp16 images would not pass an fp32 projector). Found by parity (``python -m parity llava15 --method vispruner``,
    fp32: 2 of 5 kept sets differed while the reference mode cast to fp16 whatever the model's dtype).

    Worked: 12 patches (3-d features in eighths, exact in fp16), T = 8, ratio .25: T_imp 2 (patches 0, 1),
    R = 2..11, one round with r = 4 of A = (2, 4, 6, 8, 10), one survivor. The A tokens' best similarity to B,
    fp32: 0.84119, 0.44459, 0.88949, 0.51533, 0.44448 -> patch 10 (the least) survives; after the fp16
    normalisation: 0.84082, 0.44434, 0.88867, 0.51562, 0.44482 -> patch 4 survives (no ties either way)."""
    feats = torch.tensor([[1, 8, -3], [3, 1, 1], [2, -4, 4], [-6, 8, -7], [5, -4, 2], [-6, -1, -6], [-7, -7, 5],
                          [-1, 5, -8], [4, 8, -1], [-1, -3, 3], [5, 0, -4], [-7, 5, -6]], dtype=torch.float32) / 8
    attn = torch.tensor([[.5, .4] + [.01] * 10])  # one head; patches 0 and 1 are the important ones
    off32 = official_select(feats[None], attn[None], 8, .25)[0]
    off16 = official_select(feats[None].half(), attn[None], 8, .25)[0]
    assert off32 == [0, 1, 3, 5, 7, 9, 10, 11] and off16 == [0, 1, 3, 4, 5, 7, 9, 11]
    n = feats.shape[0]
    unit_ids, patch_ids = torch.zeros(n, dtype=torch.long), torch.arange(n)

    def ours(**kw):
        return vispruner(attn, feats, unit_ids, patch_ids, 8, important_ratio=.25, numerics="official", **kw).tolist()

    assert ours(feature_dtype=torch.float32) == off32  # the fp32 model
    assert ours(feature_dtype=torch.float16) == off16 == ours()  # the fp16 model (the default of the function)

    # the method passes the LLM's dtype (the projected tokens', sig.features)
    import baselines.vispruner as vp
    from llava.ops import unit_layout

    seen = []
    inner = vp.vispruner
    monkeypatch.setattr(vp, "vispruner", lambda *a, **k: seen.append(k["feature_dtype"]) or inner(*a, **k))

    class Sig:
        features = torch.zeros(n, 8, dtype=torch.float64)
        vision_features, cls_attn, unit, patch = feats, attn, unit_ids, patch_ids

        def unit_layout(self, patch=False):
            return unit_layout(unit_ids, patch_ids)

    keep = VisPruner(8, numerics="official", important_ratio=.25).select_vision(Sig()).keep
    assert seen == [torch.float64] and keep.tolist() == ours(feature_dtype=torch.float64)


# ------------------------------------------------------------------------------ the [CLS] row, as the tower hands it


def _clip_layer(seed=0):
    """transformers 5's ``CLIPEncoderLayer`` (width 64, 4 heads, as the parity NeXT tower), weights from a fixed
    generator, fp32."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    cfg = CLIPVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)
    cfg._attn_implementation = "eager"
    layer = CLIPEncoderLayer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer.eval()


def _official_attentions_row(layer, h):
    """What the official ``feature_select`` reads, ``attentions[i][:, :, 0]``: transformers 4.36's
    ``CLIPAttention`` transcribed (every query row projected, ``q * scale``, one ``bmm`` over all (n * H) maps, the
    softmax), row 0."""
    a = layer.self_attn
    xn = layer.layer_norm1(h)
    n, S, D = xn.shape
    H = a.num_heads
    heads = lambda t: t.view(n, S, H, D // H).transpose(1, 2).reshape(n * H, S, D // H)  # noqa: E731
    w = torch.softmax(torch.bmm(heads(a.q_proj(xn) * a.scale), heads(a.k_proj(xn)).transpose(1, 2)), dim=-1)
    return w.view(n, H, S, S)[:, :, 0]


def _cls_rows_seed11():
    """Row 0 of the official map, our reference-mode [CLS] row and signals, the [CLS]-alone row (the same formula from
    the [CLS] query alone: q_proj of one row, a (1, S) product) and the five crops' features, on 5 crops of 576 +
    [CLS] (seed 11)."""
    from llava.families.clip import _heads, clip_probs, cls_row, cls_signals

    layer = _clip_layer()
    h = torch.randn(5, 577, 64, generator=torch.Generator().manual_seed(11))
    feats = torch.randn(5, 576, 64, generator=torch.Generator().manual_seed(111))
    with torch.no_grad():
        want = _official_attentions_row(layer, h)
        got, got_signals = cls_row(layer, h, "model"), cls_signals(layer, h, "model")[0]
        a, xn = layer.self_attn, layer.layer_norm1(h)
        alone = clip_probs(_heads(a, a.q_proj(xn[:, :1])), _heads(a, a.k_proj(xn)), a.scale, "model")[:, :, 0]
    return want, got, got_signals, alone, feats


def _kept_at_128(row, feats):
    """VisPruner's reference mode (T = 128, r = .5) on the patches' head-mean [CLS] attention of ``row``."""
    from baselines.vispruner import split_budget, vispruner_units

    t_imp, t_div = split_budget(128, 0.5)
    return vispruner_units(row[:, :, 1:].mean(1), feats, t_imp, t_div, numerics="official",
                           feature_dtype=torch.float32)


def test_the_reference_cls_row_is_row_0_of_the_official_map_fp32():
    # parity on NeXT, seed 4 (176x99 image, crop 4) and seed 5: our reference-mode [CLS] row was the same formula
    # from the [CLS] query alone (q_proj of one row, a (1, S) product): other GEMM shapes, other fp32 sums, 1.8e-7
    # off the official row, which reordered near-ties (17 of 128 kept patches differed, logits 4.85 apart). The
    # engine now takes row 0 of the whole map (llava.families.clip.official_cls_row): the official bits and the
    # official kept patches on any CPU (the same products, the same shapes)
    want, got, got_signals, _, feats = _cls_rows_seed11()
    assert got.shape == want.shape == (5, 4, 577)
    assert torch.equal(got, want) and torch.equal(got_signals, want)
    assert torch.equal(_kept_at_128(got, feats), _kept_at_128(want, feats))


def test_where_the_cpu_parts_them_the_cls_alone_row_is_an_fp32_rounding_off_the_official_one():
    # a diagnostic of why the engine takes row 0 of the whole map: whether the (1, S) product of the [CLS] query
    # alone rounds other bits than the whole map's depends on the CPU's kernels, and so does whether those bits
    # reorder a near-tie at VisPruner's cut. Both happen on AMD Zen and on an Intel AVX-512 Xeon; on that Xeon held
    # to PyTorch's and MKL's AVX2 or SSE kernels (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS) the two rows have
    # the same bits, or part and keep the same patches
    want, _, _, alone, feats = _cls_rows_seed11()
    if torch.equal(alone, want):
        pytest.skip("this CPU's GEMM kernels give the [CLS]-alone row and row 0 of the whole map the same bits")
    assert (alone - want).abs().max() < 1e-6  # an fp32 rounding apart
    if torch.equal(_kept_at_128(alone, feats), _kept_at_128(want, feats)):
        pytest.skip("this CPU's rounding of the [CLS]-alone row reorders no near-tie at VisPruner's cut here")

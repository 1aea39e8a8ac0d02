"""AttnMix (AdaV) reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): JiayiV/AdaV (an overlay on Theia-4869/FasterVLM), run with the fp16
LLaVA model of ``llava/model/builder.py`` ``load_pretrained_model`` (``torch_dtype=torch.float16``; the CLIP
tower stays fp32 with the default ``device_map='auto'``):
  * ``llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.forward`` / ``feature_select``: the
    select layer's [CLS] -> patch attentions per head, returned ``.to(images.dtype)`` (fp16);
  * ``llava/model/llava_arch.py`` ``encode_images``: ``image_attentions.mean(dim=1)`` (fp16 head mean), the
    projector on the fp16 features; ``prepare_inputs_labels_for_multimodal`` (index masks forced to all-ones
    for LLaVA-NeXT, ``mm_patch_merge_type = 'spatial'``: base crop, then the grid crops row-major on the
    full grid);
  * ``llava/model/language_model/llava_llama.py`` ``LlavaLlamaForCausalLM.generate``, method "adav":
    ``F.normalize`` of the fp16 text / image embeddings, ``matmul``, ``(simi * 100).softmax(-1).max(1)[0]``
    (fp16), ``torch.topk(simi, 2 k N_img)``, per-crop ``torch.topk(cls_attn, 2 k)`` with the ``+ i`` crop
    offset, the guaranteed ``int(2 k N_img * 0.25)`` of each list, ``max_sqrt_sum_with_indices`` (fp32 copies,
    ``torch.sort(descending=True)``, prefix sums, ``argmax`` of the products), ``cat`` and ``sort`` (duplicates
    kept).

The released behaviour is reference mode plus the two compatibility options ``crop_offset_bug=True`` and
``allow_duplicates=True``; it is compared with the transcription on worked examples and random signals with
the official shapes (D = 4096, 40 text tokens; LLaVA-1.5: 576 patches, 16 heads, B = 64 / 128 / 192;
LLaVA-NeXT: base + 2 x 2 grid crops of 576, B = 720 / 288 / 144), fp32 and fp16 signals, with planted
duplicate image tokens (identical features and [CLS] columns: exact ties in both scores), duplicate text
tokens and a heavy [CLS] tail (many fp16 ties); half of the cases draw the image tokens from T / 4 distinct
vectors shared by all crops, which puts exact ties on the cut that decides the text picks (checked) and
across grid crops, where the official LLM-input order decides the tie.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from attnmix.attnmix import AttnMix, official_text_to_image_score
from llava.ops import text_to_image_score
from llava.signals import VisionSignals

F16 = torch.float16
D, NT, HEADS, P, G = 4096, 40, 16, 576, 24

# ------------------------------------------------------------------------------ transcription


def official_max_sqrt_sum(l1, l2, K):
    """``max_sqrt_sum_with_indices``: positions in l1 / l2 of the chosen split."""
    l1, l2 = l1.to(torch.float32), l2.to(torch.float32)
    s1, i1 = torch.sort(l1, descending=True)
    s2, i2 = torch.sort(l2, descending=True)
    p1 = torch.cat((torch.tensor([0.0]), torch.cumsum(s1, dim=0)))
    p2 = torch.cat((torch.tensor([0.0]), torch.cumsum(s2, dim=0)))
    k1 = torch.arange(min(K, len(l1)) + 1)
    k2 = K - k1
    ok = (k2 >= 0) & (k2 <= len(l2))
    best = torch.argmax(p1[k1[ok]] * p2[k2[ok]])
    b1, b2 = k1[ok][best].item(), k2[ok][best].item()
    return i1[:b1].tolist(), i2[:b2].tolist()


def official_adav(image_tokens, text_tokens, cls_heads, overall_tokens, budget_thres=0.25, with_text_count=False):
    """The "adav" block on image_tokens (1, 576 N, D) (LLM-input order) and text_tokens (1, Tt, D) in the model's
    dtype (fp16 under the official builder) and the per-head [CLS] rows of each crop (N, H, 576) in the tower's
    dtype. Returns the kept image-token positions (sorted, duplicates kept) and, with ``with_text_count``, how
    many the text list gives."""
    cls_attn = cls_heads.to(image_tokens.dtype).mean(dim=1)  # feature_select's .to(images.dtype), encode_images' mean
    n_img = cls_attn.shape[0]
    k = int(int(overall_tokens / 2) / n_img)
    v_token_num = k * 2 * n_img
    simi = torch.matmul(F.normalize(text_tokens, p=2, dim=-1), F.normalize(image_tokens, p=2, dim=-1).permute(0, 2, 1))
    simi = (simi * 100).softmax(-1).max(1)[0]
    value, indices = torch.topk(simi, k=k * n_img * 2, dim=-1)
    value_cls, indices_cls = torch.topk(cls_attn, k=k * 2, dim=-1)
    value_cls = value_cls.reshape(1, -1)
    indices_cls = (indices_cls + torch.arange(n_img)[:, None]).view(1, -1)  # the released + i
    n0 = int(2 * (k * n_img) * budget_thres)
    si, ci = official_max_sqrt_sum(value[0][n0:], value_cls[0][n0:], v_token_num - 2 * n0)
    si = list(range(n0)) + [s + n0 for s in si]
    ci = list(range(n0)) + [c + n0 for c in ci]
    kept = torch.sort(torch.cat([indices[0, si], indices_cls[0, ci]]))[0].tolist()
    return (kept, len(si)) if with_text_count else kept


# ------------------------------------------------------------------------------ random signals


def cls_rows(g, n, dups_src, dups_dst, group=None):
    """(HEADS, n) softmax rows with a heavy tail and a few dominant tokens; duplicate columns planted
    (``group``: column j takes the logits of column group[j])."""
    logits = torch.randn(HEADS, n, generator=g) * 1.5
    logits[:, torch.randperm(n, generator=g)[:20]] += 6
    logits[:, dups_dst] = logits[:, dups_src]
    if group is not None:
        logits = logits[:, group]
    return logits.softmax(-1)


def make_case(seed, n_img, budget, pooled=False, dups=40):
    """Our flat block (crop-major, each crop in patch order) and the official LLM-input order. ``pooled``:
    the image tokens are drawn from T / 4 distinct vectors shared by all crops (each token has about three
    exact twins, also across crops; twins in a crop share their [CLS] column), so that ties sit at most
    cuts."""
    g = torch.Generator().manual_seed(seed)
    T = n_img * P
    feats = torch.randn(T, D, generator=g) + torch.randn(1, D, generator=g)
    group = torch.randperm(T, generator=g) % (T // 4) if pooled else None
    if pooled:
        feats = feats[group]
    text = torch.randn(NT, D, generator=g) * 0.02
    text[:8] += feats[torch.randperm(T, generator=g)[:8]] * 0.02  # a few text tokens close to image tokens
    text[torch.randperm(NT, generator=g)[:4]] = text[torch.randint(0, NT, (4,), generator=g)]
    heads = []
    for u in range(n_img):
        src, dst = torch.randint(0, P, (dups,), generator=g), torch.randperm(P, generator=g)[:dups]
        if pooled:  # twins within the crop share a column
            gu = group[u * P:(u + 1) * P]
            first = {}
            col = torch.tensor([first.setdefault(int(x), j) for j, x in enumerate(gu)])
            heads.append(cls_rows(g, P, src[:0], dst[:0], col))
        else:
            heads.append(cls_rows(g, P, src, dst))
            feats[u * P + dst] = feats[u * P + src]  # duplicate tokens: same features, same [CLS] column
    unit = torch.arange(n_img).repeat_interleave(P)
    patch = torch.arange(P).repeat(n_img)
    if n_img == 1:
        unit_pos, official_pos = torch.full((1, 2), -1), torch.arange(T)
    else:  # base crop + 2 x 2 grid crops (row-major); official: base, then the grid row-major on 48 x 48
        unit_pos = torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1]])
        official_pos = torch.arange(T)
        for u in range(1, n_img):
            r, c = unit_pos[u].tolist()
            p = torch.arange(P)
            official_pos[u * P:(u + 1) * P] = P + (r * G + p // G) * (2 * G) + c * G + p % G
    case = dict(feats=feats, text=text, heads=heads, unit=unit, patch=patch, unit_pos=unit_pos,
                official_pos=official_pos, n_img=n_img)
    return finish(case)


def finish(case):
    case["cls"] = torch.cat(case["heads"], 1)
    case["heads_t"] = torch.stack(case["heads"])
    return case


def tie_at_text_cut(case, budget):
    """Whether an exact tie in the official s straddles the last text pick (ranks n_t and n_t + 1)."""
    s = official_text_to_image_score(case["text"], case["feats"]).float().sort(descending=True).values
    n_t = official(case, budget, F16, with_text_count=True)[1]
    return bool(s[n_t - 1] == s[n_t])


def signals(case, dtype):
    n = case["unit"].numel()
    return VisionSignals(features=case["feats"].to(dtype), vision_features=torch.zeros(n, 1), unit=case["unit"],
                         patch=case["patch"], unit_kind="image" if case["n_img"] == 1 else "crop", grid=(G, G),
                         text_embeds=case["text"].to(dtype), question_mask=torch.ones(NT, dtype=torch.bool),
                         cls_attn=case["cls"].to(dtype), unit_pos=case["unit_pos"])


def official(case, budget, dtype, with_text_count=False):
    """The transcription on the official inputs of a model in ``dtype`` (the run's: fp16 under the official
    builder, fp32 in an fp32 run), mapped back to our flat indices (sorted, duplicates kept)."""
    inv = torch.empty_like(case["official_pos"])
    inv[case["official_pos"]] = torch.arange(inv.numel())
    image = torch.empty_like(case["feats"])
    image[case["official_pos"]] = case["feats"]
    kept, n_t = official_adav(image.to(dtype)[None], case["text"].to(dtype)[None],
                              case["heads_t"].to(dtype), budget, with_text_count=True)
    kept = sorted(inv[kept].tolist())
    return (kept, n_t) if with_text_count else kept


def ours(case, budget, dtype, numerics, released=True):
    m = AttnMix(budget, numerics=numerics, crop_offset_bug=released, allow_duplicates=released)
    return m.select_vision(signals(case, dtype)).keep.tolist()


CASES = [(seed, dtype, n_img, budget, pooled) for seed in range(3) for dtype in (torch.float32, torch.float16)
         for n_img, budget in ((1, 64), (1, 128), (1, 192), (5, 720), (5, 288), (5, 144)) for pooled in (False, True)]


@pytest.mark.parametrize("seed,dtype,n_img,budget,pooled", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, n_img, budget, pooled):
    case = make_case(seed, n_img, budget, pooled)
    off = official(case, budget, dtype)
    assert ours(case, budget, dtype, "official") == off
    # the corrected options (no crop offset, no duplicates) in reference mode: every token the released
    # code keeps (LLaVA-1.5: the offset is 0) is kept, and V_b distinct tokens in all
    if n_img == 1:
        corrected = ours(case, budget, dtype, "official", released=False)
        assert set(off) <= set(corrected) and len(set(corrected)) == len(corrected) == len(off)


def test_pooled_cases_have_ties_at_the_text_cut():
    # the pooled cases above are meant to put exact ties on the cut that decides the text picks
    ties = [tie_at_text_cut(make_case(seed, n, b, pooled=True), b)
            for seed in range(3) for n, b in ((1, 64), (1, 192), (5, 288), (5, 144))]
    assert sum(ties) >= 6, ties


# ------------------------------------------------------------------------------ worked examples


def test_worked_example_fp16_similarity():
    # 1 text token t = e0, 3 unit-norm image tokens with cosines .5, .50001, .2 to it. fp32: x100 -> logits
    # 50, 50.001, 20 -> s = [.49975, .50025, ~0]: token 1 ranks first. fp16: .5 and .50001 round to the
    # same .5 (ulp 2^-11) and the two rows become identical -> s = [.5, .5, 0] exactly, a tie that
    # torch.topk resolves in its own order; the reference score is bit-identical to the transcription's
    t = torch.tensor([[1.0, 0.0, 0.0]])
    c = torch.tensor([.5, .50001, .2])
    v = torch.stack([c, (1 - c ** 2).sqrt(), torch.zeros(3)], 1)
    s32 = text_to_image_score(t, v)
    assert s32[1] > s32[0] > 0.49 and float(s32[2]) < 1e-12
    s16 = official_text_to_image_score(t, v)
    assert s16.dtype == F16 and s16.tolist() == [.5, .5, 0.0]
    ref = (torch.matmul(F.normalize(t.half()[None], dim=-1), F.normalize(v.half()[None], dim=-1).permute(0, 2, 1))
           * 100).softmax(-1).max(1)[0][0]
    assert torch.equal(s16, ref)


def test_worked_example_selection():
    # 8 tokens, one image, B = 4: k = 2, V_b = 4, n0 = 1, K = 2 (fp16 scores)
    #   s = [.1, .4, .4, .05, .3, .3, .2, 0]: L_t = top-4 = {1, 2} (.4, tied), then {4, 5} (.3, tied)
    #   a = [.3, .1, .05, .3, .2, 0, .25, .1]: L_c = {0, 3} (.3, tied), 6 (.25), 4 (.2)
    #   guaranteed: L_t[0] and L_c[0]; split of K = 2 over u = [.4, .3, .3], w = [.3, .25, .2]:
    #   k1 = 0: 0; k1 = 1: .4 * .3 = .12; k1 = 2: 0 -> one more of each: the other .4 token and the other
    #   .3 token -> {0, 1, 2, 3} whatever order topk gives the tied pairs; the transcription agrees
    from attnmix.attnmix import adav_select

    s = torch.tensor([.1, .4, .4, .05, .3, .3, .2, 0], dtype=F16)
    a = torch.tensor([.3, .1, .05, .3, .2, 0, .25, .1], dtype=F16)
    kw = dict(crop_offset_bug=True, allow_duplicates=True, numerics="official")
    assert adav_select(s, a, [torch.arange(8)], 4, **kw).tolist() == [0, 1, 2, 3]
    value, indices = torch.topk(s[None], 4)
    value_cls, indices_cls = torch.topk(a[None], 4)
    si, ci = official_max_sqrt_sum(value[0][1:], value_cls[0][1:], 2)
    assert (len(si), len(ci)) == (1, 1)
    off = torch.cat([indices[0, [0] + [x + 1 for x in si]], indices_cls[0, [0] + [x + 1 for x in ci]]]).sort()[0]
    assert off.tolist() == [0, 1, 2, 3]


def test_reference_mode_computes_in_the_models_dtype():
    """The official s and a are in its model's dtype: fp32 in an fp32 run. On the worked example above (cosines
    .5 / .50001, equal in fp16) the fp32 run ranks token 1 first, as the official code in fp32; the fp16 run
    ties. The method passes its LLM's dtype (``sig.features``); it cast to fp16 always. Fails without the fix."""
    t = torch.tensor([[1.0, 0.0, 0.0]])
    c = torch.tensor([.5, .50001, .2])
    v = torch.stack([c, (1 - c ** 2).sqrt(), torch.zeros(3)], 1)
    s32 = official_text_to_image_score(t, v, dtype=torch.float32)
    ref = (torch.matmul(F.normalize(t[None], dim=-1), F.normalize(v[None], dim=-1).permute(0, 2, 1))
           * 100).softmax(-1).max(1)[0][0]
    assert s32.dtype == torch.float32 and torch.equal(s32, ref) and s32[1] > s32[0]
    assert official_text_to_image_score(t, v, dtype=F16).tolist() == [.5, .5, 0.0]
    # the method: 8 patches, the text close to patch 0 (.50001) and patch 1 (.5), the [CLS] rows flat but for
    # patches 6 and 7; B = 2: k = 1, V_b = 2, n0 = 0, the split of K = 2 by the prefix-sum product: one text pick
    # and one [CLS] pick. fp32: the text's first pick is patch 0. fp16: patches 0 and 1 tie and torch.topk picks
    # one of them in its own order (patch 1 on this project's CPUs, as the fp32 run with the fp16 cast did)
    feats = torch.zeros(8, 3)
    feats[:3] = v[[1, 0, 2]]
    feats[3:, 2] = 1.0  # orthogonal to the text
    cls = torch.full((2, 8), 0.1)
    cls[:, 6:] = 0.2

    def keep(dtype):
        sig = VisionSignals(features=feats.to(dtype), vision_features=torch.zeros(8, 1),
                            unit=torch.zeros(8, dtype=torch.long), patch=torch.arange(8), unit_kind="image",
                            grid=(1, 8), text_embeds=t.to(dtype), question_mask=torch.ones(1, dtype=torch.bool),
                            cls_attn=cls.to(dtype), unit_pos=torch.full((1, 2), -1))
        return AttnMix(2, numerics="official").select_vision(sig).keep.tolist()

    kept32, kept16 = keep(torch.float32), keep(F16)
    assert kept32 == [0, 7]  # fp32: patch 0 is the text's pick, as the official fp32 code
    case = finish(dict(feats=feats, text=t, heads=[cls], unit=torch.zeros(8, dtype=torch.long),
                       patch=torch.arange(8), unit_pos=torch.full((1, 2), -1), official_pos=torch.arange(8), n_img=1))
    assert kept32 == official(case, 2, torch.float32)
    assert kept16 == official(case, 2, F16)


def test_method_option():
    assert AttnMix(64).numerics == "ours" and AttnMix(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        AttnMix(64, numerics="fp16")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (8,), "llava_next": (16,), "video_llava": (16,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "attnmix", *ENGINE_ARGS[rt.family], stage="vision")

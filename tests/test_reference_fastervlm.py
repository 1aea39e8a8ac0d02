"""FasterVLM reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): Theia-4869/FasterVLM
  * branch ``main``, ``llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.feature_select``
    / ``forward``: the select layer's attentions ``[:, :, 0, 1:]`` (per head, computed by the tower in its
    own dtype - fp32: LLaVA's loader leaves the tower fp32 with ``device_map='auto'``) are returned
    ``.to(images.dtype)`` = fp16 (the eval scripts pass fp16 images);
  * branch ``main``, ``llava/model/llava_arch.py`` ``encode_images``: ``image_attentions.mean(dim=1)``
    (over heads, in fp16), ``torch.topk(..., k=T, dim=1)``, boolean index mask (kept in original order);
  * branch ``video``, ``videollava/model/llava_arch.py`` ``encode_videos``: (B, T, H, N) attentions of the
    fp16 video tower, ``mean(dim=2)``, ``topk(k, dim=2)``, sorted per frame ([CLS] dropped by
    ``feature_select``).

Compared with ``baselines.fastervlm`` on worked examples and random [CLS] rows with the official shapes
(CLIP ViT-L/14-336: 16 heads, 577 tokens -> 576 patches; Video-LLaVA: 8 frames x 257), fp32 and fp16
attentions, with planted duplicate tokens (identical columns in every head: exact ties).
"""

import pytest
import torch
from conftest import FAMILIES

from baselines.fastervlm import FasterVLM, fastervlm

OFFICIAL_DTYPE = torch.float16


def official_encode_images(image_attentions, T):
    """Transcription of ``feature_select`` (the ``.to(images.dtype)`` cast) + ``encode_images``'s
    selection: image_attentions (B, H, 576) in the tower's dtype; returns the kept indices per image."""
    attn = image_attentions.to(OFFICIAL_DTYPE).mean(dim=1)  # (B, N)
    idx = torch.topk(attn, k=T, dim=1)[1]
    mask = torch.zeros(attn.shape, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return [torch.nonzero(m).flatten().tolist() for m in mask]


def official_encode_videos(video_attentions, T):
    """Transcription of the video branch: video_attentions (B, F, H, N) (fp16 tower); kept indices per
    frame (sorted)."""
    attn = video_attentions.to(OFFICIAL_DTYPE).mean(dim=2)
    idx = torch.sort(torch.topk(attn, k=T, dim=2)[1], dim=2)[0]
    return idx[0].tolist()


def cls_rows(g, heads, n, dups, dtype):
    """(heads, n) softmax rows of random logits with a heavy tail (most probabilities ~1e-4, where fp16
    rounds many of them together) and ``dups`` planted duplicate columns (same logit in every head)."""
    logits = torch.randn(heads, n, generator=g) * 1.5
    logits[:, torch.randperm(n, generator=g)[:20]] += 6  # a few dominant tokens, as real [CLS] rows
    src = torch.randint(0, n, (dups,), generator=g)
    dst = torch.randperm(n, generator=g)[:dups]
    logits[:, dst] = logits[:, src]
    return logits.softmax(-1).to(dtype)


# ------------------------------------------------------------------------------ worked example


def test_worked_example_fp16_rounding_makes_a_tie():
    # 2 heads, 4 patches. fp32 head means: [.30000, .30001, .2, .19999]: the default mode keeps 1 (the
    # larger fp32 mean) at T = 1; in fp16 both round to the same value (0.2999...), a tie that topk
    # resolves in its own order - reference mode calls the same topk on the same fp16 values.
    a = torch.tensor([[.3, .30002, .2, .19998], [.3, .3, .2, .2]])
    unit, patch = torch.zeros(4, dtype=torch.long), torch.arange(4)
    assert fastervlm(a, unit, patch, 1).tolist() == [1]
    ref = fastervlm(a, unit, patch, 1, numerics="official").tolist()
    assert ref == official_encode_images(a[None], 1)[0]
    s = a.half().mean(0)
    assert s[0] == s[1]  # the fp16 tie
    assert fastervlm(a, unit, patch, 2, numerics="official").tolist() == [0, 1]


# ------------------------------------------------------------------------------ random, official shapes

CASES = [(seed, dtype, T) for seed in range(4) for dtype in (torch.float32, torch.float16)
         for T in (29, 58, 64, 128, 144, 192)]


@pytest.mark.parametrize("seed,dtype,T", CASES)
def test_reference_mode_equals_the_official_selection_llava(seed, dtype, T):
    g = torch.Generator().manual_seed(seed)
    a = cls_rows(g, 16, 576, 96, dtype)
    off = official_encode_images(a[None], T)[0]
    unit, patch = torch.zeros(576, dtype=torch.long), torch.arange(576)
    assert fastervlm(a, unit, patch, T, numerics="official").tolist() == off


@pytest.mark.parametrize("seed", range(4))
def test_reference_mode_equals_the_official_selection_video(seed):
    # 8 frames x 257 tokens ([CLS] first per frame; dropped); T = 17 patches per frame
    g = torch.Generator().manual_seed(100 + seed)
    frames = [cls_rows(g, 16, 257, 32, torch.float16) for _ in range(8)]
    off = official_encode_videos(torch.stack([f[:, 1:] for f in frames])[None], 17)
    a = torch.cat(frames, 1)
    unit = torch.arange(8).repeat_interleave(257)
    patch = torch.cat([torch.arange(-1, 256)] * 8)
    keep = fastervlm(a, unit, patch, 17, numerics="official")
    assert keep.tolist() == [f * 257 + 1 + i for f in range(8) for i in off[f]]


# three heads, two patches of one image (values x 0.25 exact in binary; u = 2^-10, fp16's ulp at 1): patch 0
# 0.25 (1 + .45u) in every head, patch 1 0.25 (1 + .55u) twice and 0.25 (1 + .2u): fp32 means .25 (1 + .45u) >
# .25 (1 + .433u), patch 0 first; cast to fp16 (ulp .25u there) patch 0's values round to .25, patch 1's to
# .25 (1 + u) twice and .25: fp16 means .25 < .25 (1 + u), patch 1 first. The official code run in fp32 casts
# its attentions .to(images.dtype) = fp32 and keeps patch 0.
U = 2.0 ** -10
REVERSING = 0.25 * torch.tensor([[1 + .45 * U, 1 + .55 * U], [1 + .45 * U, 1 + .55 * U], [1 + .45 * U, 1 + .2 * U]])


def test_reference_mode_ranks_in_the_given_dtype():
    unit, patch = torch.zeros(2, dtype=torch.long), torch.arange(2)
    assert fastervlm(REVERSING, unit, patch, 1, numerics="official", dtype=torch.float32).tolist() == [0]
    assert fastervlm(REVERSING, unit, patch, 1, numerics="official", dtype=torch.float16).tolist() == [1]
    assert fastervlm(REVERSING, unit, patch, 1, numerics="official").tolist() == [1]  # the builder's fp16
    assert official_encode_images(REVERSING[None], 1)[0] == [1]  # the transcription's fp16 images


@pytest.mark.parametrize("dtype,want", [(torch.float32, [0]), (torch.float16, [1])])
def test_reference_mode_ranks_in_the_run_dtype(dtype, want):
    # parity, LLaVA-NeXT fp32, seeds 4 and 5 (5 rows): the reference mode cast the fp32 run's [CLS] rows to fp16
    # and kept another patch at the edge of a crop's kept set. The stage now casts to the run's dtype (the
    # features'); the rows above keep patch 0 in an fp32 run, patch 1 in an fp16 one (the official fp16 load).
    from types import SimpleNamespace

    from llava.ops import unit_layout

    unit, patch = torch.zeros(2, dtype=torch.long), torch.arange(2)
    sig = SimpleNamespace(cls_attn=REVERSING, unit=unit, patch=patch, features=torch.zeros(2, 4, dtype=dtype),
                          unit_layout=lambda **kw: unit_layout(unit, patch))
    assert FasterVLM(1, numerics="official").select_vision(sig).keep.tolist() == want
    assert FasterVLM(1).select_vision(sig).keep.tolist() == [0]  # ours: the fp32 mean, whatever the run


def test_method_option():
    assert FasterVLM(64).numerics == "ours" and FasterVLM(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        FasterVLM(64, numerics="bf16")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (4,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "fastervlm", *ENGINE_ARGS[rt.family], stage="vision")

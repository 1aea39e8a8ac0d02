"""CDPruner reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): Theia-4869/CDPruner at 9541616
  * ``llava/model/builder.py`` ``load_pretrained_model``: the LLM (and the projector) in float16
    (``torch_dtype=torch.float16``); the vision tower, its ``visual_projection`` and the CLIP text tower
    (``load_text_tower``) are loaded without a dtype (fp32) and cast to fp16 only when
    ``device_map != 'auto'`` - the eval scripts keep the default 'auto', so they stay fp32;
  * ``llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.forward``: the select-layer
    features ``.to(images.dtype)`` (fp16) for the projector; ``visual_projection(post_layernorm(.).float())``
    and the text tower's ``text_embeds`` in fp32;
  * ``llava/model/llava_arch.py`` ``encode_images``: fp16 projector output divided by its norm (fp16),
    ``.float()``, fp32 similarity; fp32 relevance ``(-cos).mean(-1)``, min-max over the whole (B, N)
    tensor with +1e-6 in the numerator; kernel r_i S_ij r_j; the fp32 greedy MAP loop (``argmax``, rows
    held as (T, B, N), ``einsum('tb,tbn->bn')``, unclamped ``sqrt``, the pick's gain set to -inf); the picks
    scattered into a boolean index mask.

The transcription below is compared with ``baselines.cdpruner`` on worked examples and random tensors with
the official shapes (LLaVA-1.5-7B: 576 projected tokens x 4096, CLIP embeddings 768-d, 1-2 text segments;
NeXT: 5 crops of 576 with one min-max), fp16 and fp32 inputs, planted duplicate tokens and a planted
first-pick tie, T = 64 / 128 / 192.
"""

import pytest
import torch
from conftest import FAMILIES

from baselines.cdpruner import CDPruner, cdpruner, dpp_greedy_official, relevance_clip

OFFICIAL_DTYPE = torch.float16  # the official projector output


def official_select(projected, image_embeds, text_embeds, T):
    """Transcription of ``encode_images`` after the tower: projected (B, N, D) in the official dtype (fp16),
    image_embeds (B, N, C) and text_embeds (M, C) fp32. Returns the kept indices per crop (the mask)."""
    n_crops, n_tok = projected.shape[:2]
    unit_rows = (projected / projected.norm(dim=-1, keepdim=True)).float()
    sim = torch.matmul(unit_rows, unit_rows.transpose(1, 2))
    e = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    t = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    rel = (-torch.matmul(e, t.t())).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    kern = rel.unsqueeze(2) * sim * rel.unsqueeze(1)
    chol = torch.zeros((T, n_crops, n_tok))
    gains = torch.diagonal(kern, dim1=1, dim2=2).clone()
    picked = torch.empty((T, n_crops), dtype=torch.long)
    crops = torch.arange(n_crops)
    for step in range(T):
        best = torch.argmax(gains, dim=-1)
        picked[step] = best
        vec = (kern[crops, best] - torch.einsum("tb,tbn->bn", chol[:step, crops, best], chol[:step])) \
            / torch.sqrt(gains[crops, best]).unsqueeze(-1)
        chol[step] = vec
        gains -= torch.square(vec)
        gains[crops, best] = -float("inf")
    mask = torch.zeros(n_crops, n_tok, dtype=torch.bool)
    mask.scatter_(1, picked.t(), True)
    return [torch.nonzero(m).flatten().tolist() for m in mask]


def run(feats, c, T, numerics, unit=None, unit_pos=None):
    unit = torch.zeros(feats.shape[0], dtype=torch.long) if unit is None else unit
    return cdpruner(feats, c, unit, T, unit_pos=unit_pos, numerics=numerics).tolist()


# ------------------------------------------------------------------------------ worked examples


def test_worked_example_duplicates_and_an_orthogonal_token():
    # x0 = x1 = (1, 0), x2 = (0, 1), x3 = (1, 1); CLIP cosines to the text c = [.5, .5, .5, 1] -> r = -c,
    # min-maxed (official sign quirk): [1 + 2e-6, 1 + 2e-6, 1 + 2e-6, 2e-6]. Gains r_i^2 S_ii: a tie of 0 / 1 / 2
    # -> first index 0; then x1 (a copy of x0) has gain ~0, x3 ~2e-12, x2 (orthogonal to x0) 1 + 4e-6 -> 2.
    # Both modes keep [0, 2].
    x = torch.tensor([[1., 0], [1, 0], [0, 1], [1, 1]])
    emb = torch.tensor([[.5, .75 ** .5], [.5, .75 ** .5], [.5, .75 ** .5], [1, 0]])
    text = torch.tensor([[1., 0]])
    c = relevance_clip(emb, text, "official")
    assert c.tolist() == pytest.approx([.5, .5, .5, 1], abs=1e-6)
    assert official_select(x[None].to(OFFICIAL_DTYPE), emb[None], text, 2) == [[0, 2]]
    assert run(x, c, 2, "official") == [0, 2] == run(x, c, 2, "ours")


def test_worked_example_constant_relevance_official_keeps_the_first_tokens():
    # constant relevance: the official min-max divides by 0 -> r = inf, every gain inf / NaN, the loop
    # picks 0, 1, ..., T-1. The default mode's guard (r = 1) keeps the pure-diversity DPP: x0 and x3.
    x = torch.tensor([[1., 0], [1, 0], [1, 0], [0, 1], [0, 1]])
    emb, text = torch.ones(5, 2), torch.ones(1, 2)
    c = relevance_clip(emb, text, "official")
    assert official_select(x[None].to(OFFICIAL_DTYPE), emb[None], text, 2) == [[0, 1]]
    assert run(x, c, 2, "official") == [0, 1]
    assert run(x, c, 2, "ours") == [0, 3]


def test_rank_deficient_kernel_official_loop_goes_non_finite():
    # 40 tokens spanning 4 directions, T = 12 > rank: the official loop takes sqrt of gains <= 0 and goes on
    # with NaN / -inf gains; reference mode reproduces its picks (a re-pick is kept once), the default mode
    # keeps 12 distinct tokens.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 4, generator=g) @ torch.randn(4, 64, generator=g)
    emb, text = torch.randn(40, 16, generator=g), torch.randn(1, 16, generator=g)
    c = relevance_clip(emb, text, "official")
    off = official_select(x[None].to(OFFICIAL_DTYPE), emb[None], text, 12)[0]
    assert run(x, c, 12, "official") == off
    assert len(run(x, c, 12, "ours")) == 12


def test_official_greedy_equals_the_guarded_greedy_while_finite():
    # full-rank kernel: the official loop and ours pick the same items in the same order
    from baselines.cdpruner import dpp_greedy

    g = torch.Generator().manual_seed(2)
    a = torch.randn(30, 60, generator=g)
    L = a @ a.T
    assert dpp_greedy_official(L, 10).tolist() == dpp_greedy(L, 10).tolist()


# ------------------------------------------------------------------------------ random, official shapes


def random_inputs(seed, dtype, crops=1, segments=1, dups=64):
    """Projected tokens (crops, 576, 4096) with shared directions (high mutual cosine, as real LLaVA
    tokens), CLIP image embeddings (crops, 576, 768) and text embeddings (segments, 768); ``dups`` planted
    duplicate tokens per crop (same projected row and embedding) and a copy of each crop's most relevant
    token planted at its index 0 (an exact first-pick tie, won by the lower index). Values in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(crops, 576, 4096, generator=g) * 0.5
    x += torch.randn(crops, 576, 16, generator=g) @ torch.randn(16, 4096, generator=g)
    e = torch.randn(crops, 576, 768, generator=g) + torch.randn(768, generator=g)
    t = torch.randn(segments, 768, generator=g)
    for b in range(crops):
        src = torch.randint(0, 576, (dups,), generator=g)
        dst = torch.randperm(576, generator=g)[:dups]
        x[b, dst], e[b, dst] = x[b, src], e[b, src]
        top = int(relevance_clip(e[b], t).argmin())  # r = -c: the most relevant has the smallest c
        x[b, 0], e[b, 0] = x[b, top], e[b, top]
    return x.to(dtype), e.to(dtype).float(), t.to(dtype).float()


CASES = [(seed, dtype, segments, T) for seed in range(2) for dtype in (torch.float16, torch.float32)
         for segments, T in ((1, 64), (2, 128), (1, 192))]


@pytest.mark.parametrize("seed,dtype,segments,T", CASES)
def test_reference_mode_equals_the_official_selection_llava(seed, dtype, segments, T):
    x, e, t = random_inputs(seed, dtype, segments=segments)
    off = official_select(x.to(OFFICIAL_DTYPE), e, t, T)[0]
    c = relevance_clip(e[0], t, "official")
    assert run(x[0], c, T, "official") == off
    assert len(off) == T


@pytest.mark.parametrize("seed,dtype,T", [(s, d, T) for s in range(2) for d in (torch.float16, torch.float32)
                                            for T in (64, 96)])
def test_reference_mode_equals_the_official_selection_heavy_duplicates(seed, dtype, T):
    # 576 tokens that are copies of 48 distinct ones (T > rank): past the rank the official loop runs on
    # NaN / -inf gains (it then takes the lowest-index NaN item); reference mode follows it, the default
    # mode's clamped pivot picks differently (kept sets differ on every case here).
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 48, (576,), generator=g)
    x = (torch.randn(48, 4096, generator=g) * 0.5 + torch.randn(4096, generator=g))[src].to(dtype)
    e = torch.randn(48, 768, generator=g)[src].to(dtype).float()
    t = torch.randn(1, 768, generator=g)
    off = official_select(x[None].to(OFFICIAL_DTYPE), e[None], t, T)[0]
    assert run(x, relevance_clip(e, t, "official"), T, "official") == off
    assert run(x, relevance_clip(e, t), T, "ours") != off


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reference_mode_equals_the_official_selection_next(dtype):
    # NeXT (official 'spatial': 5 crops of 576 in one encode_images call, one min-max), T = 32 per crop
    x, e, t = random_inputs(11, dtype, crops=5, dups=32)
    off = official_select(x.to(OFFICIAL_DTYPE), e, t, 32)
    unit = torch.arange(5).repeat_interleave(576)
    pos = torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1]])
    c = relevance_clip(e.reshape(-1, 768), t, "official")
    keep = run(x.reshape(-1, 4096), c, 32, "official", unit=unit, unit_pos=pos)
    assert keep == [576 * b + i for b in range(5) for i in off[b]]


def test_method_option():
    assert CDPruner(64).numerics == "ours" and CDPruner(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        CDPruner(64, numerics="fp16")
    with pytest.raises(ValueError):
        cdpruner(torch.randn(8, 4), torch.randn(8), torch.zeros(8, dtype=torch.long), 2, numerics="half")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (4,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "cdpruner", *ENGINE_ARGS[rt.family], stage="vision")

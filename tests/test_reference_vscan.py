"""VScan reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): Tencent/SelfEvolvingAgent, folder ``VScan/`` (commit a82450e):
  * ``llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.feature_select`` / ``forward``:
    every layer's attentions stacked, the [CLS] row to the patches ``[..., 0, 1:]``, features and
    attentions cast ``.to(images.dtype)`` (fp16; the tower itself is fp32 under ``load_pretrained_model``'s
    default ``device_map='auto'``, ``llava/model/builder.py``);
  * ``llava/model/llava_arch.py`` ``encode_images``: ``mean(dim=2)`` over heads (fp16), layers 5 and -2;
    ``window_cls_selection``: per 6 x 6 window ``torch.topk`` (k = int(T * 0.5) // 16) of the row-major
    window vector; deep row with the local picks set to 0, ``torch.topk`` (k = T - int(T * 0.5)) over the
    (B, 576) rows; ``index_mask`` = union; ``token_merging``: ``F.cosine_similarity`` of the fp16
    projected features (non-retained x retained), ``argmax``, fp16 ``scatter_add_`` and ``/ (1 + count)``;
  * ``llava/model/modeling_llama_x.py`` ``layer_prune`` (stage 2, PyramidDrop's): fp32 softmax cast to
    fp16, head mean, image columns, mean over the query row, ``topk``, sorted.

Compared with ``baselines.vscan`` on random [CLS] rows with the official shapes (24 layers, 16 heads, 577
tokens; 24 x 24 patches; LLaVA-1.5 and a 5-crop LLaVA-NeXT batch) and projected features (D = 32; D = 4096
in the full-width case: the fp16 cosine is slow on CPU), fp32 and fp16-valued, with planted duplicate
patches (same attention in every head and layer, same features: exact ties in both scans and in the
cosine), exact ties planted at the local and global cuts, and deep rows whose tail underflows to 0 in fp16
(the official global scan then re-picks zeroed local picks).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from baselines.pdrop import pdrop_select
from baselines.vscan import VScan, vscan_stage1
from llava.ops import merge_tokens

L, H, N, SIDE, WIN = 24, 16, 577, 24, 6
P = SIDE * SIDE


# ------------------------------------------------------------------ the official code, transcribed


def official_stage1(cls_rows, projected, t):
    """``encode_images`` after the tower. cls_rows (24, B, 16, 576) the [CLS] rows to the patches as the
    tower returned them (fp32), projected (B, 576, D) the fp16 projector output. Returns (local indices
    (B, k*16), global indices (B, g), index_mask (B, 576), nearest (B, R), merged (B, 576, D) fp16)."""
    att = cls_rows.to(torch.float16).mean(dim=2)  # .to(images.dtype), then the head mean
    shallow, deep = att[5], att[-2].clone()
    B = shallow.shape[0]
    n_local = int(t * 0.5)
    per_win = n_local // ((SIDE // WIN) ** 2)
    maps = shallow.view(B, SIDE, SIDE)
    local = []
    for b in range(B):
        got = []
        for i in range(SIDE // WIN):
            for j in range(SIDE // WIN):
                vec = maps[b, i * WIN:(i + 1) * WIN, j * WIN:(j + 1) * WIN].reshape(-1)
                for q in torch.topk(vec, per_win)[1].tolist():
                    got.append((i * WIN + q // WIN) * SIDE + j * WIN + q % WIN)
        local.append(got)
    local = torch.tensor(local)
    for b in range(B):
        deep[b, local[b]] = 0
    glob = torch.topk(deep, k=t - n_local, dim=1)[1]
    mask = torch.zeros(B, P, dtype=torch.bool).scatter_(1, torch.cat([local, glob], 1), True)
    # token_merging (one batch row at a time: the (B, R, m, D) cosine is per pair)
    merged, nearest = projected.clone(), []
    for b in range(B):
        ret, oth = projected[b][mask[b]], projected[b][~mask[b]]
        cos = torch.cat([F.cosine_similarity(oth[a:a + 64][None, :, None], ret[None, None], dim=3)
                         for a in range(0, oth.shape[0], 64)], dim=1)[0]
        near = cos.argmax(dim=1)
        acc = ret.clone()
        acc.scatter_add_(0, near[:, None].expand(-1, ret.shape[1]), oth)
        cnt = torch.zeros(ret.shape[0], dtype=torch.int).scatter_add_(0, near, torch.ones_like(near, dtype=torch.int))
        acc /= (1 + cnt[:, None])
        merged[b, mask[b]] = acc
        nearest.append(near)
    return local, glob, mask, nearest, merged


def official_merge_fp32(projected, mask, nearest):
    """The same merge formula on the same assignment, in fp32 (the official fp16 code's own rounding)."""
    ret, oth = projected[mask].float(), projected[~mask].float()
    acc = ret.clone().index_add_(0, nearest, oth)
    cnt = torch.zeros(ret.shape[0]).index_add_(0, nearest, torch.ones(nearest.numel()))
    return acc / (1 + cnt[:, None])


# ------------------------------------------------------------------ random cases


@functools.cache
def base_case(seed, B, D, dups=48, underflow=False):
    """[CLS] rows (24, B, 16, 576) fp32 softmax over 577 tokens, projected (B, 576, D); ``dups`` planted
    duplicate patches per unit (same row value in every layer / head, same features)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, B, H, N, generator=g) * 2
    logits[..., 1 + torch.randperm(P, generator=g)[:30]] += 4
    if underflow:  # deep layer: all but 100 patches far below the fp16 range (-> 0 after the cast)
        logits[L - 2, ..., 1 + torch.randperm(P, generator=g)[:P - 100]] -= 40
    rows = logits.softmax(-1)[..., 1:]
    feats = torch.randn(B, P, D, generator=g)
    for b in range(B):
        src, dst = torch.randint(0, P, (dups,), generator=g), torch.randperm(P, generator=g)[:dups]
        rows[:, b, :, dst] = rows[:, b, :, src]
        feats[b, dst] = feats[b, src]
    return rows, feats


def plant_cut_ties(rows, t):
    """Exact ties at the local cut of every window (ranks k-1 / k by the fp16 head mean of layer 5) and at
    the global cut (ranks g-1 / g among the non-local patches of layer -2), per unit: the two patches get
    the same per-head rows in that layer."""
    n_local = int(t * 0.5)
    k = n_local // 16
    for b in range(rows.shape[1]):
        sh = rows[5, b].half().mean(0)
        loc = set()
        for i in range(4):
            for j in range(4):
                ids = torch.tensor([(i * WIN + y) * SIDE + j * WIN + x for y in range(WIN) for x in range(WIN)])
                order = ids[sh[ids].float().sort(descending=True, stable=True).indices]
                if k >= 1:
                    rows[5, b, :, order[k]] = rows[5, b, :, order[k - 1]]
                loc.update(order[:k].tolist())
        dp = rows[L - 2, b].half().mean(0).float()
        rest = [q for q in dp.sort(descending=True, stable=True).indices.tolist() if q not in loc]
        g = t - n_local
        rows[L - 2, b, :, rest[g]] = rows[L - 2, b, :, rest[g - 1]]
    return rows


def make_case(seed, dtype, t, cut, B=1, D=32, underflow=False):
    rows, feats = (x.clone() for x in base_case(seed, B, D, underflow=underflow))
    if cut:
        plant_cut_ties(rows, t)
    # fp16: values as an fp16 tower would give them (rows) and an fp16 projector (features, always fp16
    # officially); fp32: our engine's fp32 signals / features of an fp32 run
    return rows.to(dtype).float(), feats.to(dtype)


def ours(rows, feats, t, numerics):
    B, _, D = feats.shape
    unit = torch.arange(B).repeat_interleave(P)
    patch = torch.arange(P).repeat(B)
    loc = rows[5].permute(1, 0, 2).reshape(H, -1)  # (H, B*576): per head, the units' tokens in order
    glo = rows[L - 2].permute(1, 0, 2).reshape(H, -1)
    x = feats.reshape(-1, D)
    sel, l_mask, g_mask = vscan_stage1(loc, glo, x, unit, patch, (SIDE, SIDE), t, return_scans=True,
                                       numerics=numerics)
    return sel, l_mask, g_mask, x


def compare(rows, feats, t, numerics, off=None):
    """(selection equal?, merged values within the official fp16 rounding?) against the transcription
    (``off``: its result, if already computed)."""
    B = feats.shape[0]
    loc, glob, mask, nearest, merged = off or official_stage1(rows, feats.half(), t)
    sel, l_mask, g_mask, x = ours(rows, feats, t, numerics)
    same = sel.targets.tolist() == mask.reshape(-1).nonzero().flatten().tolist()
    for b in range(B):
        own = slice(P * b, P * (b + 1))
        same &= set(l_mask[own].nonzero().flatten().tolist()) == set(loc[b].tolist())
        same &= set(g_mask[own].nonzero().flatten().tolist()) == set(glob[b].tolist())
    if not same:
        return False, None
    # assignment: each other token's nearest retained slot (per unit, in ascending target order)
    off_assign = []
    for b in range(B):
        slots = torch.nonzero(mask.reshape(-1)).flatten()
        first = int((slots < P * b).sum())
        off_assign.append(nearest[b] + first)
    others = (~mask.reshape(-1)).nonzero().flatten()
    if not torch.equal(sel.assign[others], torch.cat(off_assign)):
        return False, None
    # values of the fp16 projected features (an fp16 model, as the official run): the reference mode's merge is the
    # official CPU scatter_add_'s arithmetic (bit-identical); the default's fp32 merge is within the official
    # formula's own fp16 rounding
    ours16 = merge_tokens(x.half(), sel).half().float()
    off16 = merged.reshape(-1, x.shape[1])[mask.reshape(-1)].float()
    if numerics == "official":
        return True, bool(sel.arithmetic == "sequential" and torch.equal(ours16, off16))
    off32 = torch.cat([official_merge_fp32(feats[b].half(), mask[b], nearest[b]) for b in range(B)])
    within = ((ours16 - off16).abs() <= (off16 - off32).abs() + off16.abs() * 2 ** -10 + 2 ** -24).all()
    return True, bool(within)


BUDGETS = (96, 192, 288, 100)  # 100: int(50) // 16 = 3 per window, 2 local tokens lost -> 98 targets
CASES = [(seed, dtype, t, cut) for seed in range(2) for dtype in (torch.float32, torch.float16)
         for t in BUDGETS for cut in (False, True)]


@functools.cache
def official_case(seed, dtype, t, cut):
    rows, feats = make_case(seed, dtype, t, cut)
    return rows, feats, official_stage1(rows, feats.half(), t)


@pytest.mark.parametrize("seed,dtype,t,cut", CASES)
def test_reference_mode_equals_the_official_stage1(seed, dtype, t, cut):
    rows, feats, off = official_case(seed, dtype, t, cut)
    same, within = compare(rows, feats, t, "official", off)
    assert same and within


@pytest.mark.parametrize("D", [32, 4096])
def test_reference_mode_full_width_and_fp16_underflow(D):
    # D = 4096 (LLaVA-1.5-7B's projector); the deep row's tail underflows to 0 in fp16: the official
    # global top-k runs into the zeros, where the zeroed local picks compete again
    rows, feats = make_case(10, torch.float16, 288, True, D=D, underflow=True)
    off = official_stage1(rows, feats.half(), 288)
    loc, glob, mask = off[:3]
    assert len(set(loc[0].tolist()) & set(glob[0].tolist())) > 0 and int(mask.sum()) < 288  # the quirk happens
    same, within = compare(rows, feats, 288, "official", off)
    assert same and within
    if D == 32:  # the default mode excludes the local picks: always T targets, so it parts here
        assert not compare(rows, feats, 288, "ours", off)[0]


def test_reference_mode_next_batch_of_crops():
    # LLaVA-NeXT: the official code scans the 5 crops as one batch ((5, 576) global top-k)
    rows, feats = make_case(20, torch.float16, 96, True, B=5)
    same, within = compare(rows, feats, 96, "official")
    assert same and within


def test_default_mode_agreement():
    # the default mode (fp32 head mean, ties to the lower index, local picks excluded, fp32 cosine) on the
    # same cases: it parts from the official selection where fp16 rounding or a tie decides
    agree = 0
    for c in CASES:
        rows, feats, off = official_case(*c)
        agree += compare(rows, feats, c[2], "ours", off)[0]
    assert agree == DEFAULT_AGREE


DEFAULT_AGREE = 2


def test_worked_example_zeroed_local_pick():
    # one 4 x 4 unit (2 x 2 windows of 2 x 2), T = 8: local k = 4 // 4 = 1 per window, global 4.
    # local rows: window maxima at 0, 3, 12, 15; deep row: only patches 5 and 6 positive, the rest 0
    # (fp16 underflow) -> the official global top-4 = 5, 6 and two of the zeros (torch.topk's choice,
    # possibly a local pick again); the default takes 5, 6 and the lowest non-local zeros 1, 2
    unit, patch = torch.zeros(16, dtype=torch.long), torch.arange(16)
    loc = torch.full((16,), 0.01)
    loc[[0, 3, 12, 15]] = 0.5
    deep = torch.zeros(16)
    deep[5], deep[6] = 0.4, 0.3
    x = torch.randn(16, 8)
    _, l_mask, g_mask = vscan_stage1(loc, deep, x, unit, patch, (4, 4), 8, return_scans=True)
    assert l_mask.nonzero().flatten().tolist() == [0, 3, 12, 15]
    assert g_mask.nonzero().flatten().tolist() == [1, 2, 5, 6]
    sel, l_mask, g_mask = vscan_stage1(loc, deep, x, unit, patch, (4, 4), 8, return_scans=True, numerics="official")
    row = deep.half().clone()
    row[[0, 3, 12, 15]] = 0
    expected = set(torch.topk(row[None], 4, dim=1)[1][0].tolist())
    assert l_mask.nonzero().flatten().tolist() == [0, 3, 12, 15]
    assert set(g_mask.nonzero().flatten().tolist()) == expected and {5, 6} <= expected
    assert sel.targets.tolist() == sorted({0, 3, 12, 15} | expected)


def test_worked_example_fp16_head_mean_tie():
    # two heads: fp32 means .2 / .20001 -> default picks patch 1; in fp16 the two tie and reference mode
    # follows torch.topk on the fp16 values
    unit, patch = torch.zeros(4, dtype=torch.long), torch.arange(4)
    loc = torch.tensor([[.2, .20002, .1, .1], [.2, .2, .1, .1]])
    deep = torch.tensor([0., 0., .3, .2])
    x = torch.eye(4)
    _, l_mask, _ = vscan_stage1(loc, deep, x, unit, patch, (2, 2), 2, window=2, return_scans=True)
    assert l_mask.nonzero().flatten().tolist() == [1]
    half = loc.half().mean(0)
    assert half[0] == half[1]
    _, l_mask, _ = vscan_stage1(loc, deep, x, unit, patch, (2, 2), 2, window=2, return_scans=True, numerics="official")
    assert l_mask.nonzero().flatten().tolist() == torch.topk(half, 1)[1].tolist()


# ------------------------------------------------------------------ stage 2 (layer_prune)


def official_layer_prune_rank(probs_fp32, image_index, n_image, keep):
    """``layer_prune``'s ranking for one sample: probs (H, 1, S) fp32 softmax of the last prompt token,
    cast to fp16, head mean, image columns, mean over the query row, topk, sorted."""
    w = probs_fp32.to(torch.float16)
    avg = torch.mean(w, dim=0)[:, image_index:image_index + n_image]
    return torch.mean(avg, dim=0).topk(keep).indices.sort().values.tolist()


@pytest.mark.parametrize("seed,dtype", [(s, d) for s in range(3) for d in (torch.float32, torch.float16)])
def test_stage2_reference_equals_layer_prune(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    pre, nv, post, heads = 35, 96, 40, 32
    logits = torch.randn(heads, 1, pre + nv + post, generator=g) * 2
    src, dst = pre + torch.randint(0, nv, (20,), generator=g), pre + torch.randperm(nv, generator=g)[:20]
    logits[..., dst] = logits[..., src]  # duplicate image tokens: exact ties
    probs = logits.softmax(-1, dtype=torch.float32).to(dtype).float()
    row = probs[:, 0]
    keep = pdrop_select(row, torch.arange(pre, pre + nv), 32, "official")
    assert keep.tolist() == official_layer_prune_rank(probs, pre, nv, 32)


def test_method_option():
    assert VScan(64).numerics == "ours" and VScan(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        VScan(64, numerics="fp16")
    with pytest.raises(ValueError):
        vscan_stage1(torch.zeros(4), torch.zeros(4), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
                     torch.arange(4), (2, 2), 2, numerics="exact")


# ------------------------------------------------------------------------------ tiny models, engine


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections (vision stage; LLM stage on LLaVA-1.5) equal
    each sample alone, and cached generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "vscan", 6, stage="vision")
    if rt.family == "llava":
        check_reference_mode_in_engine(rt, "vscan", 6, stage=0)

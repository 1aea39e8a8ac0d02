"""VisionZip reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): dvlab-research/VisionZip
  * ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``: [CLS] row of ``attentions[-2]``
    summed over heads, ``topk(dominant_num, dim=1)`` (+1, [CLS] index 0 prepended), boolean mask,
    dominant tokens by ``masked_select`` (index order); the rest: metric normalised by ``m / m.norm()``,
    targets ``arange(0, R, step)[:C]``, ``bmm`` similarity, ``argmax`` one-hot, ``bmm(one_hot^T, hidden)
    / counts`` + target; output ``.to(images.dtype)`` (fp16);
  * ``visionzip/utils.py`` ``CLIPAttention_forward`` (explicit bmm attention, softmax in the tower dtype;
    ``metric`` = the layer's keys averaged over heads) and ``visionzip/main.py`` (``dominant - 1``
    patches + [CLS]);
  * the tower dtype: VisionZip's README loads the model with LLaVA's ``load_pretrained_model`` (default
    ``device_map='auto'``), which leaves the CLIP tower fp32, so the selection and the merge run in fp32.

Compared with ``baselines.visionzip`` on random select-layer tensors with the official shapes (CLIP
ViT-L/14-336: 577 tokens, 16 heads, width 1024, head dim 64) at 54+10 / 108+20 / 162+30, with fp32 and
fp16-valued signals and planted duplicate patches (exact ties in scores and similarities): identical
dominant sets, targets and assignments, merged values equal to the official fp16 output.
"""

import pytest
import torch
from conftest import FAMILIES

from baselines.visionzip import VisionZip, visionzip
from llava.ops import merge_tokens

N, H, W, HD = 577, 16, 1024, 64


def official_visionzip(attn, hidden, metric, dominant_num, contextual_num):
    """Transcription of ``CLIPVisionTower_VisionZip.forward`` after the tower ran (batch B): attn
    (B, H, 577, 577), hidden (B, 577, W), metric (B, 577, d), all in the tower's dtype.
    ``dominant_num`` = D - 1 (``main.visionzip`` passes ``dominant - 1``). Returns (dominant indices
    (B, D) sorted, target positions among the filtered tokens, assignment (B, R - C), output tokens)."""
    B = hidden.shape[0]
    cls_sum = attn[:, :, 0, 1:].sum(dim=1)
    top = cls_sum.topk(dominant_num, dim=1).indices + 1
    chosen = torch.cat([torch.zeros((B, 1), dtype=top.dtype), top], dim=1)
    rest_mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, chosen, False)
    dom = hidden.masked_select(~rest_mask.unsqueeze(-1)).view(B, dominant_num + 1, hidden.shape[2])
    m = metric[rest_mask].view(B, hidden.shape[1] - dominant_num - 1, metric.shape[2])
    h = hidden.masked_select(rest_mask.unsqueeze(-1)).view(B, hidden.shape[1] - dominant_num - 1, hidden.shape[2])
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[1] // contextual_num)
    tgt = torch.arange(0, m.shape[1], step)[:contextual_num]
    is_other = ~torch.isin(torch.arange(m.shape[1]), tgt)
    sim = torch.bmm(m[:, is_other, :], m[:, tgt, :].transpose(1, 2))
    slot = sim.argmax(dim=2)
    one_hot = torch.zeros(B, int(is_other.sum()), contextual_num, dtype=h.dtype).scatter_(2, slot.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    ctx = h[:, tgt, :] + torch.bmm(one_hot.transpose(1, 2), h[:, is_other, :]) / counts
    out = torch.cat([dom, ctx], dim=1).to(torch.float16)  # .to(images.dtype)
    return torch.nonzero(~rest_mask[0]).flatten(), tgt, slot[0], out[0]


def random_layer(seed, dups=80):
    """Select-layer tensors: attention (1, H, N, N) softmax rows with a peaked [CLS] row, hidden states,
    head-mean keys; ``dups`` planted duplicate patches (same [CLS] logit in every head, same key)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, H, N, N, generator=g)
    logits[:, :, 0, 1 + torch.randperm(N - 1, generator=g)[:30]] += 5
    hidden = torch.randn(1, N, W, generator=g) * 2
    metric = torch.randn(1, N, HD, generator=g) + 0.5 * torch.randn(6, HD, generator=g)[torch.randint(0, 6, (N,), generator=g)]
    src = 1 + torch.randint(0, N - 1, (dups,), generator=g)
    dst = 1 + torch.randperm(N - 1, generator=g)[:dups]
    logits[:, :, 0, dst] = logits[:, :, 0, src]
    metric[:, dst] = metric[:, src]
    return logits.softmax(-1), hidden, metric


# our layout: patches 0..575 (official 1..576), then the [CLS] candidate 576 (official 0)
PERM = torch.cat([torch.arange(1, N), torch.zeros(1, dtype=torch.long)])
TO_OFFICIAL = PERM  # ours index i -> official index PERM[i]


def ours(attn, hidden, metric, d, c, numerics):
    cls_attn = attn[0, :, 0, PERM]
    unit = torch.zeros(N, dtype=torch.long)
    patch = torch.cat([torch.arange(N - 1), torch.tensor([-1])])
    sel = visionzip(cls_attn, metric[0, PERM], unit, patch, d, c, num_stock=N - 1, numerics=numerics)
    merged = merge_tokens(hidden[0, PERM], sel)
    return sel, merged


CASES = [(seed, dtype, d, c) for seed in range(4) for dtype in (torch.float32, torch.float16)
         for d, c in ((54, 10), (108, 20), (162, 30))]


@pytest.mark.parametrize("seed,dtype,d,c", CASES)
def test_reference_mode_equals_the_official_selection_and_merge(seed, dtype, d, c):
    attn, hidden, metric = (t.to(dtype) for t in random_layer(seed))
    # the official tower is fp32: it sees the (fp16-valued) signals in fp32
    off_dom, off_tgt, off_slot, off_out = official_visionzip(attn.float(), hidden.float(), metric.float(), d - 1, c)
    sel, merged = ours(attn, hidden, metric, d, c, "official")
    assert sorted(TO_OFFICIAL[sel.keep].tolist()) == off_dom.tolist()
    # targets: the official positions among the filtered (non-dominant) tokens, in order
    filtered = [i for i in range(N) if i not in set(off_dom.tolist())]
    assert TO_OFFICIAL[sel.targets].tolist() == [filtered[p] for p in off_tgt.tolist()]
    others = [filtered[p] for p in range(len(filtered)) if p not in set(off_tgt.tolist())]
    ours_assign = torch.empty(N, dtype=torch.long)
    ours_assign[TO_OFFICIAL] = sel.assign
    assert ours_assign[others].tolist() == off_slot.tolist()
    # values: dominant rows exact; contextual rows = the official fp16 output up to one fp16 rounding
    # (our fp32 merge sums in another order than the official bmm)
    ours_out = torch.cat([hidden[0, TO_OFFICIAL[sel.keep]].float()[torch.argsort(TO_OFFICIAL[sel.keep])], merged])
    assert torch.equal(ours_out[:d].half(), off_out[:d])
    torch.testing.assert_close(ours_out[d:].half(), off_out[d:], rtol=2 ** -10, atol=2 ** -14)


def official_merge(h, tgt, others, slot, c):
    """The official contextual formula (``bmm(one_hot^T, hidden) / counts`` + target) in h's dtype on
    given targets / assignment: h (R, W) filtered hidden states, tgt / others positions in it."""
    one_hot = torch.zeros(1, len(others), c, dtype=h.dtype).scatter_(2, slot[None, :, None], 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return (h[None, tgt] + torch.bmm(one_hot.transpose(1, 2), h[None, others]) / counts)[0]


@pytest.mark.parametrize("seed", range(3))
def test_fp16_merge_within_the_official_code_own_rounding(seed):
    # with fp16 hidden states (a tower run in fp16) the official formula rounds in fp16; our fp32 merge,
    # cast to fp16, differs from it by no more than the official fp16 result differs from the same
    # formula in fp32, plus one fp16 rounding
    attn, hidden, metric = (t.half() for t in random_layer(20 + seed))
    d, c = 54, 10
    sel, merged = ours(attn, hidden, metric, d, c, "official")
    keep = set(TO_OFFICIAL[sel.keep].tolist())
    filtered = [i for i in range(N) if i not in keep]
    tgt_off = TO_OFFICIAL[sel.targets].tolist()
    tgt = [filtered.index(t) for t in tgt_off]
    others = [p for p in range(len(filtered)) if p not in set(tgt)]
    ours_assign = torch.empty(N, dtype=torch.long)
    ours_assign[TO_OFFICIAL] = sel.assign
    slot = ours_assign[[filtered[p] for p in others]]
    h = hidden[0, filtered]
    off16 = official_merge(h, tgt, others, slot, c).float()
    off32 = official_merge(h.float(), tgt, others, slot, c)
    own = (off16 - off32).abs()
    assert ((merged.half().float() - off16).abs() <= own + off16.abs() * 2 ** -10 + 2 ** -24).all()


def test_method_option():
    assert VisionZip(64).numerics == "ours" and VisionZip(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        VisionZip(64, numerics="fp32")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (5,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "visionzip", *ENGINE_ARGS[rt.family], stage="vision")

"""PruMerge reference mode (``numerics="official"``) against a transcription of the official selection and merge.

Official source (read, not copied): 42Shawn/LLaVA-PruMerge at 097c041
  * ``llava/model/builder.py`` ``load_pretrained_model``: ``vision_tower.to(device=device,
    dtype=torch.float16)`` unconditionally (this fork predates LLaVA's ``device_map != 'auto'`` condition):
    the CLIP tower, its hooked q / k and the select-layer features are all fp16;
  * ``llava/model/multimodal_encoder/clip_encoder.py``:
    - ``outlier_dectection``: the [CLS] row ``.to(float32)`` -> numpy, ``np.percentile`` 25 / 75, count of
      values > Q3 + 1.5 IQR, ratio = count / N;
    - ``token_prune_merge_advanced_plus`` (what ``forward`` calls) / ``token_prune_merge_advanced``: layer-23
      q / k (fp16), ``softmax((q @ k^T) * C ** -0.5)`` in fp16, [CLS] row over the patches; ``torch.topk`` of
      int(N * ratio); PruMerge+: ``arange(0, 575, int(int(1 / ratio) / 3))`` minus the top ones appended;
      ``complement_idx`` (the pruned, ascending); ``F.normalize`` of the keys; per kept token i: candidates
      = kept before i, kept after i, pruned; ``torch.topk(bmm(key_i, keys^T), 32)``; x_i + sum(x_nb * a_nb)
      in fp16; extra token sum(x_pruned * a_pruned).

The transcription is compared with ``baselines.prumerge`` on worked examples and random q / k / features
with the official shapes (577 tokens, 1024-d, 24 x 24 grid), inputs drawn in fp32 and fp16, planted duplicate
tokens (identical key and feature rows: exact ties in the attention top-k and in every neighbour top-k).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from baselines.prumerge import PruMerge, iqr_outliers_official, prumerge

OFFICIAL_DTYPE = torch.float16  # the official tower (and every signal) is fp16


def official_ratio(cls_attn):
    """``outlier_dectection``, transcribed."""
    v = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    return len(np.where(v > q3 + 1.5 * (q3 - q1))[0]) / len(v)


def official_attention(q, k):
    """The hooked layer's full-width [CLS] row as the official code computes it (fp16): (1, N)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return F.softmax(scores, dim=-1)[:, 0, 1:]


def official_prune_merge(q, k, feats, plus=True, knn=32):
    """Transcription of ``token_prune_merge_advanced(_plus)`` (adaptive, B = 1): q, k (1, N + 1, D), feats
    (1, N, C), all fp16. Returns (kept indices in output order, output rows (m + 1, C) fp16)."""
    n = feats.shape[1]
    cls_attn = official_attention(q, k)
    ratio = official_ratio(cls_attn)
    top = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True)[1]
    if plus:
        stride = int(int(1 / ratio) / 3)
        flat = top.flatten()
        extra = [v for v in torch.arange(0, 575, stride) if v not in flat]
        top = torch.cat([top, torch.tensor(extra, dtype=torch.long)[None]], dim=1)
    keep = top[0]
    rest_mask = torch.ones(n, dtype=torch.bool)
    rest_mask[keep] = False
    pruned = torch.nonzero(rest_mask).flatten()  # complement_idx: ascending
    keys = k[0, 1:]
    a = cls_attn[0]
    x = feats[0]
    kept_keys = F.normalize(keys[keep], p=2, dim=-1)
    pruned_keys = F.normalize(keys[pruned], p=2, dim=-1)
    rows = torch.zeros_like(x[keep])
    for i in range(keep.numel()):
        cand_keys = torch.cat([kept_keys[:i], kept_keys[i + 1:], pruned_keys])[None]
        cand_x = torch.cat([x[keep][:i], x[keep][i + 1:], x[pruned]])[None]
        cand_a = torch.cat([a[keep][:i], a[keep][i + 1:], a[pruned]])[None]
        sim = torch.bmm(kept_keys[i][None, None], cand_keys.transpose(1, 2))
        nb = torch.topk(sim, k=knn, dim=2, largest=True)[1].squeeze()
        weighted = torch.sum(cand_x[:, nb, :] * cand_a[:, nb].unsqueeze(-1), dim=1)
        rows[i] = x[keep[i]] + weighted if plus else weighted + x[keep[i]]
    extra_row = torch.sum(x[pruned][None] * a[pruned][None].unsqueeze(-1), dim=1)
    return keep.tolist(), torch.cat([rows, extra_row])


def one_unit(n):
    return torch.zeros(n, dtype=torch.long), torch.arange(n)


def ours(attn, keys, feats, grid, numerics, **kw):
    sel = prumerge(attn, keys, feats, *one_unit(feats.shape[0]), grid, numerics=numerics, **kw)
    return sel.keep.tolist(), sel.values


# ------------------------------------------------------------------------------ worked examples


def test_worked_example_base_k2():
    # 6 patches (2 x 3), attention [.125] * 5 + [1]: Q1 = Q3 = .125, IQR 0 -> one outlier (patch 5), ratio
    # 1/6, int(6 * 1/6) = 1 kept. Keys: cos to key 5 = (1, 0): patch 0 (1, 0) -> 1, 4 (1, .5) -> .894,
    # 1 (1, 1) -> .707, 2 (0, 1) -> 0, 3 (-1, 0) -> -1: the 2 neighbours are 0 and 4.
    # x'_5 = (8, 0) + .125 (1, 0) + .125 (4, 4) = (8.625, .5); g = .125 * sum of x_0..x_4 = .125 (7, 7).
    # All exact in fp16: both modes give these values.
    a = torch.tensor([.125] * 5 + [1.])
    keys = torch.tensor([[1., 0], [1, 1], [0, 1], [-1, 0], [1, .5], [1, 0]])
    x = torch.tensor([[1., 0], [0, 1], [2, 0], [0, 2], [4, 4], [8, 0]])
    want = torch.tensor([[8.625, .5], [.875, .875]])
    for numerics in ("official", "ours"):
        keep, vals = ours(a, keys, x, (2, 3), numerics, variant="base", k=2)
        assert keep == [5] and torch.equal(vals, want)


def test_worked_example_fp16_neighbour_tie():
    # kept token 0 (attention outlier), k = 1 neighbour among patches 1 and 2 whose key cosines to key 0 are
    # .70001 and .7 in fp32 but equal in fp16: the default mode takes the fp32-larger one (patch 1); the
    # official topk decides the fp16 tie - reference mode calls the same topk on the same fp16 cosines.
    c1, c2 = .70001, .7
    keys = torch.tensor([[1., 0], [c1, (1 - c1 ** 2) ** .5], [c2, (1 - c2 ** 2) ** .5]]
                        + [[-1., 0]] * 5)
    a = torch.tensor([1., .0625, .0625] + [.03125] * 5)  # Q1 = .03125, Q3 = .0625: one outlier (patch 0)
    x = torch.tensor([[1., 0], [0, 1], [0, 2]] + [[0., 0]] * 5)
    kn16 = F.normalize(keys.half(), dim=-1)
    assert (kn16[0] @ kn16[1]) == (kn16[0] @ kn16[2]) and float(keys[0] @ keys[1]) > float(keys[0] @ keys[2])
    assert iqr_outliers_official(a.half()) == 1
    keep_d, vals_d = ours(a, keys, x, (2, 4), "ours", variant="base", k=1)
    assert keep_d == [0] and vals_d[0].tolist() == [1, .0625]  # x_0 + a_1 x_1
    keep_r, vals_r = ours(a, keys, x, (2, 4), "official", variant="base", k=1)
    off_nb = int(torch.topk(torch.bmm(kn16[0][None, None], kn16[1:].T[None]), 1, dim=2)[1]) + 1
    assert off_nb in (1, 2) and keep_r == [0] and vals_r[0].tolist() == (x[0] + .0625 * x[off_nb]).tolist()
    assert off_nb == 2 and vals_r[0].tolist() == [1, .125]  # this PyTorch's CPU topk returns the later tie


def every_patch_kept():
    """8 patches (2 x 4) and the unit's [CLS] as the engine offers it (index 8, patch -1). Attention .0625 but patch 3
    (.25) and patch 7 (.375): Q1 = .0625, Q3 = .0625 + .25 (.25 - .0625) = .109375, upper .1796875: 2 outliers,
    ratio .25, top int(8 * .25) = [7, 3]; PruMerge+ stride int(int(4) / 3) = 1: the grid arange(0, 7) minus 3 =
    [0, 1, 2, 4, 5, 6]: all 8 kept, nothing left for g. Keys pair the patches ((0, 1), (2, 3), (4, 5), (6, 7) on
    one axis each: cosine 1 in a pair, 0 across), so with k = 1 each kept patch merges its partner; x_j = (j, 1).
    All exact in fp16."""
    a = torch.tensor([.0625] * 3 + [.25] + [.0625] * 3 + [.375] + [.5])
    keys = torch.zeros(9, 4)
    keys[torch.arange(8), torch.arange(8) // 2] = 1.
    keys[8] = torch.tensor([1., 1, 1, 1])
    x = torch.stack([torch.arange(9.), torch.ones(9)], dim=1)
    unit, patch = torch.zeros(9, dtype=torch.long), torch.tensor(list(range(8)) + [-1])
    return a, keys, x, unit, patch


#: x'_i = x_i + a_partner x_partner, in output order [7, 3, 0, 1, 2, 4, 5, 6]
EVERY_PATCH_KEPT = [[7.375, 1.0625], [3.125, 1.0625], [.0625, 1.0625], [1, 1.0625], [2.75, 1.25], [4.3125, 1.0625],
                    [5.25, 1.0625], [8.625, 1.375]]


def test_worked_example_every_patch_kept_the_official_zero_global_token():
    # the official token_prune_merge_advanced_plus appends torch.sum(non_topk * non_topk_attn) over the empty
    # complement (clip_encoder.py:278): a zero row, projected and fed to the LLM like any g (parity: seed 4 images
    # 0 / 1, seed 5 image 3 kept all 64 patches; without it the LLM got one token less, logits 5.27 to 6.41 apart).
    # Reference mode (and empty_global="zero") emits it, its provenance the unit's [CLS]; ours by default does not.
    a, keys, x, unit, patch = every_patch_kept()
    for numerics, opts in (("official", {}), ("ours", {"empty_global": "zero"})):
        sel = prumerge(a, keys, x, unit, patch, (2, 4), numerics=numerics, k=1, **opts)
        assert sel.keep.tolist() == [7, 3, 0, 1, 2, 4, 5, 6]
        assert sel.targets.tolist() == [8]  # the [CLS] candidate: g's provenance
        assert sel.values.tolist() == EVERY_PATCH_KEPT + [[0., 0.]]
        assert sel.order is None  # [kept..., g]
        sel.check(9)  # well formed: no token twice
    sel = prumerge(a, keys, x, unit, patch, (2, 4), numerics="ours", k=1)
    assert sel.keep.tolist() == [7, 3, 0, 1, 2, 4, 5, 6] and sel.targets is None
    assert sel.values.tolist() == EVERY_PATCH_KEPT
    # no free [CLS] (Video-LLaVA's frame [CLS] output with cls_token="keep"): no g either way
    sel = prumerge(a, keys, x, unit, patch, (2, 4), numerics="official", k=1, cls_token="keep")
    assert sel.keep.tolist() == [8, 7, 3, 0, 1, 2, 4, 5, 6] and sel.targets is None
    # fixed budget (our design) with B > n: the identity count, no zero g
    sel = prumerge(a, keys, x, unit, patch, (2, 4), numerics="official", k=1, budget_mode="fixed", budget=12)
    assert sel.targets is None and sel.values.shape[0] == 8


def test_empty_global_option():
    assert PruMerge().empty_global == "drop" and PruMerge(numerics="official").empty_global == "zero"
    assert PruMerge(numerics="official", empty_global="drop").empty_global == "drop"
    m = PruMerge(empty_global="zero")
    assert m.include_cls_candidates and m.config()["empty_global"] == "zero"
    assert "eager engine" in m.capture_refusal()
    assert not PruMerge().include_cls_candidates and PruMerge().capture_refusal() is None
    with pytest.raises(ValueError, match="empty_global"):
        PruMerge(empty_global="none")


# ------------------------------------------------------------------------------ random, official shapes


def random_qk(seed, dtype, hot=24, dups=48, n=576, d=1024):
    """q / k (1, n + 1, d) with ``hot`` keys pushed towards the [CLS] query (attention outliers), features
    (1, n, d); ``dups`` planted duplicate patches (same key row and feature row: equal attention and equal
    cosines, exact ties) including copies of some hot keys. Drawn in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n + 1, d, generator=g)
    k = torch.randn(1, n + 1, d, generator=g) + 0.3 * torch.randn(d, generator=g)
    x = torch.randn(1, n, d, generator=g)
    hot_idx = torch.randperm(n, generator=g)[:hot] + 1
    k[0, hot_idx] += q[0, 0] * (0.004 + 0.004 * torch.rand(hot, 1, generator=g))
    src = torch.cat([hot_idx[:4] - 1, torch.randint(0, n, (dups - 4,), generator=g)])
    dst = torch.randperm(n, generator=g)[:dups]
    k[0, dst + 1], x[0, dst] = k[0, src + 1], x[0, src]
    return q.to(dtype), k.to(dtype), x.to(dtype)


CASES = [(seed, dtype, plus) for seed in range(2) for dtype in (torch.float16, torch.float32)
         for plus in (True, False) if plus or seed == 0]


@pytest.mark.parametrize("seed,dtype,plus", CASES)
def test_reference_mode_equals_the_official_code(seed, dtype, plus):
    q, k, x = random_qk(seed, dtype)
    q16, k16, x16 = q.to(OFFICIAL_DTYPE), k.to(OFFICIAL_DTYPE), x.to(OFFICIAL_DTYPE)
    keep, vals = official_prune_merge(q16, k16, x16, plus=plus)
    attn = official_attention(q16, k16)[0]  # the row the official code computes (fp16)
    top = int(576 * official_ratio(attn[None]))
    assert attn[keep[:top]].unique().numel() < top  # planted copies of hot tokens: exact ties in the top-k
    got_keep, got_vals = ours(attn.float(), k[0, 1:], x[0], (24, 24), "official",
                              variant="plus" if plus else "base")
    assert got_keep == keep
    assert got_vals.dtype == torch.float32 and torch.equal(got_vals, vals.float())  # fp16 values, exactly


@pytest.mark.parametrize("seed,dtype,plus", CASES)
def test_reference_mode_from_the_engine_signal(seed, dtype, plus):
    """The engine's full-width [CLS] row in the official arithmetic (``fullwidth_signals(..., logits="model")``,
    what the reference mode asks for: ``softmax((q @ k^T) * C ** -0.5)`` in the tower's fp16) is the official row
    bit for bit, and from it the reference mode keeps the official list and values (the fp32 row of the default
    signal kept it in 5 / 12 cases: docs/methods/prumerge.md)."""
    from types import SimpleNamespace

    from llava.families.clip import fullwidth_signals

    q, k, x = random_qk(seed, dtype)
    q16, k16, x16 = q.to(OFFICIAL_DTYPE), k.to(OFFICIAL_DTYPE), x.to(OFFICIAL_DTYPE)
    keep, vals = official_prune_merge(q16, k16, x16, plus=plus)
    layer = SimpleNamespace(layer_norm1=lambda h: h, self_attn=SimpleNamespace(
        q_proj=lambda h: q16[:, :h.shape[1]], k_proj=lambda h: k16[:, :h.shape[1]]))  # the hooked projections
    row, keys = fullwidth_signals(layer, torch.zeros(1, 577, 1, dtype=OFFICIAL_DTYPE), logits="model")
    assert row.dtype == OFFICIAL_DTYPE and torch.equal(row[0, 1:], official_attention(q16, k16)[0])
    got_keep, got_vals = ours(row[0, 1:], keys[0, 1:], x[0], (24, 24), "official", variant="plus" if plus else "base")
    assert got_keep == keep and torch.equal(got_vals, vals.float())
    assert PruMerge(numerics="official").vision_attention_logits == "model"
    assert PruMerge().vision_attention_logits == "fp32"


def test_method_option():
    assert PruMerge().numerics == "ours" and PruMerge(numerics="official").numerics == "official"
    assert PruMerge().config()["numerics"] == "ours"  # recorded like every method's options
    assert PruMerge(numerics="official").config()["numerics"] == "official"
    with pytest.raises(ValueError):
        PruMerge(numerics="fp16")
    with pytest.raises(ValueError):
        prumerge(torch.rand(4), torch.randn(4, 2), torch.randn(4, 2), *one_unit(4), (2, 2), numerics="half")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (None,), "llava_next": (None,), "video_llava": (None,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models (adaptive, no budget): batch 3 selections equal each sample alone,
    and cached generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "prumerge", *ENGINE_ARGS[rt.family], stage="vision")

"""PruMerge / PruMerge+: the IQR rule and ratio against numpy, the official ``token_prune_merge_advanced_plus``
and ``token_prune_merge_advanced`` transcribed and run at the official shapes (577 tokens, D = 1024), a
hand-worked 4x4 example (adaptive and fixed), and the engine on the three tiny CLIP families (LLM input =
the official code on the tower / = projector(values), token accounting). Cache and batching in each mode,
keep-all, the refusal of other families: tests/test_method_guarantees.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, llm_visual_rows, make_batch

import baselines.prumerge  # noqa: F401  (registers "prumerge")
from baselines.prumerge import PruMerge, adaptive_plan, fixed_plan, iqr_outliers, prumerge

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def one_unit(n):
    return torch.zeros(n, dtype=torch.long), torch.arange(n)


# ------------------------------------------------------------------ the official code, transcribed


def official_outlier_ratio(attn):
    """``outlier_dectection`` (official): numpy percentiles of the flattened fp32 values."""
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]
    return len(outlier_indices) / len(attn_np)


def official_complement_idx(idx, dim):
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for i in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def official_prumerge(q, k, image_features, plus=True, knn=32, guards=False):
    """``token_prune_merge_advanced(_plus)`` (official, adaptive branch) after the tower: q, k = the last
    layer's q_proj / k_proj outputs (1, N+1, C), image_features = select-layer patches (1, N, C). The
    official 575 is written N - 1 and 32 ``knn`` for the tiny grids; ``guards`` adds our rho = 0 / sigma = 0
    guards (the official code fails there). Returns (idx (left,), features (left + 1, C))."""
    B, N, C = image_features.shape
    attn = (q @ k.transpose(-2, -1)) * C ** -0.5
    attn = F.softmax(attn, dim=-1)
    cls_attn = attn[:, 0, 1:]
    reduction_ratio = official_outlier_ratio(cls_attn)
    if guards and reduction_ratio == 0:
        reduction_ratio = 1 / N
    left = int(N * reduction_ratio)
    if guards:
        left = max(1, left)
    _, idx = torch.topk(cls_attn, left, dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        stride = int(step_length / 3)
        if guards:
            stride = max(1, stride)
        arithmetic_sequence = torch.arange(0, N - 1, stride)
        original_tensor_1d = idx.flatten()
        filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d],
                                         dtype=torch.long)
        idx = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    Key_wo_cls = k[:, 1:]
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    compl = official_complement_idx(idx, N)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1:, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1:].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn,
                                            non_topk_attn[b, :].unsqueeze(0)], dim=1)
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(knn), dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_center = x_others[b, i, :] + weighted_avg
            updated_x_others[b, i, :] = updated_center
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    updated_x_others = torch.cat([updated_x_others, extra_one_token], dim=1)
    return idx[0], updated_x_others[0]


def planted_qk(seed, n_out=20, N=576, C=1024):
    """Random q / k / features of the official shapes, with ``n_out`` keys pushed towards the [CLS] query."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N + 1, C, generator=g)
    k = torch.randn(1, N + 1, C, generator=g)
    feats = torch.randn(1, N, C, generator=g)
    hot = torch.randperm(N, generator=g)[:n_out] + 1
    k[0, hot] += q[0, 0] * (0.004 + 0.004 * torch.rand(n_out, 1, generator=g))
    return q, k, feats


def engine_signals(q, k):
    """What the engine hands the method: the full-width [CLS] softmax (patch columns) and keys."""
    p = torch.softmax(q[0, :1] @ k[0].T / k.shape[-1] ** 0.5, -1)[0]
    return p[1:], k[0, 1:]


# ------------------------------------------------------------------ IQR, ratio, plans


@pytest.mark.parametrize("n", [16, 17, 100, 576, 2880])
def test_iqr_outliers_equal_numpy_percentile(n):
    g = torch.Generator().manual_seed(n)
    for trial in range(5):
        x = torch.randn(n, generator=g).mul(1 + trial).exp().softmax(0)  # heavy tailed, like attention
        ref = np.asarray(x.numpy(), dtype=np.float32)
        # torch.quantile (linear) is numpy's default percentile
        qs = torch.quantile(x, torch.tensor([0.25, 0.75]))
        np.testing.assert_allclose(qs.numpy(), [np.percentile(ref, 25), np.percentile(ref, 75)], rtol=1e-6, atol=0)
        c = int(iqr_outliers(x))
        assert c / n == official_outlier_ratio(x)
        assert c > 0 or trial == 0


def test_plans():
    # official arithmetic: rho = 32/576 -> step int(18.0) = 18, sigma = 6
    assert adaptive_plan(32, 576) == (32, 6)
    assert adaptive_plan(32, 576, "base") == (32, 0)
    assert adaptive_plan(7, 576) == (7, int(int(576 / 7) / 3))
    # guards: no outlier -> one (rho = 1/n), sigma 0 (rho > 1/3) -> 1
    assert adaptive_plan(0, 16) == (1, 5)
    assert adaptive_plan(0, 16, "base") == (1, 0)
    assert adaptive_plan(8, 16) == (8, 1)
    # float arithmetic of int(n * (c / n)) as in the official code
    assert adaptive_plan(1, 49)[0] == max(1, int(49 * (1 / 49)))
    # fixed (our design): top ceil(B/4), the rest of B - 1 as supplement, then g
    assert fixed_plan(64, 576) == (16, 47)
    assert fixed_plan(64, 576, "base") == (63, 0)
    assert fixed_plan(6, 16) == (2, 3)
    assert fixed_plan(1, 16) == (0, 0)
    assert fixed_plan(40, 16) == (10, 6) and fixed_plan(40, 16, "base") == (16, 0)


# ------------------------------------------------------------------ equal to the official code


@pytest.mark.parametrize("seed,n_out", [(0, 20), (1, 32), (2, 60)])
def test_plus_equals_official_at_official_shapes(seed, n_out):
    q, k, feats = planted_qk(seed, n_out)
    ref_idx, ref = official_prumerge(q, k, feats, plus=True)
    a, keys = engine_signals(q, k)
    sel = prumerge(a, keys, feats[0], *one_unit(576), (24, 24))
    rho = official_outlier_ratio(a)
    assert 0 < rho < 1 / 3
    assert sel.keep.tolist() == ref_idx.tolist()  # identical kept list, order included
    assert sel.order is None and sel.targets.numel() == 1 and (sel.assign == -1).all()
    assert sel.values.shape == ref.shape == (ref_idx.numel() + 1, 1024)
    torch.testing.assert_close(sel.values[:-1], ref[:-1], rtol=1e-5, atol=1e-5)  # merged kept tokens
    torch.testing.assert_close(sel.values[-1], ref[-1], rtol=1e-5, atol=1e-5)  # g
    # the global token's provenance: the pruned token with the largest attention
    pruned = sorted(set(range(576)) - set(ref_idx.tolist()))
    assert sel.targets.item() == pruned[int(a[pruned].argmax())]
    # the grid of the plus variant: stride int(int(1 / rho) / 3), flat indices < 575
    top = int(576 * rho)
    stride = int(int(1 / rho) / 3)
    assert set(sel.keep.tolist()[top:]) == set(range(0, 575, stride)) - set(sel.keep.tolist()[:top])


@pytest.mark.parametrize("seed,n_out", [(3, 20), (4, 45)])
def test_base_equals_official_at_official_shapes(seed, n_out):
    q, k, feats = planted_qk(seed, n_out)
    ref_idx, ref = official_prumerge(q, k, feats, plus=False)
    a, keys = engine_signals(q, k)
    sel = prumerge(a, keys, feats[0], *one_unit(576), (24, 24), variant="base")
    assert sel.keep.tolist() == ref_idx.tolist() and ref_idx.numel() == int(576 * official_outlier_ratio(a))
    torch.testing.assert_close(sel.values, ref, rtol=1e-5, atol=1e-5)


def test_guards_where_the_official_code_fails():
    # no outlier (constant attention): official PruMerge+ divides by zero; ours keeps one (rho = 1/n)
    n = 16
    a = torch.full((n,), 1 / n)
    g = torch.Generator().manual_seed(0)
    keys, x = torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)
    sel = prumerge(a, keys, x, *one_unit(n), (4, 4), k=3)
    assert sel.keep.tolist() == [0, 5, 10]  # top-1 (tie: patch 0), grid {0, 5, 10} (stride int(16/3) = 5)
    # sigma = 0 needs rho > 1/3, which the IQR rule cannot give (outliers lie above Q3: rho <= ~1/4); the
    # guard is tested on the plan (test_plans). PruMerge (base) with rho = 0: official top-0 (g alone); ours 1
    sel = prumerge(torch.full((n,), 1 / n), keys, x, *one_unit(n), (4, 4), k=3, variant="base")
    assert sel.keep.tolist() == [0] and sel.values.shape == (2, 4)


# ------------------------------------------------------------------ worked by hand


def worked_example():
    # 4x4 grid. a: one outlier (patch 6); ones at even, twos at odd patches (x 0.01)
    a = torch.tensor([1, 2, 1, 2, 1, 2, 20, 2, 1, 2, 1, 2, 1, 2, 1, 2.0]) / 100
    # keys on a circle at angles 0.1 j + 0.001 j^2: the 2 nearest of i are i - 1 and i + 1 (0 -> 1, 2)
    th = torch.tensor([0.1 * j + 0.001 * j * j for j in range(16)])
    keys = torch.stack([th.cos(), th.sin()], 1) * 3  # scale does not matter (cosine)
    return a, keys, torch.eye(16)


def e(*pairs):
    v = torch.zeros(16)
    for j, w in pairs:
        v[j] += w
    return v


def test_worked_example_plus_adaptive():
    a, keys, x = worked_example()
    # sorted: 1 x7, 2 x8, 20: Q1 = pos 3.75 -> 0.01, Q3 = pos 11.25 -> 0.02, upper 0.035: one outlier
    # rho = 1/16: top = [6]; step 16, sigma 5: grid {0, 5, 10} (< 15)
    sel = prumerge(a, keys, x, *one_unit(16), (4, 4), k=2)
    assert sel.keep.tolist() == [6, 0, 5, 10]
    want = torch.stack([
        e((6, 1), (5, .02), (7, .02)),
        e((0, 1), (1, .02), (2, .01)),
        e((5, 1), (4, .01), (6, .20)),  # a kept neighbour (6) is absorbed with its original feature
        e((10, 1), (9, .02), (11, .02)),
        e(*[(j, float(a[j])) for j in range(16) if j not in (0, 5, 6, 10)]),  # g
    ])
    torch.testing.assert_close(sel.values, want)
    assert sel.targets.tolist() == [1]  # largest pruned attention 0.02, tie -> lowest patch
    # base: the outlier alone, then g
    sel = prumerge(a, keys, x, *one_unit(16), (4, 4), k=2, variant="base")
    assert sel.keep.tolist() == [6] and sel.values.shape == (2, 16)
    torch.testing.assert_close(sel.values[0], e((6, 1), (5, .02), (7, .02)))
    torch.testing.assert_close(sel.values[1], e(*[(j, float(a[j])) for j in range(16) if j != 6]))


def test_worked_example_fixed():
    a, keys, x = worked_example()
    # B = 6: top ceil(6/4) = 2 -> [6, 1] (tie at 0.02: lowest patch); 3 supplement among the 14 remaining
    # [0, 2, 3, 4, 5, 7, ...] at positions 0, 4, 9 -> patches 0, 5, 11; then g
    sel = prumerge(a, keys, x, *one_unit(16), (4, 4), k=2, budget_mode="fixed", budget=6)
    assert sel.keep.tolist() == [6, 1, 0, 5, 11] and sel.targets.tolist() == [3]
    assert sel.values.shape == (6, 16)
    torch.testing.assert_close(sel.values[1], e((1, 1), (0, .01), (2, .01)))
    # base B = 4: top-3 [6, 1, 3]
    sel = prumerge(a, keys, x, *one_unit(16), (4, 4), k=2, budget_mode="fixed", budget=4, variant="base")
    assert sel.keep.tolist() == [6, 1, 3] and sel.values.shape == (4, 16)
    # nothing pruned (B - 1 >= n): no g, n outputs
    sel = prumerge(a, keys, x, *one_unit(16), (4, 4), budget_mode="fixed", budget=17, variant="base")
    assert sel.targets is None and sel.keep.numel() == 16 and sel.values.shape == (16, 16)
    # k clamped to n - 1 = 15: every kept token absorbs all the others
    torch.testing.assert_close(sel.values[0], x[6] + a @ x - a[6] * x[6])


def test_units_cls_newlines_and_order():
    # unit 0: [CLS] + 16 patches (the worked example); a newline; unit 1: [CLS] + 16 patches, shuffled order
    a, keys, x = worked_example()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    A = torch.cat([torch.tensor([0.5]), a, torch.tensor([0.0]), torch.tensor([0.5]), a[perm]])
    K = torch.cat([keys[:1], keys, keys[:1], keys[:1], keys[perm]])
    X = torch.cat([torch.ones(1, 16), x, torch.zeros(1, 16), 2 * torch.ones(1, 16), x[perm]])
    unit = torch.tensor([0] * 17 + [-1] + [1] * 17)
    patch = torch.cat([torch.tensor([-1]), torch.arange(16), torch.tensor([-1, -1]), perm])
    ref = prumerge(a, keys, x, *one_unit(16), (4, 4), k=2)
    sel = prumerge(A, K, X, unit, patch, (4, 4), k=2)
    # per unit [kept..., g]; [CLS] and the newline dropped; keep indices point at the right tokens
    assert sel.keep[:4].tolist() == [1 + j for j in (6, 0, 5, 10)]
    assert patch[sel.keep[4:]].tolist() == [6, 0, 5, 10]
    assert sel.order.tolist() == [0, 1, 2, 3, 8, 4, 5, 6, 7, 9]
    v = sel.values[sel.order]
    torch.testing.assert_close(v[:5], ref.values)
    torch.testing.assert_close(v[5:], ref.values)
    # cls_token keep: [CLS] first in its unit, unchanged
    sel = prumerge(A, K, X, unit, patch, (4, 4), k=2, cls_token="keep")
    v = sel.values[sel.order]
    assert sel.keep[:5].tolist() == [0, 7, 1, 6, 11] and v.shape == (12, 16)
    torch.testing.assert_close(v[0], torch.ones(16))
    torch.testing.assert_close(v[6], 2 * torch.ones(16))
    torch.testing.assert_close(v[1:6], ref.values)
    # fixed with [CLS] kept: it takes one of the unit's B slots
    sel = prumerge(A, K, X, unit, patch, (4, 4), k=2, cls_token="keep", budget_mode="fixed", budget=6)
    assert sel.num_out == 12


def test_options():
    m = PruMerge()
    assert m.config() == {"method": "prumerge", "budget": None, "position_mode": "keep", "variant": "plus",
                          "budget_mode": "adaptive", "k": 32, "cls_token": "drop", "qk_layer": -1,
                          "numerics": "ours", "empty_global": "drop"}
    assert m.vision_stage and m.vision_fullwidth_layers == (-1,) and not m.needs_vision_attention
    assert PruMerge(qk_layer=-2).vision_fullwidth_layers == (-2,)
    assert PruMerge(64, budget_mode="fixed").budget == 64
    for bad in (dict(variant="x"), dict(budget_mode="x"), dict(cls_token="x"), dict(k=0), dict(qk_layer=1.5)):
        with pytest.raises(ValueError):
            PruMerge(**bad)
    with pytest.raises(ValueError, match="adaptive"):
        PruMerge(64)
    with pytest.raises(ValueError, match="fixed"):
        PruMerge(budget_mode="fixed")
    for fam in ("qwen2_5_vl", "llava_onevision"):
        with pytest.raises(ValueError, match="CLS"):
            PruMerge().setup(num_layers=2, num_vision_layers=3, family=fam)
    PruMerge().setup(num_layers=2, num_vision_layers=3, family="video_llava")


# ------------------------------------------------------------------ tiny models


class Spy(PruMerge):
    """PruMerge that records its signals and selections."""

    name = "test_prumerge_spy"

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        self.seen = []

    def select_vision(self, sig):
        sel = super().select_vision(sig)
        self.seen.append((sig, sel))
        return sel


def run_spy(rt, inputs, budget=None, **opts):
    spy = Spy(budget, **opts)
    rt.prune(spy)
    rows = llm_visual_rows(rt, inputs)
    return spy, rows


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
@pytest.mark.parametrize("plus", [True, False])
def test_llm_input_equals_official_code_on_the_tower(rt, plus):
    inputs = make_batch(rt)
    spy, rows = run_spy(rt, inputs, variant="plus" if plus else "base")
    core = rt.model.model
    if rt.family == "video_llava":
        tower, pixels = core.video_tower, inputs["pixel_values_videos"].flatten(0, 1)
    else:
        tower, pixels = core.vision_tower, inputs["pixel_values"]
    with torch.no_grad():
        hs = tower(pixels, output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[-1]  # official hooks: the last layer's q_proj / k_proj outputs
        xn = layer.layer_norm1(hs[-2])
        q, k = layer.self_attn.q_proj(xn).float(), layer.self_attn.k_proj(xn).float()
        feats = hs[-2][:, 1:].float()  # select layer -2, patches (the frame's [CLS] dropped)
        per = pixels.shape[0] // 3
        for b in range(3):
            outs = []
            for i in range(b * per, (b + 1) * per):
                n = feats.shape[1]
                _, merged = official_prumerge(q[i:i + 1], k[i:i + 1], feats[i:i + 1], plus=plus,
                                              knn=min(32, n - 1), guards=True)
                outs.append(merged)
            want = core.multi_modal_projector(torch.cat(outs).to(hs[-2].dtype)[None])[0]
            assert rows[b].shape == want.shape
            torch.testing.assert_close(rows[b], want.to(rows[b].dtype), atol=1e-5, rtol=1e-4)


@ALL
def test_llm_rows_are_the_projected_values_fixed(rt):
    inputs = make_batch(rt)
    spy, rows = run_spy(rt, inputs, 5, budget_mode="fixed")
    proj = rt.model.model.multi_modal_projector
    for (sig, sel), got in zip(spy.seen, rows):
        v = sel.values if sel.order is None else sel.values[sel.order]
        with torch.no_grad():
            want = proj(v.to(sig.vision_features.dtype)[None])[0]
        torch.testing.assert_close(got, want.to(got.dtype))
        # every unit gives exactly B = 5 outputs (4 merged patches + g; NeXT newlines dropped)
        assert got.shape[0] == 5 * sig.num_units


def expected_adaptive_count(sig, plus=True):
    """Tokens per unit from the signals, by numpy (official arithmetic + our guards)."""
    a = sig.fullwidth_cls_attn[-1].numpy()
    unit, patch = sig.unit.numpy(), sig.patch.numpy()
    P = sig.grid[0] * sig.grid[1]
    total = 0
    for u in range(sig.num_units):
        sel = (unit == u) & (patch >= 0)
        au, pu = a[sel], patch[sel]
        n = au.size
        rho = official_outlier_ratio(torch.from_numpy(au))
        rho = rho if rho > 0 else 1 / n
        top = max(1, int(n * rho))
        kept = set(pu[np.argsort(-au, kind="stable")[:top]].tolist())
        if plus:
            stride = max(1, int(int(1 / rho) / 3))
            kept |= set(range(0, P - 1, stride)) & set(pu.tolist())
        total += len(kept) + (len(kept) < n)
    return total


@ALL
@pytest.mark.parametrize("plus", [True, False])
def test_tokens_entering_llm_adaptive(rt, plus):
    inputs = make_batch(rt)
    spy = Spy(variant="plus" if plus else "base")
    eng = rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    L = len(rt.model.model.language_model.layers)
    for (sig, sel), s in zip(spy.seen, eng.stats.samples):
        exp = expected_adaptive_count(sig, plus)
        assert sel.num_out == exp == s.visual_entering_llm
        assert s.visual_per_layer == [exp] * L and not s.vision_noop
        assert sel.targets.numel() <= sig.num_units  # one global token per unit (when something is pruned)


@ALL
@pytest.mark.parametrize("budget", [1, 3, 8])
def test_tokens_entering_llm_fixed(rt, budget):
    inputs = make_batch(rt)
    spy = Spy(budget, budget_mode="fixed")
    eng = rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    for (sig, sel), s in zip(spy.seen, eng.stats.samples):
        n = [int(((sig.unit == u) & (sig.patch >= 0)).sum()) for u in range(sig.num_units)]
        assert s.visual_entering_llm == sum(min(budget, m) for m in n) == sel.num_out


def test_video_cls_keep(runtimes):
    rt = runtimes["video-llava"]
    inputs = make_batch(rt)
    try:
        spy = Spy(4, budget_mode="fixed", cls_token="keep")
        eng = rt.prune(spy)
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [32] * 3  # 8 frames x ([CLS] + 2 + g)
        sig, sel = spy.seen[0]
        assert int((sig.patch[sel.keep] == -1).sum()) == 8  # each frame's [CLS], kept unchanged
    finally:
        rt.unprune()


def test_next_spatial_layout(runtimes):
    rt = runtimes["llava-next"]
    rt.processor.next_layout = "spatial"
    try:
        inputs = make_batch(rt)
        eng = rt.prune("prumerge", 6, budget_mode="fixed")
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [18, 18, 18]  # 3 crops x 6
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"

"""VScan (baselines/vscan.py): the official encode_images (local / global scans, merge) transcribed as a
reference at the official shapes, the LLM stage against the last prompt token's layer-K attention, and
the method on the three tiny CLIP families (counts). Cache == recompute, batch == alone, keep-all: 
tests/test_method_guarantees.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, layout, make_batch, slice_batch

import baselines.vscan  # noqa: F401  (registers "vscan")
from baselines.vscan import VScan, local_counts, local_layer_for, split_budget, vscan_stage1, window_side
from llava.ops import unit_layout
from llava.method import method_supports
from llava.ops import merge_tokens
from llava.attention_rows import rope_fn_for

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def outputs(x, sel):
    """The tokens a Selection feeds, in feeding order (what the engine materialises)."""
    out = torch.cat([x[sel.keep].float(), merge_tokens(x, sel)]) if sel.targets is not None else x[sel.keep]
    return out[sel.order] if sel.order is not None else out


# ------------------------------------------------------------------ the official code, transcribed


def official_window_cls_selection(image_attentions, visual_token_num, window_size=6):
    """VScan/llava/model/llava_arch.py ``window_cls_selection`` (Python loop, ``.item()`` per token)."""
    B, N = image_attentions.shape
    assert N == 24 * 24
    H = W = 24
    attn_map = image_attentions.view(B, H, W)
    num_windows_h = H // window_size
    num_windows_w = W // window_size
    total_windows = num_windows_h * num_windows_w
    k = visual_token_num // total_windows
    token_indices = []
    for b in range(B):
        indices_b = []
        for i in range(num_windows_h):
            for j in range(num_windows_w):
                window = attn_map[b, i * window_size:(i + 1) * window_size, j * window_size:(j + 1) * window_size]
                window_flat = window.reshape(-1)
                topk_values, topk_indices = torch.topk(window_flat, k)
                for idx in topk_indices:
                    dy, dx = divmod(idx.item(), window_size)
                    indices_b.append((i * window_size + dy) * W + (j * window_size + dx))
        token_indices.append(indices_b)
    return torch.tensor(token_indices)


def official_token_merging(image_features, index_mask, scaling=1):
    """``token_merging``; the one broadcast cosine line is evaluated in row chunks (same values, less
    memory: the official (B, N-T, T, D) temporary is 0.75 GB at D = 4096)."""
    B, N, D = image_features.shape
    T = index_mask.sum(dim=1)
    retained_tokens = torch.stack([image_features[b][index_mask[b]] for b in range(B)], dim=0)
    non_retained_tokens = torch.stack([image_features[b][~index_mask[b]] for b in range(B)], dim=0)
    if non_retained_tokens.shape[1] == 0:
        return image_features
    cosine_sim = torch.cat([
        F.cosine_similarity(non_retained_tokens[:, a:a + 32].unsqueeze(2), retained_tokens.unsqueeze(1), dim=3)
        for a in range(0, non_retained_tokens.shape[1], 32)], dim=1)
    nearest_token_indices = cosine_sim.argmax(dim=2)
    merge_count = torch.zeros(B, T[0], dtype=torch.int)
    merged_features = torch.zeros_like(retained_tokens)
    merged_features += retained_tokens * scaling
    merged_features.scatter_add_(1, nearest_token_indices.unsqueeze(-1).expand(-1, -1, D), non_retained_tokens)
    merge_count.scatter_add_(1, nearest_token_indices, torch.ones_like(nearest_token_indices, dtype=merge_count.dtype))
    merged_features /= (scaling + merge_count.unsqueeze(2))
    for b in range(B):
        image_features[b, index_mask[b]] = merged_features[b]
    return image_features


def official_encode_images(image_attentions, projected, visual_token_num):
    """``encode_images`` after the tower: image_attentions (24, B, 16, 576) = every layer's [CLS] row to
    the patches (``attentions[..., 0, 1:]``), projected (B, 576, D) = ``mm_projector`` output."""
    image_attentions = image_attentions.mean(dim=2)
    image_attentions_shallow = image_attentions[5]
    image_attentions_deep = image_attentions[-2]
    global_ratio = 0.5
    local_ratio = 1 - global_ratio
    local_indices = official_window_cls_selection(image_attentions_shallow, int(visual_token_num * local_ratio), 6)
    for b in range(projected.shape[0]):
        image_attentions_deep[b, local_indices[b]] = 0
    global_indices = torch.topk(image_attentions_deep, k=visual_token_num - int(visual_token_num * local_ratio), dim=1)[1]
    token_indices = torch.cat((local_indices, global_indices), dim=1)
    index_mask = torch.zeros(projected.shape[:2], dtype=torch.bool)
    index_mask.scatter_(1, token_indices, True)
    feats = official_token_merging(projected.clone(), index_mask, scaling=1)
    return local_indices, global_indices, index_mask, feats


@pytest.mark.parametrize("T", [96, 192, 100])  # 100: int(50) // 16 = 3 per window -> 48 + 50 = 98 tokens
def test_stage1_equals_official_encode_images(T):
    """Two 24 x 24 units (CLIP-L/14: 577 tokens, 16 heads; projected D = 4096) scanned as one sample:
    local set, global set and merged features equal the official per-image output."""
    g = torch.Generator().manual_seed(T)
    B, heads, D = 2, 16, 4096
    probs = torch.softmax(torch.randn(24, B, heads, 577, generator=g) * 3, dim=-1)  # [CLS] query rows
    image_attentions = probs[..., 1:].clone()  # feature_select: attentions[..., 0, 1:]
    projected = torch.randn(B, 576, D, generator=g)
    loc, glob, mask, feats = official_encode_images(image_attentions.clone(), projected, T)

    unit = torch.arange(B).repeat_interleave(576)
    patch = torch.arange(576).repeat(B)
    sel, l_mask, g_mask = vscan_stage1(image_attentions[5].permute(1, 0, 2).reshape(heads, -1),
                                       image_attentions[22].permute(1, 0, 2).reshape(heads, -1),
                                       projected.reshape(-1, D), unit, patch, (24, 24), T, return_scans=True)
    for b in range(B):
        own = slice(576 * b, 576 * (b + 1))
        assert set(l_mask[own].nonzero().flatten().tolist()) == set(loc[b].tolist())
        assert set(g_mask[own].nonzero().flatten().tolist()) == set(glob[b].tolist())
    assert sel.keep.numel() == 0 and sel.rule == "mean" and sel.space == "projected"
    assert sel.targets.tolist() == (mask.reshape(-1)).nonzero().flatten().tolist()  # ascending
    assert sel.targets.numel() == B * (T - (T // 2) % 16)
    torch.testing.assert_close(outputs(projected.reshape(-1, D), sel), feats[mask], atol=1e-5, rtol=1e-5)


def test_ties_to_the_lower_index_and_remainder_modes():
    # one 4 x 4 unit, uniform attention: 2 x 2 windows of 2 x 2 (window_side(4) = 2).
    # T = 8: k = 4 // 4 = 1 per window -> the first patch of each window: 0, 2, 8, 10;
    # global: the 4 lowest others: 1, 3, 4, 5.
    unit, patch = torch.zeros(16, dtype=torch.long), torch.arange(16)
    flat = torch.full((2, 16), 1 / 17)
    x = torch.randn(16, 8)
    sel, loc, glob = vscan_stage1(flat, flat, x, unit, patch, (4, 4), 8, return_scans=True)
    assert loc.nonzero().flatten().tolist() == [0, 2, 8, 10]
    assert glob.nonzero().flatten().tolist() == [1, 3, 4, 5]
    assert sel.targets.tolist() == [0, 1, 2, 3, 4, 5, 8, 10] and sel.order is None
    # T = 6: int(3) // 4 = 0 local (official: the quota is lost), global 3 -> 3 tokens;
    # remainder "global": the 3 go to the global scan -> 6
    sel = vscan_stage1(flat, flat, x, unit, patch, (4, 4), 6)
    assert sel.targets.tolist() == [0, 1, 2]
    sel = vscan_stage1(flat, flat, x, unit, patch, (4, 4), 6, remainder="global")
    assert sel.targets.tolist() == [0, 1, 2, 3, 4, 5]
    # the dropped tokens go to their most similar target (cosine), e.g. a copy of token 3 scaled up
    x2 = x.clone()
    x2[15] = 5 * x2[3]
    sel = vscan_stage1(flat, flat, x2, unit, patch, (4, 4), 8)
    assert int(sel.assign[15]) == sel.targets.tolist().index(3)
    assert (sel.assign[sel.targets] == -1).all()


def test_newlines_and_small_units_are_kept_in_place():
    # unit 0: 4 x 4 (pruned to T = 8), newline, unit 1: 6 tokens of a cut grid (kept whole, 6 <= 8)
    unit = torch.tensor([0] * 16 + [-1] + [1] * 6)
    patch = torch.tensor(list(range(16)) + [-1] + [0, 1, 4, 5, 8, 9])
    a = torch.rand(3, 23)
    sel = vscan_stage1(a, a, torch.randn(23, 4), unit, patch, (4, 4), 8)
    assert sel.keep.tolist() == list(range(16, 23)) and sel.targets.numel() == 8
    src = torch.cat([sel.keep, sel.targets])[sel.order]
    assert src.tolist() == sorted(src.tolist())  # ascending spatial (stock block) order
    # every unit fits: the identity
    sel = vscan_stage1(a, a, torch.randn(23, 4), unit, patch, (4, 4), 16)
    assert sel.targets is None and sel.is_identity(23)


# ------------------------------------------------------------------ options, budgets, layer mappings


def test_planned_local_counts_and_layout_give_the_same_selection():
    """The fast path's planned stage 1 (local_counts from the host structure + the planned unit layout: no
    host read) == the eager one, on a unit whose windows are cut (LLaVA-NeXT spatial_unpad-like)."""
    # 6 x 6 grid, window 3 (2 x 2 windows), T = 16: k = int(16 * 0.5) // 4 = 2 per window. Unit 0 has rows
    # 0-2 (windows 0, 1: 9 patches each) and patch 18 (row 3, col 0: window 2): 19 > 16 tokens, local picks
    # 2 + 2 + min(2, 1) + min(2, 0) = 5. Unit 1: all 36 patches -> 4 x 2 = 8. Unit 2: 10 patches <= 16 -> 0.
    patch = torch.cat([torch.arange(18), torch.tensor([18, -1]), torch.arange(36), torch.tensor([-1]),
                       torch.arange(10)])
    unit = torch.cat([torch.zeros(18), torch.tensor([0, -1]), torch.ones(36), torch.tensor([-1]),
                      torch.full((10,), 2)]).long()
    assert local_counts(unit, patch, (6, 6), 16, window=3) == (5, 8, 0)
    g = torch.Generator().manual_seed(0)
    n = unit.numel()
    loc, glob, feats = torch.rand(2, n, generator=g), torch.rand(2, n, generator=g), torch.randn(n, 8, generator=g)
    for remainder in ("drop", "global"):
        kw = dict(window=3, remainder=remainder)
        ref, local, _ = vscan_stage1(loc, glob, feats, unit, patch, (6, 6), 16, return_scans=True, **kw)
        assert int(local[unit == 0].sum()) == 5 and int(local[unit == 1].sum()) == 8
        got = vscan_stage1(loc, glob, feats, unit, patch, (6, 6), 16, layout=unit_layout(unit),
                           local_host=local_counts(unit, patch, (6, 6), 16, window=3), **kw)
        for a, b in ((ref.keep, got.keep), (ref.targets, got.targets), (ref.assign, got.assign),
                     (ref.order, got.order)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="planned"):
        vscan_stage1(loc, glob, feats, unit, patch, (6, 6), 16, layout=unit_layout(unit))


def test_budgets_options_and_layer_mappings():
    assert [split_budget(b) for b in (64, 128, 192, 6)] == [(96, 32), (192, 64), (288, 96), (9, 3)]
    m = VScan()  # official 96 / 32, on the reference model (CLIP-L/14 24 layers, 32-layer LLM)
    assert (m.stage1, m.stage2, m.llm_layers, m.position_mode) == (96, 32, (16,), "reindex")
    assert m.vision_cls_layers == (6, 23)  # attentions[5] -> hidden_states[6]; attentions[22] -> [23] = [-2]
    assert VScan(64).config()["stage1"] == 96 and VScan(128).stage2 == 64
    m.setup(num_layers=4, num_vision_layers=3, family="llava")  # tiny: local layer 0, global layer 1, K = 2
    assert (m.vision_cls_layers, m.llm_layers) == ((1, 2), (2,))
    m.setup(num_layers=40, num_vision_layers=24, family="llava")  # 13B
    assert m.llm_layers == (20,)
    assert [local_layer_for(n) for n in (24, 3, 12, 32)] == [5, 0, 2, 6]
    assert [window_side(g) for g in (24, 16, 4, 8, 3, 1)] == [6, 4, 2, 2, 3, 1]
    assert VScan(stage1=10, stage2=4, layer=8, scale_layers=False).llm_layers == (8,)
    for bad in (dict(budget=64, stage1=96), dict(budget=1), dict(stage1=0), dict(remainder="x"),
                dict(local_ratio=2.0), dict(window=0)):
        with pytest.raises(ValueError):
            b = bad.pop("budget", None)
            VScan(b, **bad)
    assert not method_supports("vscan", "qwen2_5_vl") and not method_supports("vscan", "llava_onevision")
    assert all(method_supports("vscan", f) for f in ("llava", "llava_next", "video_llava"))


# ------------------------------------------------------------------ the LLM stage


class _Spy(VScan):
    name = "vscan_spy_test"

    def select_llm(self, stage, sig):
        self.rows = getattr(self, "rows", []) + [sig.attention("last", layer="next")[:, 0].clone()]
        self.visual = sig.visual.clone()
        return super().select_llm(stage, sig)


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_stage2_is_the_last_token_row_of_layer_k(rt):
    """On a fixed prompt (one sample): the kept visual tokens are the top-K1 of the head-mean last-token
    row of LLMSignals.attention("last", "next"), and that row equals layer K's norm + q/k + RoPE on the
    hidden states after layer K-1 (official ``layer_prune``, positions contiguous after stage 1)."""
    one = slice_batch(make_batch(rt), 1, rt)
    spy = _Spy(6)  # 9 per image, then 3
    eng = rt.prune(spy)
    lm = rt.model.model.language_model
    K = spy.llm_layers[0]
    cap = {}
    h = lm.layers[K - 1].register_forward_hook(lambda m, a, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            rt.model(**one)
    finally:
        h.remove()
    row = spy.rows[0]
    keep = eng.selections[(0, 0)].keep
    assert keep.tolist() == torch.topk(row.mean(0)[spy.visual], 3).indices.sort().values.tolist()
    # independent recompute (official layer_prune, fp32 softmax)
    hid = cap["h"][0]
    S = hid.shape[0]
    layer = lm.layers[K]
    att = layer.self_attn
    d = att.head_dim
    with torch.no_grad():
        xn = layer.input_layernorm(hid)[None]
        q = att.q_proj(xn).view(1, S, -1, d).transpose(1, 2)
        k = att.k_proj(xn).view(1, S, -1, d).transpose(1, 2)
        cos, sin = lm.rotary_emb(xn, torch.arange(S)[None])
        q, k = rope_fn_for(att)(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        w = torch.softmax((q[0, :, -1:] @ k[0].transpose(1, 2)).float() / d ** 0.5, dim=-1)[:, 0]  # (H, S)
    torch.testing.assert_close(row, w, atol=1e-6, rtol=1e-5)
    start = int((one["input_ids"][0] == rt.model.config.image_token_id).nonzero()[0])
    assert spy.visual.tolist() == list(range(start, start + 9))
    ref = w.mean(0)[start:start + 9].topk(3).indices.sort().values
    assert keep.tolist() == ref.tolist()


# ------------------------------------------------------------------ tiny models


@ALL
def test_per_layer_counts_follow_the_schedule(rt):
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    for remainder in ("drop", "global"):
        eng = rt.prune("vscan", 6, remainder=remainder)  # 9 per unit after the tower, 3 per unit from layer 2
        with torch.no_grad():
            rt.model(**inputs)
        for b, (s, (sizes, newlines)) in enumerate(zip(eng.stats.samples, lay)):
            first = eng.selections[("vision", b)].num_out
            assert s.visual_candidates == sum(sizes) + newlines
            assert s.visual_per_layer == [first, first, min(first, 3 * len(sizes)), min(first, 3 * len(sizes))]
            if remainder == "global" or rt.family != "llava_next":  # NeXT 'drop': cut windows may lose picks
                assert first == sum(min(9, n) for n in sizes) + newlines
        if rt.family == "llava":
            assert [s.visual_per_layer for s in eng.stats.samples] == [[9, 9, 3, 3]] * 3
        if rt.family == "video_llava":  # 8 frames of 17 (16 patches + [CLS])
            assert [s.visual_per_layer for s in eng.stats.samples] == [[72, 72, 24, 24]] * 3

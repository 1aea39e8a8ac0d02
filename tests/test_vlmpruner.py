"""VLM-Pruner (baselines/vlmpruner.py): pivots, the buffered similarity, the greedy rounds and the recovery merge on
hand-built inputs with worked-out values, then the method on the tiny LLaVA against the stock model's own layer K-1
output and post-RoPE keys (its KV cache)."""

import math

import pytest
import torch
from conftest import make_batch, slice_batch

from baselines.vlmpruner import (VLMPruner, buffered_similarity, feature_similarity, greedy_select, grid_coords,
                                 pivot_tokens, recover)
from llava.method import get_method
from llava.models import load


def test_pivots_are_the_largest_l1_key_then_farthest_points():
    # L1 norms 3, 1.5, 2.5, 4, 3 -> first pivot 3 ([2, 2]). Distances to it: 2.236, 2.062, 4.610, -, 5.385 -> 4.
    # Nearest of {3, 4}: t0 min(2.236, 4.243) = 2.236, t1 min(2.062, 4.5) = 2.062, t2 min(4.610, 2.5) = 2.5 -> 2.
    keys = torch.tensor([[3.0, 0.0], [0.0, 1.5], [-1.5, -1.0], [2.0, 2.0], [0.0, -3.0]])
    for num in ("ours", "official"):
        assert pivot_tokens(keys, 3, num).tolist() == [3, 4, 2]
        assert pivot_tokens(keys, 1, num).tolist() == [3]
    assert pivot_tokens(keys.half(), 3, "official").tolist() == [3, 4, 2]


# 4 tokens on a 2 x 2 grid: t0 (0, 0), t1 (1, 0), t2 (0, 1), t3 (1, 1); norm 1 / (2 sqrt 2)
POS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
DIST = torch.cdist(POS, POS)
NORM = torch.full((4,), 1 / (2 * math.sqrt(2)))
SIM = torch.tensor([[1.0, 0.75, 0.7, 0.2],
                    [0.75, 1.0, 0.4, 0.1],
                    [0.7, 0.4, 1.0, 0.3],
                    [0.2, 0.1, 0.3, 1.0]])
F1 = 1 + 0.5 / (2 * math.sqrt(2))  # factor at grid distance 1: 1.176777


def test_buffered_similarity_by_hand():
    # candidates 1, 2, 3 against S = {0}: distances 1, 1, sqrt 2 -> factors F1, F1, 1.25
    b = buffered_similarity(SIM[1:, :1], DIST[1:, :1], NORM[1:])
    assert torch.allclose(b.flatten(), torch.tensor([0.75 * F1, 0.7 * F1, 0.2 * 1.25]), atol=1e-6)
    # against S = {0, 3}: every column scaled by the *nearest* selected token's distance (t1: 1 to both)
    b = buffered_similarity(SIM[[1]][:, [0, 3]], DIST[[1]][:, [0, 3]], NORM[[1]])
    assert torch.allclose(b, torch.tensor([[0.75 * F1, 0.1 * F1]]), atol=1e-6)


def test_greedy_rounds_by_hand():
    """Pivot 0, k = 3, batches of 2.
    Round 1 (tau 0.8): max buffered sims t1 .8826, t2 .8237, t3 .25 -> novelty order t3, t2, t1. Batch [t3, t2]:
    t3 joins (.25), t2 does not (.8237). Batch [t1] against {0, 3}: max(.75, .1) * F1 = .8826: no.
    Round 2 (tau 0.9): t2 max(.7, .3) * F1 = .8237, t1 .8826 -> order t2, t1; both pass but only one place is left:
    the more novel t2. Selected 0, 3, 2."""
    for num in ("ours", "official"):
        assert greedy_select(SIM, DIST, NORM, [0], 3, 0.8, 2, num) == [0, 3, 2]
    # a higher start threshold: round 1 takes t3 and t2 in the first batch
    assert greedy_select(SIM, DIST, NORM, [0], 3, 0.85, 2) == [0, 3, 2]
    # tau 0.2: nothing passes in the first batch of round 1 -> the walk stops below k (the official early end)
    assert greedy_select(SIM, DIST, NORM, [0], 3, 0.2, 2) == [0]
    # k reached by the pivots alone: nothing else
    assert greedy_select(SIM, DIST, NORM, [0, 1], 2, 0.8, 2) == [0, 1]


def test_recovery_merge_arithmetic():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 0.0], [0.0, 8.0]])
    sim = torch.zeros(5, 5)
    sim[2, 0], sim[2, 1] = 0.6, 0.2  # t2 -> 0 (0.6)
    sim[3, 0], sim[3, 1] = 0.2, 0.1  # t3 -> 0 (0.2)
    sim[4, 0], sim[4, 1] = -0.5, -0.3  # t4 -> 1 (-0.3): a negative total, 1 left as it is
    out = recover(h, sim, torch.tensor([0, 1]))
    # t0: 0.3 [1, 0] + 0.7 (0.75 [4, 4] + 0.25 [8, 0]) = [0.3 + 0.7 * 5, 0.7 * 3] = [3.8, 2.1]
    assert torch.allclose(out, torch.tensor([[3.8, 2.1], [0.0, 2.0]]), atol=1e-6)
    assert torch.allclose(recover(h, sim, torch.tensor([0, 1]), "official"), out, atol=1e-6)
    # a tie goes to the earlier column: order [1, 0] sends t3 (0.2 vs 0.2 after the edit) to 1
    # and t4 now goes to 0 (-0.1 > -0.3): t0's total 0.6 - 0.1 = 0.5, weights 1.2 and -0.2:
    # t0 = 0.3 [1, 0] + 0.7 (1.2 [4, 4] - 0.2 [0, 8]) = [3.66, 2.24]; t1 = 0.3 [0, 2] + 0.7 [8, 0] = [5.6, 0.6]
    sim[3, 1] = 0.2
    sim[4, 0] = -0.1
    o = recover(h, sim, torch.tensor([1, 0]))
    assert torch.allclose(o[1], torch.tensor([3.66, 2.24]), atol=1e-5)
    assert torch.allclose(o[0], torch.tensor([5.6, 0.6]), atol=1e-6)
    # nothing discarded: the rows unchanged
    assert torch.equal(recover(h, sim, torch.arange(5)), h)


def test_feature_similarity_uses_the_top_variance_channels():
    # channel 0 varies most, channel 1 is constant, channel 2 varies a little; with 2 channels: channels 0 and 2
    h = torch.tensor([[1.0, 5.0, 0.0], [-1.0, 5.0, 1.0], [2.0, 5.0, 0.0]])
    s = feature_similarity(h, 2)
    u = torch.nn.functional.normalize(h[:, [0, 2]], dim=-1)
    assert torch.allclose(s, u @ u.T, atol=1e-6)
    assert torch.allclose(feature_similarity(h, 2, "official"), s, atol=1e-6)
    assert torch.allclose(feature_similarity(h, 256), feature_similarity(h, 3), atol=1e-7)  # all channels when fewer


def test_options_counts_and_refusals():
    m = get_method("vlmpruner")
    assert (m.layer, m.keep_tokens, m.reduction_ratio, m.pivots, m.threshold, m.token_batch, m.channels) == \
        (2, None, 0.889, 4, 0.8, 16, 256)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.llm_layers == (2,) and m.rounding_rule == "round"
    assert m.capture_refusal() == m.capture_reason
    for r, k in ((0.667, 192), (0.778, 128), (0.889, 64)):  # round(576 * (1 - r))
        mm = VLMPruner(reduction_ratio=r)
        mm.setup(num_layers=32, num_vision_layers=24, family="llava")
        assert mm.kept_count(576) == k
    mm.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")  # the Qwen2-VL rule: int(576 * 0.111) = 63
    assert mm.rounding_rule == "floor" and mm.kept_count(576) == 63
    m = VLMPruner(keep_tokens=64)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.kept_count(576) == 64 and m.kept_count(40) == 40
    assert m.layer_counts(576) == [576] * 2 + [64] * 30
    m = VLMPruner(64)  # equivalent tokens: (32 * 64 - 2 * 576) / 30 = 896 / 30 = 29.87 -> 30
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.kept_count(576) == 30
    m.setup(num_layers=4, num_vision_layers=3, family="llava")  # K = 2 of 32 -> 1 of 4 layers
    assert m.llm_layers == (1,)
    for bad in ({"keep_tokens": -1}, {"keep_tokens": 2.5}, {"rounding": "ceil"}, {"numerics": "fp16"},
                {"layer": 0}, {"reduction_ratio": 1.5}, {"pivots": 0}):
        with pytest.raises(ValueError, match="vlmpruner"):
            VLMPruner(**bad)
    with pytest.raises(ValueError, match="either a budget"):
        VLMPruner(64, keep_tokens=64)


@pytest.fixture(scope="module")
def stock():
    """The unpruned twin (same seed, same weights): its layer K-1 output and cached post-RoPE keys are the
    reference."""
    return load("tiny:llava", seed=1)


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
@pytest.mark.parametrize("numerics", ["ours", "official"])
def test_selection_and_rewrite_against_the_stock_model(rt, stock, numerics):
    """K = 2 of 32 -> 1 of 4: layer 0's output hidden states (hidden_states[1]) and its cached keys (post-RoPE),
    the 4 x 4 patch grid of the tiny tower (norm 1 / (4 sqrt 2)); the pruned model's layer-1 input holds the
    kept tokens' rewritten rows."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        out = stock.model(**one, output_hidden_states=True, use_cache=True)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    h = out.hidden_states[1][0, vis]
    keys = out.past_key_values.layers[0].keys[0][:, vis].transpose(0, 1).reshape(vis.numel(), -1)
    n, k = vis.numel(), 6
    assert n == 16
    piv = pivot_tokens(keys, 4, numerics)
    sim = feature_similarity(h, 256, numerics)
    pos = torch.stack([torch.arange(16) % 4, torch.arange(16) // 4], -1).float()
    chosen = greedy_select(sim, torch.cdist(pos, pos), torch.full((16,), 1 / (4 * math.sqrt(2))), piv.tolist(), k,
                           numerics=numerics)
    assert len(chosen) == k
    cols = torch.tensor(chosen) if numerics == "official" else torch.tensor(sorted(chosen))
    rows = recover(h, sim, cols, numerics)
    want_keep, o = cols.sort()
    want_rows = rows[o]
    assert not torch.allclose(want_rows, h[want_keep])  # the recovery really rewrote some kept rows

    seen = {}
    eng = rt.prune("vlmpruner", None, keep_tokens=k, numerics=numerics)
    hook = rt.model.model.language_model.layers[1].register_forward_pre_hook(
        lambda mod, args, kw: seen.update(h=(args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            rt.model(**one)
    finally:
        hook.remove()
    sel = eng.selections[(0, 0)]
    assert torch.equal(sel.keep, want_keep)
    assert torch.allclose(sel.values, want_rows, atol=1e-6)
    assert eng.stats.samples[0].visual_per_layer == [16, 6, 6, 6]
    first = int(vis[0])
    got = seen["h"][0, first:first + k]  # the kept visual rows follow the prefix, in their original order
    assert torch.allclose(got, want_rows, atol=1e-6)


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_a_count_below_the_pivots_keeps_the_pivots_in_the_reference_mode(rt, stock):
    """The official walk starts from all its kappa = 4 pivots: a ratio whose count is below 4 (16 tokens at 0.889:
    round(16 * 0.111) = 2) keeps the 4 pivots there (found by the Qwen2-VL parity run, where small images give such
    counts), the other 12 merged into them; ours keeps the count, 2."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        out = stock.model(**one, use_cache=True)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    keys = out.past_key_values.layers[0].keys[0][:, vis].transpose(0, 1).reshape(vis.numel(), -1)
    piv = pivot_tokens(keys, 4, "official")
    m = VLMPruner(reduction_ratio=0.889, numerics="official")
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert m.kept_count(16) == 4 and m.kept_count(3) == 3
    eng = rt.prune("vlmpruner", None, reduction_ratio=0.889, numerics="official")
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, piv.sort().values)
    eng = rt.prune("vlmpruner", None, reduction_ratio=0.889)
    with torch.no_grad():
        rt.model(**one)
    assert eng.selections[(0, 0)].keep.numel() == 2


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_grid_coordinates_come_from_the_layout(rt):
    """The tokens' (column, row) and grid norm from the vision signals (not a constant): the tiny tower's 4 x 4."""
    got = {}

    class Spy(VLMPruner):
        name = "vlmpruner"

        def select_llm(self, stage, sig):
            got["pos"], got["norm"] = grid_coords(sig.vision, sig.origin)
            return super().select_llm(stage, sig)

    one = slice_batch(make_batch(rt), 0, rt)
    rt.prune(Spy(keep_tokens=6))
    with torch.no_grad():
        rt.model(**one)
    ar = torch.arange(16)
    assert torch.equal(got["pos"], torch.stack([ar % 4, ar // 4], -1).float())
    assert torch.allclose(got["norm"], torch.full((16,), 1 / (4 * math.sqrt(2))))


def test_grid_coordinates_of_several_units_and_newlines():
    """Two units with their own grids (2 x 3 and 1 x 2) and a newline token after the first unit's row."""
    class V:
        patch = torch.tensor([0, 1, 2, -1, 3, 4, 5, 0, 1])
        unit = torch.tensor([0, 0, 0, -1, 0, 0, 0, 1, 1])
        unit_grid = [(2, 3), (1, 2)]
        grid = (2, 3)
    pos, norm = grid_coords(V, torch.arange(9))
    assert pos.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1], [1, 1], [2, 1], [0, 0], [1, 0]]
    assert torch.allclose(norm, torch.tensor([1 / math.sqrt(13)] * 7 + [1 / math.sqrt(5)] * 2))


class _Rewrite(VLMPruner):
    """Test double of the engine extension: keep the first 3 visual tokens, their rows entering layer K rewritten
    as 2 * h + 1 (Selection.values in an llm stage)."""

    name = "vlmpruner"

    def select_llm(self, stage, sig):
        from llava.selection import Selection
        keep = torch.arange(3, device=sig.visual.device)
        return Selection(keep=keep, values=sig.hidden[sig.visual[keep]] * 2 + 1)


@pytest.mark.parametrize("rt", ["llava", "llava-next", "qwen2.5-vl", "qwen3-vl"], indirect=True)
def test_llm_stage_values_rewrite_the_kept_rows_on_every_family(rt):
    """Selection.values in an llm stage (eager engine): the kept tokens enter layer K with the method's rows (cast
    to the model dtype), the other rows untouched; Qwen3-VL's DeepStack rows follow the kept tokens."""
    one = slice_batch(make_batch(rt), 0, rt)
    seen = {}
    eng = rt.prune(_Rewrite(keep_tokens=3))
    layers = eng.lm.layers
    K = eng.method.llm_layers[0]
    hooks = [layers[K - 1].register_forward_hook(lambda m, a, out: seen.update(before=(out[0] if isinstance(out, tuple) else out).clone())),
             layers[K].register_forward_pre_hook(
                 lambda m, a, kw: seen.update(after=(a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)]
    try:
        with torch.no_grad():
            rt.model(**one)
    finally:
        for h in hooks:
            h.remove()
    before, after = seen["before"][0], seen["after"][0]
    vis = eng.selections[(0, 0)]
    assert vis.values is not None and eng.stats.samples[0].visual_per_layer[K] == 3
    ids = one["input_ids"][0]
    img = torch.nonzero(torch.isin(ids, torch.tensor([rt.model.config.image_token_id,
                                                      getattr(rt.model.config, "video_token_id", -1) or -1]))).flatten()
    first = int(img[0])
    want = before[img[:3]] * 2 + 1
    if K - 1 < 3 and rt.family == "qwen3_vl":  # DeepStack adds its rows after layer K-1: compare up to them
        assert after.shape[0] == before.shape[0] - (img.numel() - 3)
    else:
        assert torch.allclose(after[first:first + 3], want, atol=1e-6)
    assert torch.equal(after[:first], before[:first])  # the prefix untouched
    assert torch.equal(after[first + 3:], before[int(img[-1]) + 1:])  # the text after the image untouched


def test_the_fast_path_runs_it_eagerly_and_says_why():
    """``llava.load(..., fast=True)``: the prefill is refused for capture with the reason and runs on the eager engine;
    the tokens equal the eager model's."""
    from fastpath_util import BACKEND, generate, inputs

    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=8, fast_backend=BACKEND)
    eager = load("tiny:llava", seed=1)
    eng = fast.prune("vlmpruner", None, keep_tokens=6)
    assert "greedy" in eng.fast.refusal
    batch = inputs(fast, 0)
    toks, _ = generate(fast, batch)
    assert eng.stats.path == "eager" and "greedy" in eng.stats.path_reason
    eager.prune("vlmpruner", None, keep_tokens=6)
    assert torch.equal(toks, generate(eager, batch)[0])

"""SparseVLM (baselines/sparsevlm.py): raters, scores, SparseVLM+ gravity / head selection, the
density-peak recycling and the schedules on hand-built values, then the method on the tiny models
(sparse layers 2/6/15 of 32 = engine stages 3/7/16, mapped to 1/2/3 of the 4-layer LLM)."""

import math

import pytest
import torch
from conftest import FAMILIES, make_batch, slice_batch

from baselines.pdrop import equivalent_tokens
from baselines.sparsevlm import (SparseVLM, density_peak_clusters, rater_scores, recycle_pruned, recycled_count,
                                 rope_gravity, select_heads, select_raters, sparsevlm_layer_counts)
from llava.ops import merge_tokens
from llava.models import load
from llava.selection import Selection

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def at_depth(m, depth=32):
    m.setup(num_layers=depth, num_vision_layers=24, family="llava")
    return m


# ------------------------------------------------------------------------------ pure functions


def test_text_raters_on_a_3x4_example():
    # T = identity (4 text tokens), so V T^T = V (3 visual x 4 text):
    #   row 0 [ln3, ln3, 0, 0] -> softmax [3, 3, 1, 1] / 8 = [.375, .375, .125, .125]
    #   row 1 [ln3, 0, 0, ln3] -> [.375, .125, .125, .375]
    #   row 2 [0, 0, ln7, 0]   -> [.1, .1, .7, .1]
    # mean over visual: [.2833, .2, .3167, .2]; mean relevance = 1/4 (rows sum to 1)
    # raters = relevance > .25 -> text tokens 0 and 2
    l3, l7 = math.log(3), math.log(7)
    v = torch.tensor([[l3, l3, 0, 0], [l3, 0, 0, l3], [0, 0, l7, 0.0]])
    assert select_raters(v, torch.eye(4)).tolist() == [0, 2]


def test_rater_scores_and_head_selection():
    # (H=3, R=2 raters, N=3 visual) rater->visual attention
    a = torch.tensor([[[.5, .25, .25], [.25, .25, .5]],   # head 0: mass 2.0
                      [[0., 0., .5], [0., 0., .5]],       # head 1: mass 1.0
                      [[.25, .5, .25], [.5, .5, 0.]]])    # head 2: mass 2.0
    # all heads: rater 0 -> [.25, .25, .3333], rater 1 -> [.25, .25, .3333] -> visual 2 ranks first
    torch.testing.assert_close(rater_scores(a), torch.tensor([.25, .25, 1 / 3]))
    # SparseVLM+ keeps the 2 heads with the largest mass: 0 and 2 (tie -> lower first) ->
    # [.375, .375, .25] per rater: visual 2 now ranks last
    heads = select_heads(a, 2)
    assert heads.tolist() == [0, 2]
    torch.testing.assert_close(rater_scores(a[heads]), torch.tensor([.375, .375, .25]))


def test_rope_gravity_equals_rotated_all_ones_query_and_key():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16, theta 1e4
    pos = torch.tensor([[0, 3, 7, 20, 21]])
    ones = torch.ones(1, 1, 5, 16)
    cos, sin = LlamaRotaryEmbedding(cfg)(ones, pos)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    ref = (q[0, 0] @ k[0, 0].T) / 4.0  # official: matmul(q, k^T) / sqrt(head_dim)
    g = rope_gravity(pos[0], pos[0], 16, 10000.0)
    torch.testing.assert_close(g.float(), ref, atol=1e-5, rtol=1e-5)
    # same position: d / sqrt(d) = 4; adjacent positions: 2 * sum_m cos(w_m) / 4
    assert float(g[0, 0]) == pytest.approx(4.0)
    w = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert float(g[4, 3]) == pytest.approx(float(2 * torch.cos(w).sum() / 4))


def test_density_peak_clustering_on_hand_placed_points():
    # 1-D points (C = 1, so dist = |xi - xj|), 3 clusters -> density from the 3 nearest (self incl.):
    #   x:            0      0.5     2      10     10.4    11.5    20
    #   mean sq.:   1.417   .833   2.083   .803   .457    1.153   54.8   (density = exp(-.))
    #   denser order: p4 > p3 > p1 > p5 > p0 > p2 > p6
    #   delta (to nearest denser): p4 = max dist 20, p3 .4, p1 9.5, p5 1.1, p0 .5, p2 1.5, p6 8.5
    #   delta*density: p4 12.67, p1 4.13, p5 .347, p2 .187, p3 .179, p0 .121, p6 ~0
    # centres = p4, p1, p5 (score order); p0, p2 -> p1; p3 -> p4; p6 -> p5 (8.5 < 9.6)
    x = torch.tensor([0, 0.5, 2, 10, 10.4, 11.5, 20]).view(-1, 1)
    centres, assign = density_peak_clusters(x, 3)
    assert centres.tolist() == [4, 1, 5]
    assert assign.tolist() == [1, 1, 1, 0, 0, 2, 2]
    # one cluster -> knn = 1: every density is exp(0) = 1; the tie makes p0 the densest, its delta is
    # the largest distance (20) while every other delta is a gap to a lower index (< 20): centre p0
    c1, a1 = density_peak_clusters(x, 1)
    assert c1.tolist() == [0] and a1.tolist() == [0] * 7
    # knn given explicitly (3): density as above, one centre = the top score p4
    c2, _ = density_peak_clusters(x, 1, knn=3)
    assert c2.tolist() == [4]


def test_recycling_counts_and_merge():
    # int(P * 0.3) + 1 recycled, int(m / 10) + 1 clusters: the 192 schedule's first stage prunes
    # 276 -> 83 -> 9 clusters; 110 -> 34 -> 4; 10 -> 4 -> 1
    assert [recycled_count(p) for p in (276, 110, 10, 2, 0)] == [9, 4, 1, 1, 0]
    # 8 visual tokens, top-2 kept (0: .9, 2: .8); pruned P = 6 -> m = int(1.8) + 1 = 2 recycled: the
    # best pruned by score, 6 (.4) and 3 (.3); int(2/10) + 1 = 1 cluster. With knn = 1 both
    # densities are exp(0) = 1: the tie goes to the first (token 6), which becomes the centre.
    scores = torch.tensor([.9, .1, .8, .3, .2, .05, .4, .15])
    hidden = torch.arange(16.0).view(8, 2)
    targets, assign = recycle_pruned(scores, torch.tensor([1, 3, 4, 5, 6, 7]), hidden)
    assert targets.tolist() == [6]
    assert assign.tolist() == [-1, -1, -1, 0, -1, -1, 0, -1]
    sel = Selection(keep=torch.tensor([0, 2]), targets=targets, assign=assign, rule="mean")
    sel.validate(8)
    torch.testing.assert_close(merge_tokens(hidden, sel), ((hidden[6] + hidden[3]) / 2)[None])


def test_official_schedules_and_their_layer_average():
    # v1 192 on 32 layers: retained 300/200/110 after layers 2/6/15 (engine stages 3/7/16); with
    # recycling: 576 - 300 = 276 pruned -> +9 = 309; 309 - 200 = 109 -> m = 33 -> +4 = 204;
    # 204 - 110 = 94 -> m = 29 -> +3 = 113.
    # E = (3*576 + 4*309 + 9*204 + 16*113) / 32 = (1728 + 1236 + 1836 + 1808) / 32 = 206.5
    m = at_depth(SparseVLM(192))
    assert m.llm_layers == (3, 7, 16) and m.position_mode == "reindex" and m.recycle
    lc = m.layer_counts(576)
    assert lc == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert equivalent_tokens(lc) == 206.5
    # without recycling: (1728 + 1200 + 1800 + 1760) / 32 = 202.75 (the spec's "about 203")
    assert equivalent_tokens(sparsevlm_layer_counts(576, (3, 7, 16), (300, 200, 110), 32, False)) == 202.75
    # v2 192: 300/200/118, no recycling, kept positions: (1728 + 1200 + 1800 + 1888) / 32 = 206.75
    m2 = at_depth(SparseVLM(192, version="v2"))
    assert (m2.position_mode, m2.recycle, m2.gravity, m2.heads) == ("keep", False, True, 14)
    assert equivalent_tokens(m2.layer_counts(576)) == 206.75
    for budget, counts in ((128, (303, 110, 36)), (96, (238, 48, 26)), (64, (66, 30, 17))):
        assert at_depth(SparseVLM(budget)).stage_counts(576) == counts
    assert at_depth(SparseVLM(128, version="v2")).stage_counts(576) == (238, 108, 60)
    # 4-layer tiny LLM, N = 136: (70, 47, 25) -> 32-layer retained total 3*136 + 4*70 + 9*47 + 16*25
    # = 1511 -> 188.875 on 4 layers, minus 136 = 52.875, alpha = 52.875 / 142 = .3724 ->
    # 26.07, 17.50, 9.31 -> (26, 18, 9); recycling: 136 - 26 = 110 -> +4 = 30; 30 - 18 = 12 ->
    # m = 4 -> +1 = 19; 19 - 9 = 10 -> +1 = 10
    t = at_depth(SparseVLM(192), 4)
    assert t.llm_layers == (1, 2, 3)
    assert t.stage_counts(136) == (26, 18, 9)
    assert t.layer_counts(136) == [136, 30, 19, 10]


def test_options():
    assert SparseVLM().budget == 192  # RETAIN_TOKN's default
    with pytest.raises(ValueError, match="no official"):
        SparseVLM(100)
    with pytest.raises(ValueError, match="either"):
        SparseVLM(192, schedule=(300, 200, 100))
    with pytest.raises(ValueError):
        SparseVLM(version="v3")
    m = SparseVLM(version="v2", position_mode="reindex", recycle=True, heads=0)
    assert (m.position_mode, m.recycle, m.heads) == ("reindex", True, 0)
    assert at_depth(SparseVLM(schedule=(100, 50, 10))).stage_counts(576) == (100, 50, 10)


# ------------------------------------------------------------------------------ tiny models


@ALL
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_per_layer_counts(rt, version):
    eng = rt.prune("sparsevlm", 192, version=version)
    with torch.no_grad():
        rt.model(**make_batch(rt))
    for s in eng.stats.samples:
        assert s.visual_per_layer == eng.method.layer_counts(s.visual_candidates)
    exp = {("llava", "v1"): [16, 4, 3, 2],  # retained (3, 2, 1) + one cluster at every stage
           ("video_llava", "v1"): [136, 30, 19, 10],  # worked out in the schedule test
           # v2 (300, 200, 118) -> (8, 5, 3) for N = 16: total 48 + 32 + 45 + 48 = 173 -> 21.625,
           # alpha = 5.625 / 16 -> 2.81, 1.76, 1.05 -> (3, 2, 1), no recycling
           ("llava", "v2"): [16, 3, 2, 1]}
    if (rt.family, version) in exp:
        assert [s.visual_per_layer for s in eng.stats.samples] == [exp[rt.family, version]] * 3


@pytest.fixture(scope="module")
def eager():
    return load("tiny:video-llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["video-llava"], indirect=True)
def test_first_stage_against_the_eager_model(rt, eager):
    """Independent reference from the unpruned eager model: raters from its input embeddings,
    scores from layer 0's own attention (the sparse layer that ran), recycling on layer 0's output."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        out = eager.model(**one, output_attentions=True, output_hidden_states=True)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.video_token_id).flatten()
    after = torch.arange(int(vis.max()) + 1, ids.numel())
    emb = out.hidden_states[0][0]
    raters = select_raters(emb[vis], emb[after])
    att = out.attentions[0][0].mean(0)  # (S, S), head mean of decoder layer 0
    scores = att[after[raters]][:, vis].mean(0)
    keep = torch.topk(scores, 26).indices.sort().values  # 26 = stage count for N = 136 (above)
    pruned = torch.tensor(sorted(set(range(136)) - set(keep.tolist())))
    targets, assign = recycle_pruned(scores, pruned, out.hidden_states[1][0][vis])
    eng = rt.prune("sparsevlm", 192)
    with torch.no_grad():
        rt.model(**one)
    sel = eng.selections[(0, 0)]
    assert torch.equal(sel.keep, keep)
    assert torch.equal(sel.targets, targets) and torch.equal(sel.assign, assign) and sel.rule == "mean"
    assert targets.numel() == 4  # 110 pruned -> 34 recycled -> 4 clusters


@pytest.mark.parametrize("rt", ["video-llava"], indirect=True)
@pytest.mark.parametrize("gravity,heads", [(True, 2), (False, 1)])
def test_v2_first_stage_gravity_and_heads_against_the_eager_model(rt, eager, gravity, heads):
    """SparseVLM+: layer 0's rater rows (divided by the RoPE gravity of their positions), the
    ``heads`` heads (of 4) with the largest rater->visual mass, no recycling."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        out = eager.model(**one, output_attentions=True, output_hidden_states=True)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.video_token_id).flatten()
    after = torch.arange(int(vis.max()) + 1, ids.numel())
    emb = out.hidden_states[0][0]
    rows = after[select_raters(emb[vis], emb[after])]
    pos = torch.arange(ids.numel())  # an unpadded sample: positions 0..S-1
    att = out.attentions[0][0][:, rows][:, :, vis].double()
    if gravity:
        att = att / rope_gravity(pos[rows], pos[vis], 16)[None]
    k = 28  # v2 192 for N = 136 on 4 layers: (70, 47, 27) -> alpha = 56.875 / 144 -> (28, 19, 11)
    expected = torch.topk(rater_scores(att[select_heads(att, heads)]), k).indices.sort().values
    if not gravity:  # on this sample the single best head disagrees with the mean of all heads
        assert not torch.equal(expected, torch.topk(rater_scores(att), k).indices.sort().values)
    eng = rt.prune("sparsevlm", 192, version="v2", heads=heads, gravity=gravity)
    assert eng.method.stage_counts(136) == (28, 19, 11)
    with torch.no_grad():
        rt.model(**one)
    sel = eng.selections[(0, 0)]
    assert torch.equal(sel.keep, expected) and sel.targets is None


@ALL
def test_v1_merges_recycled_clusters_at_every_stage(rt):
    """Version 1 recycles pruned tokens into merged clusters at each of its three stages, every sample
    (cached generation == recompute: tests/test_method_guarantees.py)."""
    eng = rt.prune("sparsevlm", 192, version="v1")
    with torch.no_grad():
        rt.model(**make_batch(rt))
    assert all(eng.selections[(s, b)].targets.numel() > 0 for s in range(3) for b in range(3))

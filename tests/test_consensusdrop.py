"""ConsensusDrop (our reconstruction): worked examples of the fusion rules, and integration."""

import pytest
import torch
from conftest import FAMILIES, make_batch

from consensusdrop import adaptive_dominant, consensus_scores, order_desc, select_dominant, split_budget, unit_budgets
from llava.method import BudgetError

# 6 tokens. r_v (by s_v): 0, 4, 2, {3, 5 tie -> 3 first}, 1  => r_v = [1, 6, 3, 4, 2, 5]
#           r_x (by s_x): 1, 2, 5, 3, 4, 0                  => r_x = [6, 1, 2, 4, 5, 3]
S_V = torch.tensor([0.30, 0.05, 0.20, 0.10, 0.25, 0.10])
S_X = torch.tensor([0.01, 0.40, 0.30, 0.05, 0.02, 0.22])


def test_rrf_by_hand():
    c = consensus_scores(S_V, S_X, "rrf", rrf_k=60)
    expect = [1 / 61 + 1 / 66, 1 / 66 + 1 / 61, 1 / 63 + 1 / 62, 1 / 64 + 1 / 64, 1 / 62 + 1 / 65, 1 / 65 + 1 / 63]
    assert c.tolist() == pytest.approx(expect)
    # order: 2 (.032002), then 0 and 1 tie (.031545) -> higher s_v first: 0, 1; then 4, 5, 3
    assert order_desc(c, S_V).tolist() == [2, 0, 1, 4, 5, 3]
    assert select_dominant(S_V, S_X, 3, "rrf").tolist() == [0, 1, 2]


def test_fusion_differs_from_either_single_signal():
    assert select_dominant(S_V, S_X, 3, "encoder_only").tolist() == [0, 2, 4]
    assert select_dominant(S_V, S_X, 3, "cross_only").tolist() == [1, 2, 5]
    # borda: (6 - r_v) + (6 - r_x) = [5, 5, 7, 4, 5, 4]; ties at 5 by s_v: 0 (.30), 4 (.25), 1 (.05)
    assert consensus_scores(S_V, S_X, "borda").tolist() == [5, 5, 7, 4, 5, 4]
    assert select_dominant(S_V, S_X, 3, "borda").tolist() == [0, 2, 4]


def test_weights_and_k_shift_the_consensus():
    # all weight on the encoder list reproduces encoder_only
    assert select_dominant(S_V, S_X, 3, "rrf", w_v=1.0, w_x=0.0).tolist() == [0, 2, 4]
    assert select_dominant(S_V, S_X, 3, "rrf", w_v=0.0, w_x=1.0).tolist() == [1, 2, 5]


def test_adaptive_by_hand():
    # D=4, n0 = floor(.25 * 4) = 1: guaranteed 1 (cross list head) and 0 (encoder list head).
    # remaining u = s_x of [2,5,3,4,0] = [.30,.22,.05,.02,.01], w = s_v of [4,2,3,5,1] = [.25,.20,.10,.10,.05]
    # split 2: k_x=1 -> .30*.25 = .075 (k_x=0 or 2 -> 0) => one more each: 2 and 4
    assert adaptive_dominant(S_V, S_X, 4).tolist() == [0, 1, 2, 4]
    # overlap: make token 0 also the cross list's second -> encoder list replaces it by its next best
    s_x = torch.tensor([0.35, 0.40, 0.30, 0.05, 0.02, 0.22])
    # l_x = [1, 0, 2, 5, 3, 4], l_v = [0, 4, 2, 3, 5, 1]; u = [.35,.30,...], w = [.25,.20,...]
    # split 2: k_x=1 -> .35*.25 => cross picks [1, 0]; encoder wants 2: 0 taken -> 4, 2 => [0, 1, 2, 4]
    assert adaptive_dominant(S_V, s_x, 4).tolist() == [0, 1, 2, 4]


def test_budget_splits():
    assert [split_budget(b, 0.15625, True) for b in (64, 128, 192, 32, 17)] == \
        [(54, 10), (108, 20), (162, 30), (27, 5), (14, 3)]
    assert split_budget(64, 0.15625, False) == (64, 0)
    assert split_budget(64, 0.15625, True, dominant=60) == (60, 4)
    with pytest.raises(BudgetError, match="must equal the budget"):  # found per unit: one `error:` line
        split_budget(64, 0.15625, True, dominant=60, contextual=10)
    assert unit_budgets(10, 3, "total") == [4, 3, 3]
    assert unit_budgets(10, 3, "per_crop") == [10, 10, 10]


ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)
PER_UNIT = {"llava": 8, "llava_next": 8, "video_llava": 6}


def test_encoder_only_without_merge_is_the_clip_cls_top_k(runtimes):
    """Independent check of the signal wiring: transformers' eager CLIP attention, [CLS] row, top-8."""
    rt = runtimes["llava"]
    inputs = make_batch(rt)
    # select="rank" (pinned because the default maxmin spreads the picks over the features): the top-k by
    # s_v alone; this test checks the s_v wiring
    eng = rt.prune("consensusdrop", 8, fusion="encoder_only", merge="none", select="rank")
    with torch.no_grad():
        rt.model(**inputs)
    tower = rt.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tower(inputs["pixel_values"], output_attentions=True).attentions[1]  # select layer -2 of 3
    finally:
        tower.set_attn_implementation("sdpa")
    cls_row = att[:, :, 0, 1:].mean(1)  # (B, 16) head-mean [CLS] -> patch
    for b in range(3):
        expect = torch.topk(cls_row[b], 8).indices.sort().values
        assert eng.selections[("vision", b)].keep.tolist() == expect.tolist()


def test_video_frame_cls_takes_a_dominant_slot(runtimes):
    rt = runtimes["video-llava"]
    # per frame: 3 dominant incl. the [CLS] + 1 contextual (C = round(0.15625 x 4) = 1; preset "cover"'s floor
    # rule gives C = 0 at budgets below 7: checked after)
    eng = rt.prune("consensusdrop", 4, contextual_rounding="round")
    with torch.no_grad():
        rt.model(**make_batch(rt, n=1))
    sel = eng.selections[("vision", 0)]
    frame_cls = [17 * f for f in range(8)]  # each frame's [CLS] leads its 17 tokens
    assert set(frame_cls) <= set(sel.keep.tolist())
    assert sel.keep.numel() == 8 * 3 and sel.targets.numel() == 8
    eng = rt.prune("consensusdrop", 4, preset="cover")  # floor rule: 4 dominant incl. the [CLS], no contextual
    with torch.no_grad():
        rt.model(**make_batch(rt, n=1))
    sel = eng.selections[("vision", 0)]
    assert set(frame_cls) <= set(sel.keep.tolist()) and sel.keep.numel() == 8 * 4
    assert sel.targets is None or sel.targets.numel() == 0


def test_image_cls_slot_feeds_the_cls(runtimes):
    rt = runtimes["llava"]
    eng = rt.prune("consensusdrop", 8, include_cls=True)
    with torch.no_grad():
        rt.model(**make_batch(rt, n=1))
    sel = eng.selections[("vision", 0)]
    assert int(sel.keep[0]) == 16  # the extra candidate T + 0 = the image's [CLS], first among dominant
    assert sel.keep.numel() == 7 and sel.targets.numel() == 1  # 8 = (6 patches + [CLS]) + 1 contextual


def test_after_probe_ablation_prunes_at_layer_k(runtimes):
    rt = runtimes["llava"]
    eng = rt.prune("consensusdrop", 8, prune_point="after_probe", probe_layer=2)
    with torch.no_grad():
        rt.model.generate(**make_batch(rt), max_new_tokens=3, do_sample=False)
    for s in eng.stats.samples:
        assert s.visual_per_layer == [16, 16, 8, 8] and s.visual_layer_avg == 12


def test_bad_options_are_refused():
    from llava.method import get_method

    with pytest.raises(ValueError, match="fusion"):
        get_method("consensusdrop", 64, fusion="mean")
    with pytest.raises(ValueError, match="after_probe"):
        get_method("consensusdrop", 64, prune_point="after_probe", probe_layer=0)


# -- the diverse selection (select = maxmin / nms / dpp) ------------------------------------------
# 4 tokens: x1 duplicates x0, x2 is orthogonal to both, x3 sits between (cos .707 with x0, x1, x2)
X4 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7071068, 0.7071068]])
REL4 = torch.tensor([1.0, 0.9, 0.5, 0.6])


def test_maxmin_by_hand():
    from consensusdrop import diverse_pick

    # first pick = most relevant (0); then rel * min distance = [-, .9 * 0, .5 * 1, .6 * .293] -> 2
    assert diverse_pick(X4, REL4, 2, how="maxmin").tolist() == [0, 2]
    # the rank rule would keep the duplicate: top-2 by relevance = [0, 1]
    assert torch.topk(REL4, 2).indices.sort().values.tolist() == [0, 1]
    # a forced seed (a cross-modal peak) counts in d: seed 3, then rel * (1 - cos(., x3)) = [.293, .264, .146] -> 0
    assert diverse_pick(X4, REL4, 2, seed=torch.tensor([3]), how="maxmin").tolist() == [0, 3]
    # alpha = 0: pure max-min (DivPrune's rule after the first pick); the first pick is still the most relevant
    assert diverse_pick(X4, REL4, 3, how="maxmin", alpha=0.0).tolist() == [0, 2, 3]


def test_nms_and_dpp_avoid_the_duplicate():
    from consensusdrop import diverse_pick

    # nms: penalty = max cos to a more relevant token: [0, 1, .707, .707] -> adj [1, 0, .146, .176] -> 0, 3
    assert diverse_pick(X4, REL4, 2, how="nms").tolist() == [0, 3]
    picks = diverse_pick(X4, REL4, 2, how="dpp")
    assert 0 in picks.tolist() and 1 not in picks.tolist()


def test_fused_relevance_is_the_mean_of_rank_relevances():
    from consensusdrop import fused_relevance

    # r_v = [1, 6, 3, 4, 2, 5], r_x = [6, 1, 2, 4, 5, 3] (see the top of this file); u = 1 - (r - 1) / 5
    u_v = [1.0, 0.0, 0.6, 0.4, 0.8, 0.2]
    u_x = [0.0, 1.0, 0.8, 0.4, 0.2, 0.6]
    assert fused_relevance(S_V, S_X, "encoder_only").tolist() == pytest.approx(u_v)
    assert fused_relevance(S_V, S_X, "cross_only").tolist() == pytest.approx(u_x)
    assert fused_relevance(S_V, S_X, "borda").tolist() == pytest.approx([(a + b) / 2 for a, b in zip(u_v, u_x)])


def test_floor_rounding_gives_no_merged_token_at_tiny_budgets():
    assert [split_budget(b, 0.15625, True, rounding="floor") for b in (4, 8, 16, 32, 64, 128, 192)] == \
        [(4, 0), (7, 1), (14, 2), (27, 5), (54, 10), (108, 20), (162, 30)]


def test_default_is_preset_cover_and_preset_probe_is_the_previous_default():
    from llava.method import get_method

    keys = ("select", "fusion", "probe_layer", "probe_mode", "contextual_rounding")
    cover = ("maxmin", "borda", None, "embed_cos", "floor")
    assert tuple(getattr(get_method("consensusdrop", 16), k) for k in keys) == cover
    assert tuple(getattr(get_method("consensusdrop", 16, preset="cover"), k) for k in keys) == cover
    m = get_method("consensusdrop", 16, preset="cover", fusion="cross_only", probe_layer=1)
    assert (m.fusion, m.probe_layer, m.probe_mode) == ("cross_only", 1, "attn")
    p = get_method("consensusdrop", 16, preset="probe")  # the default before issue 15
    assert tuple(getattr(p, k) for k in keys) == ("rank", "rrf", 2, "attn", "round")
    assert get_method("consensusdrop", 16, preset="probe", probe_layer=1).probe_layer == 1
    with pytest.raises(ValueError, match="preset"):
        get_method("consensusdrop", 16, preset="nope")


@ALL
def test_preset_cover_follows_the_budget(rt):
    inputs = make_batch(rt)
    b = PER_UNIT[rt.family]
    eng = rt.prune("consensusdrop", b, preset="cover")
    with torch.no_grad():
        rt.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    newlines = [4, 4, 8]
    for i, s in enumerate(eng.stats.samples):
        assert s.visual_entering_llm == {"llava": b, "video_llava": 8 * b, "llava_next": 3 * b + newlines[i]}[rt.family]


def test_product_max_and_calibrated_relevances_by_hand():
    from consensusdrop import fused_relevance

    # u_v = [1, 0, .6, .4, .8, .2], u_x = [0, 1, .8, .4, .2, .6] (above)
    assert fused_relevance(S_V, S_X, "product").tolist() == pytest.approx(
        [0.0, 0.0, 0.48 ** 0.5, 0.4, 0.16 ** 0.5, 0.12 ** 0.5])
    assert fused_relevance(S_V, S_X, "max").tolist() == pytest.approx([1.0, 1.0, 0.8, 0.4, 0.8, 0.6])
    # calibrated: u_x = (s_x - median) / (max - median), clipped at 0; torch's median of an even count is the
    # lower middle value: sorted s_x = [.01, .02, .05, .22, .30, .40] -> .05
    u_x = [0.0, 1.0, 0.25 / 0.35, 0.0, 0.0, 0.17 / 0.35]
    u_v = [1.0, 0.0, 0.6, 0.4, 0.8, 0.2]
    assert fused_relevance(S_V, S_X, "borda", how="calibrated").tolist() == pytest.approx(
        [(a + b) / 2 for a, b in zip(u_v, u_x)])
    # the single-signal ablations keep their rank relevances (the best standalone form of each signal)
    assert fused_relevance(S_V, S_X, "cross_only", how="calibrated").tolist() == pytest.approx(
        [0.0, 1.0, 0.8, 0.4, 0.2, 0.6])


def test_peaks_source_and_coverage_fill_by_hand():
    from llava.method import get_method

    # X4 geometry; s_v -> r_v = [1, 3, 4, 2] (tie .1: lower index), u_v = [1, 1/3, 0, 2/3];
    # s_x -> r_x = [2, 1, 4, 3], u_x = [2/3, 1, 0, 1/3]; borda rel = [5/6, 2/3, 0, 1/2]
    s_v = torch.tensor([0.5, 0.1, 0.1, 0.3])
    s_x = torch.tensor([0.3, 0.4, 0.1, 0.2])

    def pick(**opts):
        return get_method("consensusdrop", 16, peaks=0.5, **opts)._dominant(s_v, s_x, X4, 2).tolist()

    # one forced peak (0.5 x 2): the top of the consensus (0) or of s_x (1); coverage fill: the farthest
    # token from it, x2 (distance 1; x1 / x0 duplicate the seed, x3 at 1 - .707)
    assert pick(peaks_source="fused", fill="coverage") == [0, 2]
    assert pick(peaks_source="cross", fill="coverage") == [1, 2]
    # fused fill after the cross peak: rel x distance = [5/6 x 0, -, 0 x 1, 1/2 x .293] -> 3
    assert pick(peaks_source="cross", fill="fused") == [1, 3]


def test_calibrated_encoder_and_both_by_hand():
    from consensusdrop import fused_relevance

    # s_v above its median: sorted s_v = [.05, .10, .10, .20, .25, .30], lower middle .10, max .30
    v_cal = [1.0, 0.0, 0.5, 0.0, 0.75, 0.0]
    x_rank = [0.0, 1.0, 0.8, 0.4, 0.2, 0.6]
    x_cal = [0.0, 1.0, 0.25 / 0.35, 0.0, 0.0, 0.17 / 0.35]
    assert fused_relevance(S_V, S_X, "borda", how="calibrated_encoder").tolist() == pytest.approx(
        [(a + b) / 2 for a, b in zip(v_cal, x_rank)])
    assert fused_relevance(S_V, S_X, "borda", how="calibrated_both").tolist() == pytest.approx(
        [(a + b) / 2 for a, b in zip(v_cal, x_cal)])


def test_cross_modal_scores_by_hand():
    from consensusdrop.consensusdrop import cross_modal_score

    # two question tokens, three visual tokens; cos = [[1, .6, 0], [0, .8, 1]]
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    vis = torch.tensor([[3.0, 0.0], [0.6, 0.8], [0.0, 0.5]])
    # prominence: each row minus its mean (.5333, .6): [[.4667, .0667, -.5333], [-.6, .2, .4]] -> column max
    assert cross_modal_score(text, vis, "prominence").tolist() == pytest.approx([0.46667, 0.2, 0.4], abs=1e-5)
    # weighted: softmax(100 cos) rows ~ [[1, e^-40, e^-100], [e^-100, e^-20, 1]] scaled by the rows' prominence
    # (max - mean: .4667, .4) -> column max [.4667, .4 e^-20, .4]
    w = cross_modal_score(text, vis, "weighted")
    assert w.tolist() == pytest.approx([0.46667, 0.4 * 2.0612e-9, 0.4], rel=1e-4)
    # softmax: AdaV's s_j (llava.ops.text_to_image_score): column max of the softmax rows [1, e^-20, 1]
    assert cross_modal_score(text, vis, "softmax").tolist() == pytest.approx([1.0, 2.0612e-9, 1.0], rel=1e-4)
    with pytest.raises(ValueError, match="cross_score"):
        cross_modal_score(text, vis, "mean")


def test_cover_radius_by_hand():
    from consensusdrop.consensusdrop import finish_maxmin, maxmin_problem

    # a, b (a near-duplicate of a: distance .005), c (orthogonal: distance 1), d (cos .8 with a: distance .2)
    x = torch.tensor([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0], [0.8, 0.6]])
    rel = torch.tensor([1.0, 0.9, 0.3, 0.8])
    # plain max-min: a first, then rel * distance = [-, .0045, .3, .16] -> c
    assert finish_maxmin(*maxmin_problem(x, rel, 2)).tolist() == [0, 2]
    # radius .2: distances / .2 clipped at 1 -> rel * [-, .025, 1, 1] = [-, .0225, .3, .8] -> d: beyond the
    # radius only the relevance counts, the near-duplicate b is still held back
    assert finish_maxmin(*maxmin_problem(x, rel, 2, radius=0.2)).tolist() == [0, 3]
    assert finish_maxmin(*maxmin_problem(x, rel, 3, radius=0.2)).tolist() == [0, 2, 3]


@pytest.mark.parametrize("how", ["softmax", "prominence", "weighted"])
def test_masked_cross_modal_score_equals_the_rows_subset(how):
    """``mask=`` (the fast path's padded text block / the question among it): the masked rows change nothing,
    bit for bit, and the values are those of ``text[mask]`` (up to the last bits of a product with another
    row count); no row at all gives zeros; every row is no mask."""
    from consensusdrop.consensusdrop import cross_modal_score

    g = torch.Generator().manual_seed(0)
    text, vis = torch.randn(12, 32, generator=g), torch.randn(20, 32, generator=g)
    assert torch.equal(cross_modal_score(text, vis, how, mask=torch.ones(12, dtype=torch.bool)),
                       cross_modal_score(text, vis, how))
    for mask in (torch.rand(12, generator=g) < 0.5, torch.arange(12) < 7, torch.arange(12) == 11):
        got = cross_modal_score(text, vis, how, mask=mask)
        other = torch.where(mask[:, None], text, 1e3 * torch.randn(12, 32, generator=g))  # other masked rows
        assert torch.equal(cross_modal_score(other, vis, how, mask=mask), got)
        torch.testing.assert_close(got, cross_modal_score(text[mask], vis, how), rtol=1e-5, atol=1e-7)
    assert torch.equal(cross_modal_score(text, vis, how, mask=torch.zeros(12, dtype=torch.bool)), torch.zeros(20))


@pytest.mark.parametrize("options", [{}, {"peaks": 0.5}, {"include_cls": True}, {"cover_radius": 0.3}])
def test_device_loop_selection_is_bit_identical(options):
    """``_select(device_loop=True)`` (a captured prefill: the greedy max-min loops on the device, the planned
    layout) == the eager path's host loop, selection for selection."""
    from consensusdrop.consensusdrop import ConsensusDrop

    g = torch.Generator().manual_seed(1)
    m = ConsensusDrop(6, **options)
    m.setup(num_layers=4, num_vision_layers=4, family="llava")
    U, T = 3, 16  # three units of a 4 x 4 grid, each with an extra [CLS] candidate when include_cls
    unit = torch.arange(U).repeat_interleave(T)
    patch = torch.arange(T).repeat(U)
    if m.include_cls_candidates:
        unit, patch = torch.cat([unit, torch.arange(U)]), torch.cat([patch, torch.full((U,), -1)])
    n = unit.numel()
    pos = torch.full((U, 2), -1)
    from llava.ops import unit_layout

    for _ in range(5):
        s_v, s_x = (torch.rand(n, generator=g) * 4).round(), torch.rand(n, generator=g)
        feats, keys = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
        args = (s_v, s_x, keys, unit, patch, pos, unit < 0, U * T, "per_unit", "vision", feats)
        ref = m._select(*args)
        got = m._select(*args, layout=unit_layout(unit, patch, U * T, pos), device_loop=True)
        for f in ("keep", "targets", "assign", "order"):
            a, b = getattr(ref, f), getattr(got, f)
            assert (a is None and b is None) or torch.equal(a, b), f

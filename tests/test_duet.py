"""DUET-VLM (baselines/duet.py): both stages on hand-worked tensors, the budget convention, options, then the
method on the tiny models (stage 1 per unit; stage-2 layers 16 / 24 of 32 map to 2 / 3 of the 4-layer LLM).
Keep-all, tokens per unit, cache, batching: tests/test_method_guarantees.py."""

import copy

import pytest
import torch
from conftest import FAMILIES, check_generate_batch_equals_alone, layout, llm_visual_rows, make_batch, slice_batch

import baselines.duet  # noqa: F401  (registers "duet")
from baselines.duet import DUET, budget_split, duet_rank, duet_vision, layer_fraction
from llava.models import load
from llava.ops import merge_tokens
from test_reference_duet import official_stage1

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def at_depth(m, depth=32):
    m.setup(num_layers=depth, num_vision_layers=24, family="llava")
    return m


def outputs(x, sel):
    """The tokens a Selection feeds, in feeding order (what the engine materialises)."""
    out = torch.cat([x[sel.keep], merge_tokens(x, sel)]) if sel.targets is not None else x[sel.keep]
    return out[sel.order] if sel.order is not None else out


# ------------------------------------------------------------------ stage 1, worked by hand

# One LLaVA-1.5-like image: patches 0..7 (stock tokens), its [CLS] offered as the extra candidate 8.
UNIT = torch.zeros(9, dtype=torch.long)
PATCH = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1])
ATTN = torch.tensor([[.10, .30, .05, .10, .20, .02, .05, .15, .5],    # head 0 alone: patches 1, 4
                     [.00, .20, .00, .20, .00, .00, .20, .00, .2]])   # head 1 alone: patches 1, 3, 6
# summed over heads: patches [.10, .50, .05, .30, .20, .02, .25, .15]
KEYS = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 0.0], [0.0, 5.0], [0.5, 2.0], [1.0, -1.0], [1.0, 0.0],
                     [0.0, 1.0], [2.0, 2.0]])
X = torch.stack([torch.arange(9.0), torch.ones(9)], 1)  # token i = [i, 1]


def test_stage1_dominant_pool_anchors_and_dropped_leftovers():
    # D = 3: [CLS] 8 + the 2 best patches by the head sum, 1 (.50) and 3 (.30): kept [8, 1, 3].
    # Leftovers R = [0, 2, 4, 5, 6, 7] (M = 6). C = 2, w = 2: pool P = min(4, 6) = 4 by score, best first:
    # 6 (.25), 4 (.20), 7 (.15), 0 (.10); patches 2 and 5 are dropped. step = 4 // 2 = 2: anchors at pool
    # ranks 0 and 2 = tokens 6, 7 (pool-rank order). Members: 4 = [.5, 2] -> 7 = [0, 1] (cos .97 vs .24);
    # 0 = [1, 1] ties between 6 = [1, 0] and 7 (.707 each) -> the first slot, 6.
    sel = duet_vision(ATTN, KEYS, UNIT, PATCH, 3, 2, 2, num_stock=8)
    assert sel.keep.tolist() == [8, 1, 3]
    assert sel.targets.tolist() == [6, 7]
    assert sel.assign.tolist() == [0, -1, -1, -1, 1, -1, -1, -1, -1]
    assert sel.rule == "target_plus_mean" and sel.space == "vision" and sel.order is None
    # contextual = target + mean(members): [6, 1] + [0, 1] = [6, 2]; [7, 1] + [4, 1] = [11, 2]
    assert outputs(X, sel).tolist() == [[8, 1], [1, 1], [3, 1], [6, 2], [11, 2]]
    # reference mode: the same selection here (no ties on a cut)
    off = duet_vision(ATTN, KEYS, UNIT, PATCH, 3, 2, 2, num_stock=8, numerics="official")
    assert (off.keep.tolist(), off.targets.tolist(), off.assign.tolist()) == ([8, 1, 3], [6, 7], sel.assign.tolist())


def test_stage1_cluster_width_pool_sizes():
    # w = 4, C = 2: P = min(8, 6) = 6: the whole leftover set, best first [6, 4, 7, 0, 2, 5]; step 3:
    # anchors 6, 0. 4 -> 0 (cos .86 vs .24); 7 -> 0 (.707 vs 0); 2 = [5, 0] -> 6; 5 = [1, -1] -> 6 (.707 vs 0)
    sel = duet_vision(ATTN, KEYS, UNIT, PATCH, 3, 2, 4, num_stock=8)
    assert sel.targets.tolist() == [6, 0] and sel.assign.tolist() == [-1, -1, 0, -1, 1, 0, -1, 1, -1]
    # w = 1, C = 2: P = 2 = C: both pool tokens are anchors (6, 4), no member; 4 leftovers dropped
    sel = duet_vision(ATTN, KEYS, UNIT, PATCH, 3, 2, 1, num_stock=8)
    assert sel.targets.tolist() == [6, 4] and (sel.assign == -1).all()
    assert outputs(X, sel).tolist() == [[8, 1], [1, 1], [3, 1], [6, 1], [4, 1]]
    # D + C = 3 + 7 >= the 8 stock tokens: the unit is kept whole (stock order, no [CLS] added)
    assert duet_vision(ATTN, KEYS, UNIT, PATCH, 3, 7, 4, num_stock=8).is_identity(8)
    # C = 0: no contextual token, every leftover dropped (the official fallback anchor is not reproduced)
    sel = duet_vision(ATTN, KEYS, UNIT, PATCH, 3, 0, 4, num_stock=8)
    assert sel.keep.tolist() == [8, 1, 3] and sel.targets is None


def test_stage1_ties_go_to_the_lower_index():
    # one head; patches 0 and 7 tie at .10 for the last pool place (P = 4): the lower index 0 enters the
    # pool before 7; dominant: 1 and 3 tie with 6 at .30 for 2 places -> 1, 3.
    attn = torch.tensor([[.10, .30, .05, .30, .20, .02, .30, .10, .5]])
    sel = duet_vision(attn, KEYS, UNIT, PATCH, 3, 1, 4, num_stock=8)
    # R = [0, 2, 4, 5, 6, 7]; pool best first: 6 (.30), 4 (.20), 0 (.10), 7 (.10); step 4 -> anchor 6
    assert sel.keep.tolist() == [8, 1, 3] and sel.targets.tolist() == [6]
    assert sel.assign.tolist() == [0, -1, -1, -1, 0, -1, -1, 0, -1]  # 2 and 5 dropped


# Two LLaVA-NeXT-like crops with a newline between them (stock tokens 0..8) and each crop's [CLS] offered
# as an extra candidate (9 for unit 0, 10 for unit 1): num_stock = 9.
UNIT2 = torch.tensor([0, 0, 0, 0, -1, 1, 1, 1, 1, 0, 1])
PATCH2 = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, -1, -1])
ATTN2 = torch.tensor([[1, 8, 3, 2, 0, 5, 2, 6, 1, 15, 15]]) / 16.0
X2 = torch.stack([torch.arange(11.0), torch.ones(11)], 1)


def test_stage1_per_unit_blocks_with_extra_cls_and_newline():
    # D = 2, C = 1, w = 1 per crop. Crop 0: [CLS] 9 + patch 1; R = [0, 2, 3], pool P = 1: 2 (3/16) is the
    # anchor, 0 and 3 are dropped. Crop 1: [CLS] 10 + patch 7; R = [5, 6, 8], anchor 5, 6 and 8 dropped.
    # Outputs [9, 1, 10, 7, newline 4 | ctx 2, ctx 5], fed per unit: [9, 1, ctx 2, 10, 7, ctx 5, 4]
    sel = duet_vision(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 2, 1, 1, num_stock=9)
    assert sel.keep.tolist() == [9, 1, 10, 7, 4] and sel.targets.tolist() == [2, 5]
    assert (sel.assign == -1).all()
    assert sel.order.tolist() == [0, 1, 5, 2, 3, 6, 4]
    assert outputs(X2, sel)[:, 0].tolist() == [9, 1, 2, 10, 7, 5, 4]
    # w = 2: pools [2, 3] and [5, 6] (P = 2, step 2): anchors 2 and 5, members 3 and 6 (one slot each)
    sel = duet_vision(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 2, 1, 2, num_stock=9)
    assert sel.assign.tolist() == [-1, -1, -1, 0, -1, -1, 1, -1, -1, -1, -1]
    assert outputs(X2, sel)[:, 0].tolist() == [9, 1, 2 + 3, 10, 7, 5 + 6, 4]
    # newlines dropped; 'spatial' order: each unit by source index ([CLS] candidates last)
    sel = duet_vision(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 2, 1, 1, num_stock=9, keep_newlines=False)
    assert sel.keep.tolist() == [9, 1, 10, 7]
    sel = duet_vision(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 2, 1, 1, num_stock=9, order="spatial")
    assert outputs(X2, sel)[:, 0].tolist() == [1, 2, 9, 5, 7, 10, 4]


def test_stage1_video_frame_cls_is_a_stock_token():
    # a Video-LLaVA frame: token 0 is its [CLS] (a stock visual token), 1..7 its patches; D = 3 -> [CLS] +
    # patches at tokens 2 (.30) and 4 (.25); R = [1, 3, 5, 6, 7], C = 1, w = 2: pool 7 (.15), 1 (.10); anchor 7
    attn = torch.tensor([[.9, .10, .30, .05, .25, .02, .01, .15]])
    sel = duet_vision(attn, torch.ones(8, 2), torch.zeros(8, dtype=torch.long), torch.arange(-1, 7), 3, 1, 2)
    assert sel.keep.tolist() == [0, 2, 4] and sel.targets.tolist() == [7]
    assert sel.assign.tolist() == [-1, 0, -1, -1, -1, -1, -1, -1]


def test_stage1_units_that_fit_are_kept_whole():
    sel = duet_vision(ATTN2, torch.ones(11, 2), UNIT2, PATCH2, 3, 1, 4, num_stock=9)  # 4 >= 4 per crop
    assert sel.targets is None and sel.is_identity(9)


# ------------------------------------------------------------------ stage 2, worked by hand


def test_stage2_text_rows_mean_of_head_means():
    # S = 7: token 0 prefix, 1..4 visual, 5 and 6 the text after the image (the query rows); values in
    # sixteenths (exact). Visual columns per (head, row):
    #   row 5: head 0 [2, 6, 2, 2], head 1 [6, 2, 2, 2] -> head mean [4, 4, 2, 2]
    #   row 6: head 0 [2, 2, 8, 0], head 1 [2, 2, 0, 4] -> head mean [2, 2, 4, 2]
    #   mean over the rows: [3, 3, 3, 2] -> k = 2: a three-way tie, the lower indices 0, 1; k = 3 adds 2
    rows = torch.tensor([[[2, 2, 6, 2, 2, 2, 0], [1, 2, 2, 8, 0, 2, 1]],
                         [[2, 6, 2, 2, 2, 2, 0], [2, 2, 2, 0, 4, 2, 4]]]) / 16.0
    vis = torch.arange(1, 5)
    assert duet_rank(rows, vis, 2).tolist() == [0, 1]
    assert duet_rank(rows, vis, 3).tolist() == [0, 1, 2]
    assert duet_rank(rows, vis, 0).tolist() == []
    # the last row alone (queries="last", PyramidDrop's query): [2, 2, 4, 2] -> token 2
    assert duet_rank(rows[:, 1:], vis, 1).tolist() == [2]
    # reference mode: exact values in fp16 too, torch.topk: the same sets
    assert duet_rank(rows, vis, 3, "official").tolist() == [0, 1, 2]


# ------------------------------------------------------------------ budget, schedule, options


def test_budgets_map_onto_the_official_settings():
    # 192 -> 300 + 7 (the eval scripts), 128 -> 170 + 35 (README), 64 -> 85 + 17 (our design)
    assert [budget_split(b) for b in (192, 128, 64)] == [(300, 7), (170, 35), (85, 17)]
    # other budgets: N1 = round(1.6 B), C = round(N1 / 6): 120 per frame -> the official Video-LLaVA 160 + 32
    assert budget_split(120) == (160, 32) and budget_split(100) == (133, 27) and budget_split(6) == (8, 2)
    assert layer_fraction((16, 24), (0.5, 0.0)) == 0.625
    for budget, n1, counts, e in [(192, 307, (153, 0), 191.75), (128, 205, (102, 0), 128.0), (64, 102, (51, 0), 63.75)]:
        m = at_depth(DUET(budget))
        assert m.dominant + m.contextual == n1 and m.llm_layers == (16, 24)
        assert m.stage_counts(n1) == counts
        lc = m.layer_counts(n1)
        # E = (16 N1 + 8 int(N1 / 2) + 8 * 0) / 32: 307 -> (4912 + 1224) / 32; 205 -> (3280 + 816) / 32;
        # 102 -> (1632 + 408) / 32
        assert lc == [n1] * 16 + [counts[0]] * 8 + [0] * 8 and sum(lc) / 32 == e
    # Video-LLaVA (8 frames of 160 + 32): 1536 -> 768 -> 0, E = 960 per video (the paper's accounting)
    m = at_depth(DUET(120))
    assert sum(m.layer_counts(8 * 192)) / 32 == 960
    # the 4-layer tiny LLM: stages 2 / 3, the same fractions; 6 -> 8 + 2 per unit, [10, 10, 5, 0], E = 6.25
    m = at_depth(DUET(6), 4)
    assert m.llm_layers == (2, 3) and m.layer_counts(10) == [10, 10, 5, 0]
    assert at_depth(DUET(192), 40).llm_layers == (20, 30) and at_depth(DUET(192), 28).llm_layers == (14, 21)
    # no budget: the official loader default 300 + 7
    m = DUET()
    assert (m.dominant, m.contextual, m.cluster_width, m.budget) == (300, 7, 4, None)


def test_options():
    assert DUET(192, contextual=10).dominant == 297 and DUET(192, dominant=301).contextual == 6
    assert (DUET(dominant=5, contextual=2).dominant, DUET(dominant=5, contextual=2).contextual) == (5, 2)
    # other schedules: the budget is still the 32-layer layer average: ratios (1, 1) -> N1 = B
    assert budget_split(8, (16, 24), (1.0, 1.0)) == (7, 1) and DUET(8, ratios=(1.0, 1.0)).dominant == 7
    m = at_depth(DUET(6, layer_list=(2, 3), scale_layers=False), 4)
    assert m.llm_layers == (2, 3)
    assert DUET(192).config()["queries"] == "text_after" and DUET(192).position_mode == "reindex"
    assert DUET.include_cls_candidates and DUET.needs_vision_attention and DUET.capturable == "full"
    with pytest.raises(ValueError, match="not built"):
        DUET(192, queries="salient")
    for bad in [dict(queries="question"), dict(dominant=100, contextual=10), dict(cluster_width=0),
                dict(ratios=(0.5,)), dict(ratios=(0.2, 0.5)), dict(ratios=(1.5, 0.0)), dict(layer_list=(24, 16)),
                dict(layer_list=(16, 32)), dict(order="raster"), dict(numerics="fp16")]:
        with pytest.raises(ValueError):
            DUET(192, **bad)
    with pytest.raises(ValueError):
        DUET(dominant=5)  # no budget: both or neither
    with pytest.raises(ValueError):
        DUET(dominant=0, contextual=2)
    with pytest.raises(TypeError):
        DUET(192, lam=0.5)
    with pytest.raises(ValueError):
        at_depth(DUET(192, scale_layers=False), 4)  # layers 16 / 24 on a 4-layer LLM


# ------------------------------------------------------------------ tiny models


@ALL
def test_per_layer_counts(rt):
    # 6 -> 8 + 2 = 10 per unit after the vision stage (a unit of <= 10 kept whole), int(N / 2) from layer 2,
    # none from layer 3
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    eng = rt.prune("duet", 6)
    with torch.no_grad():
        rt.model(**inputs)
    for s, (sizes, newlines) in zip(eng.stats.samples, lay, strict=True):
        n = sum(min(10, k) for k in sizes) + newlines
        assert s.visual_candidates == sum(sizes) + newlines and s.visual_entering_llm == n
        assert s.visual_per_layer == [n, n, n // 2, 0]
    exp = {"llava": [10, 10, 5, 0], "video_llava": [80, 80, 40, 0]}  # video: 8 frames x 10
    if rt.family in exp:
        assert [s.visual_per_layer for s in eng.stats.samples] == [exp[rt.family]] * 3


def official_tower_stage1(tower, pixels, d, c, w):
    """The official stage 1 (transcribed in tests/test_reference_duet.py) on an eager copy of the tower:
    attentions[-2]'s [CLS] row, hidden_states[-2], the head mean of layer -2's raw k_proj output."""
    tower = copy.deepcopy(tower)
    tower.set_attn_implementation("eager")
    layer = tower.encoder.layers[-2].self_attn
    cap = {}
    h = layer.k_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("k", o))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
    h.remove()
    hidden = out.hidden_states[-2]
    B, S, _ = hidden.shape
    metric = cap["k"].view(B, S, layer.num_heads, -1).transpose(1, 2).mean(1)
    _, tokens = official_stage1(out.attentions[-2][:, :, 0], hidden, metric, d - 1, c, w, out_dtype=hidden.dtype)
    return tokens


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
def test_llm_input_equals_the_official_stage1(rt):
    """LLaVA-1.5: [CLS] + 4 patches + 2 contextual tokens from a pool of 4 (of 12 leftovers; 8 dropped), exactly
    the official tower output, projected. Video-LLaVA: the same per frame (our design), frames in order."""
    inputs = make_batch(rt)
    rt.prune("duet", dominant=5, contextual=2, cluster_width=2)
    core = rt.model.model
    if rt.family == "video_llava":
        tower, pixels = core.video_tower, inputs["pixel_values_videos"].flatten(0, 1)
    else:
        tower, pixels = core.vision_tower, inputs["pixel_values"]
    with torch.no_grad():
        ref = core.multi_modal_projector(official_tower_stage1(tower, pixels, 5, 2, 2))
    per_sample = ref.shape[0] // 3
    rows = llm_visual_rows(rt, inputs, outputs=7 * per_sample)
    for b in range(3):
        expected = ref[b * per_sample:(b + 1) * per_sample].flatten(0, 1)
        assert rows[b].shape == expected.shape == (7 * per_sample, expected.shape[-1])
        torch.testing.assert_close(rows[b], expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def eager():
    return load("tiny:llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_stage2_reads_the_next_layer_rows_of_every_text_token_after_the_image(rt, eager):
    """Independent reference: with stage 1 keeping every unit whole (16 + 0 >= 16 patches), the first stage's
    signal is the unpruned eager model's own layer-2 attention, rows = every token after the image."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        att = eager.model(**one, output_attentions=True).attentions[2][0]  # decoder layer 2 (H, S, S)
    vis = torch.nonzero(one["input_ids"][0] == rt.model.config.image_token_id).flatten()
    after = torch.arange(int(vis[-1]) + 1, one["input_ids"].shape[1])
    assert after.numel() > 3
    score = att[:, after][:, :, vis].mean(0).mean(0)
    expected = torch.topk(score, 8).indices.sort().values
    eng = rt.prune("duet", dominant=16, contextual=0)
    with torch.no_grad():
        rt.model(**one)
    assert eng.stats.samples[0].vision_noop
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert [s.visual_per_layer for s in eng.stats.samples] == [[16, 16, 8, 0]]
    # the last-token query (our ablation) ranks by that row alone
    eng = rt.prune("duet", dominant=16, contextual=0, queries="last")
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, torch.topk(att[:, -1, vis].mean(0), 8).indices.sort().values)


@pytest.mark.parametrize("rt", ["qwen3.5"], indirect=True)
def test_hybrid_model_refuses_linear_reads_and_runs_at_full_attention_layers(rt):
    # tiny Qwen3.5: full-attention layers 1 and 3; the default stages before 2 / 3 read layer 2 (linear)
    from llava.engine import HybridRefusal

    with pytest.raises(HybridRefusal, match="linear-attention"):
        type(rt).prune(rt, "duet", 4)  # the runtime's own prune, without the suites' skip-on-refusal wrapper
    check_generate_batch_equals_alone(rt, "duet", 4, layer_list=(1, 3), scale_layers=False)
    assert [s.visual_per_layer[-1] for s in rt.engine.stats.samples] == [0]  # the last call: one sample alone


def test_captured_except_the_reference_mode(runtimes):
    """Captured whole on the fast path (tokens == eager: tests/test_fastpath_llm.py); the reference mode runs
    eagerly, with the reason."""
    assert DUET.capturable == "full" and DUET.llm_text_rows
    for opts, refusal in (({}, None), ({"queries": "last"}, None), ({"numerics": "official"}, "reference mode")):
        eng = runtimes["llava"].prune("duet", 6, **opts)
        try:
            why = eng.method.capture_refusal()
            assert why is None if refusal is None else refusal in why
        finally:
            runtimes["llava"].unprune()


def test_padded_query_rows_are_read_through_their_mask():
    """duet_rank with a row mask: NaN rows of pads (a query at a padded row 0) change nothing; the real rows'
    mean ranks as without the pads."""
    torch.manual_seed(0)
    rows = torch.rand(2, 3, 8).softmax(-1)  # (H, Q, S)
    visual = torch.tensor([1, 2, 3, 4, 5])
    want = duet_rank(rows, visual, 2)
    padded = torch.cat([rows, torch.full((2, 2, 8), float("nan"))], dim=1)  # two pad rows
    mask = torch.tensor([True, True, True, False, False])
    assert torch.equal(duet_rank(padded, visual, 2, row_mask=mask), want)

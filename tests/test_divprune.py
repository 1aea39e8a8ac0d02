"""DivPrune: hand-worked max-min picks, the official code transcribed as a reference, token
accounting on the three tiny families. Keep-all, batching: tests/test_method_guarantees.py."""

import math

import pytest
import torch
from conftest import FAMILIES, layout, llm_visual_rows, make_batch

from baselines.divprune import DivPrune, divprune, max_min_diversity, num_picks

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def polar(r, deg):
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


# 5 points at angles 0, 10, 45, 90, 180 degrees, different lengths (cosine ignores them).
# d = 1 - cos(angle between). Nearest-neighbour distances: p0 .015 (p1), p1 .015 (p0), p2 .18 (p1, 35
# deg), p3 .29 (p2, 45 deg), p4 1.0 (p3, 90 deg) -> first pick p4.
# 2nd: distance to p4 = 1 + cos(angle): p0 2.0, p1 1.98, p2 1.71, p3 1.0 -> p0.
# 3rd: min over {p4, p0}: p1 .015, p2 .29, p3 min(1, 1) = 1 -> p3.
# 4th: min over {p4, p0, p3}: p1 .015, p2 .29 -> p2. 5th: p1.
P = torch.tensor([polar(1, 0), polar(3, 10), polar(0.5, 45), polar(2, 90), polar(4, 180)])


def test_greedy_max_min_picks_on_five_points():
    assert max_min_diversity(P, 5).tolist() == [4, 0, 3, 2, 1]
    unit = torch.zeros(5, dtype=torch.long)
    assert divprune(P, unit, budget=3).tolist() == [0, 3, 4]  # picks kept in index order
    # ratio: k = round(ratio * N) with Python's round, as the official int(round(...)):
    assert divprune(P, unit, ratio=0.5).tolist() == [0, 4]  # round(2.5) = 2
    assert divprune(P, unit, ratio=0.7).tolist() == [0, 2, 3, 4]  # round(3.5) = 4
    assert divprune(P, unit, budget=5).tolist() == [0, 1, 2, 3, 4]


def test_picks_are_distinct_even_for_duplicate_tokens():
    # all distances 0: the official loop would re-pick token 0; we take the next unpicked index
    assert max_min_diversity(torch.ones(4, 3), 3).tolist() == [0, 1, 2]


def test_per_frame_versus_whole_sample_scope():
    # frame 0 = the five points above (tokens 0-4); frame 1 = q0 (1, 0), q1 (0, 1), q2 (1, .01)
    # (tokens 5-7). Per frame, budget 1: frame 0 -> p4 (4); frame 1 -> q1 (6), whose nearest
    # neighbour is 89 deg away while q0 and q2 are 0.6 deg apart.
    x = torch.cat([P, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]])])
    unit = torch.tensor([0] * 5 + [1] * 3)
    assert divprune(x, unit, budget=1, per_unit=True).tolist() == [4, 6]
    # One selection over the sample, 1 x 2 units = 2 picks: p4 first (q1 now duplicates p3's
    # direction); then p0 and q0 are both exactly opposite p4 (d = 2.0): lower index p0.
    assert divprune(x, unit, budget=1).tolist() == [0, 4]


def test_newline_tokens():
    # a (1,0), b (1,1) of unit 0; newline (-1,0); c (0,1), e (1,.2) of unit 1. Budget 1 per unit.
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.2]])
    unit = torch.tensor([0, 0, -1, 1, 1])
    # candidate (official, sample scope): k = 2 of 5. The newline's nearest neighbour is 90 deg away
    # (c) -> first; then a is exactly opposite it (d = 2) -> [0, 2].
    assert divprune(x, unit, budget=1).tolist() == [0, 2]
    # keep: k = 2 of a, b, c, e. Nearest neighbours: a .02 (e), b .17 (e, 33.7 deg), c .29 (b), e .02
    # -> c; then farthest from c: a (90 deg) -> [0, 3] plus the newline 2.
    assert divprune(x, unit, budget=1, newlines="keep").tolist() == [0, 2, 3]
    assert divprune(x, unit, budget=1, newlines="drop").tolist() == [0, 3]
    with pytest.raises(ValueError):
        divprune(x, unit, budget=1, per_unit=True, newlines="candidate")


def test_budget_and_ratio_semantics():
    assert num_picks(576, None, 1, None) == 56  # official default SUBSET_RATIO 0.098
    assert [num_picks(576, None, 1, r) for r in (0.111, 0.222, 0.333)] == [64, 128, 192]
    assert num_picks(2880, 64, 5, None) == 320  # NeXT: 64 per crop x 5 crops, one selection
    assert num_picks(10, 64, 1, None) == 10
    assert DivPrune().config()["ratio"] is None and DivPrune(64).budget == 64
    with pytest.raises(ValueError):
        DivPrune(64, ratio=0.1)
    with pytest.raises(ValueError):
        DivPrune(ratio=1.5)
    with pytest.raises(ValueError):
        DivPrune(64, scope="unit", newlines="candidate")


# ------------------------------------------------------------------ the official code as reference


def official_divprune(visual_feature_vectors, image_feature_length, threshold_ratio):
    """vbdi/divprune ``LlavaMetaForCausalLM.DivPrune`` transcribed; returns picks in pick order."""
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    m = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(m, m.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            m2 = torch.index_select(cosine_matrix, 0, s[:i])
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


@ALL
def test_llm_input_equals_official_divprune(rt):
    """The official selection on the unpruned LLM-input visual rows: LLaVA-1.5 4 of 16 (ratio .25);
    NeXT ratio .25 of all image rows, newline rows included; Video-LLaVA per frame (our design)."""
    inputs = make_batch(rt)
    rt.prune("none")
    stock = llm_visual_rows(rt, inputs)
    if rt.family == "llava_next":
        rt.prune("divprune", ratio=0.25)
    else:
        rt.prune("divprune", 4)
    rows = llm_visual_rows(rt, inputs)
    for b in range(3):
        frames = stock[b].split(17) if rt.family == "video_llava" else [stock[b]]
        expected = []
        for f in frames:
            ratio = 0.25 if rt.family != "video_llava" else 4 / 17
            expected.append(f[official_divprune(f, f.shape[0], ratio).sort().values])
        assert torch.equal(rows[b], torch.cat(expected))


# ------------------------------------------------------------------ tiny models: accounting, generate


@ALL
@pytest.mark.parametrize("budget", [2, 4, 6])  # 64 / 128 / 192 of 576 scaled to 16 patches per unit
def test_tokens_entering_llm(rt, budget):
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    if rt.family == "llava":
        assert lay == [([16], 0)] * 3
    if rt.family == "video_llava":
        assert lay == [([17] * 8, 0)] * 3
    eng = rt.prune("divprune", budget)
    with torch.no_grad():
        rt.model(**inputs)
    L = len(rt.model.model.language_model.layers)
    for s, (sizes, newlines) in zip(eng.stats.samples, lay):
        if rt.family == "video_llava":  # per frame: 8 x B
            exp = sum(min(budget, n) for n in sizes)
        else:  # one selection per sample: B x units (NeXT: 3 crops; newline rows are candidates)
            exp = min(budget * len(sizes), sum(sizes) + newlines)
        assert s.visual_candidates == sum(sizes) + newlines
        assert s.visual_per_layer == [exp] * L and s.visual_entering_llm == exp and not s.vision_noop

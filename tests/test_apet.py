"""ApET: worked examples by hand (FPS, the reconstruction errors, the kept set, the merge, the basis tokens'
places), the budget rules and option errors, and the method on the tiny families (per-layer counts, the LLM
stage on the hidden states, reference mode, the fast path). Keep-all bit-identical, tokens per unit without the
LLM stage, batch == alone, cached == recompute: tests/test_method_guarantees.py. The official code as reference: tests/test_reference_apet.py."""

import dataclasses

import pytest
import torch
from conftest import (ALL_FAMILIES, FAMILIES, check_generate_batch_equals_alone, check_reference_mode_in_engine,
                      layout, make_batch)

import baselines.apet  # noqa: F401  (registers "apet")
from baselines.apet import (ApET, _draw, apet_compose, apet_units, approximation_errors, basis_count,
                            farthest_point_sampling, merged_rows, split_budget)
from llava.method import get_method
from llava.ops import merge_tokens

ALL = pytest.mark.parametrize("rt", ALL_FAMILIES, indirect=True)

# ------------------------------------------------------------------ worked by hand (2-D tokens)
#: six tokens; with the basis {x0} = {(2, 0)} a token's error is its distance to the x axis, |y|
X = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.0, -2.0], [3.0, 1.0], [-1.0, 0.5], [1.0, -2.5]])


def test_farthest_point_sampling_by_hand():
    """From x0: squared distances 10, 8, 2, 9.25, 7.25 -> x1 (10); then min(d(x0), d(x1)) = 8, 2, 9.25, 7.25 for
    x2..x5 (d(x1): 26, 8, 10.25, 30.25) -> x4 (9.25)."""
    assert farthest_point_sampling(X[None], 3, torch.tensor([0]))[0].tolist() == [0, 1, 4]
    assert farthest_point_sampling(X[None], 2, torch.tensor([3]))[0].tolist() == [3, 2]  # d(x3): 2, 8, 18, 16.25, 16.25
    both = farthest_point_sampling(torch.stack([X, X.flip(0)]), 2, torch.tensor([0, 5]))
    assert both.tolist() == [[0, 1], [5, 4]]  # a batch of units, each its own start (x0 is row 5 of the flip)


def test_reconstruction_errors_by_hand():
    """One basis token s = (2, 0): G = 4 + 1e-5, x^ = (4a / (4 + 1e-5), 0) for x = (a, b), so
    e = sqrt((a * 1e-5 / (4 + 1e-5))^2 + b^2) ~ |b|; with two independent basis tokens every error is ~0."""
    err = approximation_errors(X[None], torch.tensor([[0]]))[0]
    a, b = X[:, 0].double(), X[:, 1].double()
    exact = ((a * 1e-5 / (4 + 1e-5)) ** 2 + b ** 2).sqrt()
    torch.testing.assert_close(err.double(), exact, atol=1e-6, rtol=1e-6)
    assert err.argsort(descending=True).tolist()[:3] == [1, 5, 2]  # |y| = 3, 2.5, 2
    assert approximation_errors(X[None], torch.tensor([[0, 1]]))[0].abs().max() < 1e-4
    torch.testing.assert_close(approximation_errors(X[None], torch.zeros(1, 0, dtype=torch.long))[0], X.norm(dim=1))


def test_replace_keeps_the_top_errors_and_puts_the_basis_in_the_next_place():
    """T = 3 out, k = 1 (basis x0, start 0): E = [x1 (3), x5 (2.5), x2 (2)]; targets x1, x5; the seed takes the
    place of x2, which is dropped (official encode_images). x3 and x4 join x1 by cosine:
    cos(x3, x1) = .6 > cos(x3, x5) = .059; cos(x4, x1) = .141 > cos(x4, x5) = -.747.
    x1 -> mean(x1, x3, x4) = (1, 1.5); x5 alone; output [x1', x0 at x2's place, x5]."""
    r = apet_units(X[None], 3, 1, torch.tensor([0]))
    assert r["seeds"].tolist() == [[0]] and r["targets"].tolist() == [[1, 5]] and r["slots"].tolist() == [[2]]
    assert r["assign"].tolist() == [[-1, -1, -1, 0, 0, -1]]
    sel = apet_compose(X, [], [(0, torch.arange(6), 3)], torch.tensor([0]), basis=1, seed_slots="replace",
                       merge_seeds=False, ridge=1e-5, numerics="ours", stage="vision")
    assert sel.keep.tolist() == [0] and sel.targets.tolist() == [1, 5] and sel.rule == "mean"
    merged = merge_tokens(X, sel)
    assert merged.tolist() == [[1.0, 1.5], [1.0, -2.5]]
    outputs = torch.cat([sel.keep, sel.targets])[sel.order]
    assert outputs.tolist() == [1, 0, 5]  # x1', the basis token in x2's place, x5


def test_append_and_own_merge_the_next_token_and_place_the_basis_elsewhere():
    """``append`` (official Video-LLaVA code) / ``own`` (ours): x2 is no longer dropped but merged: cos(x2, x1) =
    -.949, cos(x2, x5) = .928 -> x5' = mean(x5, x2) = (.5, -2.25). The basis token goes after the unit's last
    token (append) or to its own place (own)."""
    for slots, want in (("append", [1, 5, 0]), ("own", [0, 1, 5])):
        sel = apet_compose(X, [], [(0, torch.arange(6), 3)], torch.tensor([0]), basis=1, seed_slots=slots,
                           merge_seeds=False, ridge=1e-5, numerics="ours", stage="vision")
        assert sel.assign.tolist() == [-1, -1, 1, 0, 0, -1]
        assert merge_tokens(X, sel).tolist() == [[1.0, 1.5], [0.5, -2.25]]
        assert torch.cat([sel.keep, sel.targets])[sel.order].tolist() == want


def test_merge_seeds_is_the_official_double_count():
    """``merge_seeds``: the basis token x0 also joins its nearest target (cos(x0, x1) = .316 < cos(x0, x5) =
    .371): x5' = mean(x5, x0) = (1.5, -1.25). The outputs are computed by the method (values), each at its place:
    the basis token's provenance is the place it fills (x2)."""
    r = apet_units(X[None], 3, 1, torch.tensor([0]), merge_seeds=True)
    assert r["assign"].tolist() == [[1, -1, -1, 0, 0, -1]]
    assert merged_rows(X[None], r["targets"], r["assign"], official=False)[0].tolist() == [[1.0, 1.5], [1.5, -1.25]]
    sel = apet_compose(X, [], [(0, torch.arange(6), 3)], torch.tensor([0]), basis=1, seed_slots="replace",
                       merge_seeds=True, ridge=1e-5, numerics="ours", stage="vision", want_values=True)
    assert sel.keep.tolist() == [1, 2, 5] and sel.targets is None
    assert sel.values.tolist() == [[1.0, 1.5], [2.0, 0.0], [1.5, -1.25]]
    # the LLM stage (no values): the same double count as Selection.merge_kept, merged by the engine's merge_tokens
    sel = apet_compose(X, [], [(0, torch.arange(6), 3)], torch.tensor([0]), basis=1, seed_slots="replace",
                       merge_seeds=True, ridge=1e-5, numerics="ours", stage="llm")
    assert sel.merge_kept and sel.keep.tolist() == [0] and sel.assign.tolist() == [1, -1, -1, 0, 0, -1]
    assert merge_tokens(X, sel).tolist() == [[1.0, 1.5], [1.5, -1.25]]
    assert merge_tokens(X, dataclasses.replace(sel, merge_kept=False)).tolist() == [[1.0, 1.5], [1.0, -2.5]]


def test_the_llm_stage_seats_the_basis_tokens_in_error_order():
    """Stage 1 writes the basis tokens over E[T-k:] ascending (a boolean mask), stage 2 in error order
    (``image_embeds[errors_indices[-k:]] = seed_features``). 3-D tokens: the basis {x0 = 10 e1, x1 = 10 e2} (FPS
    from x0: |x1 - x0|^2 = 200 > 100 + z^2) spans the xy-plane, so a token (0, 0, z) has error |z|.
    Errors 5, 9, 1, 4, 7, .5 for x2..x7: E = [x3, x6, x2, x5] for T = 4, k = 2; targets x3, x6; places x2, x5
    (error order = ascending). With x2, x5 swapped to 4, 5: error order [x5, x2], ascending still [x2, x5]."""
    x = torch.zeros(8, 3)
    x[0, 0], x[1, 1] = 10.0, 10.0  # the basis: FPS from 0 picks 1 (farthest)
    err = {2: 5.0, 3: 9.0, 4: 1.0, 5: 4.0, 6: 7.0, 7: 0.5}  # v = 2, t = 3, w = 5, u = 6
    for i, e in err.items():
        x[i, 2] = e
    r_vision = apet_units(x[None], 4, 2, torch.tensor([0]), stage="vision")
    r_llm = apet_units(x[None], 4, 2, torch.tensor([0]), stage="llm")
    assert r_vision["seeds"].tolist() == [[0, 1]] and r_vision["targets"].tolist() == [[3, 6]]
    assert r_vision["slots"].tolist() == [[2, 5]]  # ascending: seed 0 -> place 2, seed 1 -> place 5
    assert r_llm["slots"].tolist() == [[2, 5]]  # error order: v (5) before w (4); the same here
    err[2], err[5] = 4.0, 5.0  # now w (5) ranks before v (4): error order [5, 2], ascending [2, 5]
    for i, e in err.items():
        x[i, 2] = e
    assert apet_units(x[None], 4, 2, torch.tensor([0]), stage="vision")["slots"].tolist() == [[2, 5]]
    assert apet_units(x[None], 4, 2, torch.tensor([0]), stage="llm")["slots"].tolist() == [[5, 2]]


def test_basis_tokens_rank_last_and_ties_go_to_the_lower_index():
    """Four equal-error tokens: the targets are the lower indices. A unit of 4 tokens with 3 out and 2 basis
    tokens: only 2 non-basis tokens, so E holds a basis token too (ranked last, the lower one of the tied -inf):
    never a target, only a place."""
    x = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    r = apet_units(x[None], 3, 1, torch.tensor([0]))
    assert r["targets"].tolist() == [[1, 2]] and r["slots"].tolist() == [[3]]
    y = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, -1.0]])
    r = apet_units(y[None], 3, 2, torch.tensor([0]))
    assert r["seeds"].tolist() == [[0, 1]] and r["targets"][0].tolist() in ([2], [3])
    other = 5 - r["targets"][0].item()
    assert r["slots"][0].tolist() == sorted([0, other])


def test_a_budget_of_one_keeps_the_largest_norm_token_and_merges_everything():
    """k = min(basis, T - 1) = 0 for T = 1: no basis, e_i = ||x_i||, the top token is the one target."""
    assert basis_count(10, 1) == 0 and basis_count(10, 4) == 3 and basis_count(10, 96) == 10
    sel = apet_compose(X, [], [(0, torch.arange(6), 1)], torch.tensor([0]), basis=10, seed_slots="replace",
                       merge_seeds=False, ridge=1e-5, numerics="ours", stage="vision")
    assert sel.keep.numel() == 0 and sel.targets.tolist() == [1]  # |(1, 3)| = |(3, 1)|: the lower index
    torch.testing.assert_close(merge_tokens(X, sel)[0], X.mean(0))


def test_units_are_batched_like_each_unit_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 40, 16, generator=g)
    draws = torch.tensor([5, 17, 33])
    groups = [(u, torch.arange(40 * u, 40 * (u + 1)), 12) for u in range(3)]
    sel = apet_compose(x, [], groups, draws, basis=4, seed_slots="replace", merge_seeds=False, ridge=1e-5,
                       numerics="ours", stage="vision")
    for u in range(3):
        r = apet_units(x[40 * u:40 * (u + 1)][None], 12, 4, draws[u:u + 1] % 40)
        assert torch.equal(sel.keep[4 * u:4 * (u + 1)], r["seeds"][0] + 40 * u)
        assert torch.equal(sel.targets[8 * u:8 * (u + 1)], r["targets"][0] + 40 * u)


# ------------------------------------------------------------------ budgets and options


def test_budget_split_and_options():
    assert split_budget(64) == (96, 32) and split_budget(128) == (192, 64) and split_budget(192) == (288, 96)
    m = ApET(64)
    assert (m.stage1, m.stage2, m.llm_layers, m.basis) == (96, 32, (16,), 10)
    assert ApET().stage1 == 96 and ApET().stage2 == 32  # the README's configuration
    m = ApET(64, llm_stage=False)
    assert (m.stage1, m.stage2, m.llm_layers) == (64, None, ())
    m = ApET(stage1=288, stage2=96)
    m.setup(num_layers=40, num_vision_layers=24, family="llava_next")
    assert m.llm_layers == (20,) and m._slots == "replace" and m._space == "vision"
    m.setup(num_layers=4, num_vision_layers=3, family="video_llava")
    assert m.llm_layers == (2,) and m._slots == "append" and m._space == "projected"
    m.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")
    assert m._space == "projected" and not m._merge_seeds
    assert ApET(64, numerics="official")._merge_seeds
    assert not ApET(64, numerics="official", merge_seeds=False)._merge_seeds
    assert ApET(64, scale_layers=False, layer=10).llm_layers == (10,)
    assert get_method("apet", 64).config()["numerics"] == "ours"


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=64, stage1=96), "either a budget"),
    (dict(budget=1), ">= 2"),
    (dict(stage1=0), "stage1"),
    (dict(stage1=96, stage2=2.5), "stage2"),
    (dict(budget=64, basis=-1), "basis"),
    (dict(budget=64, basis=True), "basis"),
    (dict(budget=64, ridge=0), "ridge"),
    (dict(budget=64, seed_slots="blend"), "seed_slots"),
    (dict(budget=64, space="llm"), "space"),
    (dict(budget=64, cls_token="drop"), "cls_token"),
    (dict(budget=64, merge_seeds="yes"), "merge_seeds"),
    (dict(budget=64, numerics="fp16"), "numerics"),
    (dict(budget=64, llm_stage=False, stage2=3), "either a budget"),
    (dict(stage1=64, llm_stage=False, stage2=3), "llm_stage"),
])
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApET(**kwargs)
    with pytest.raises(TypeError):
        ApET(64, basis_token_num=10)


def test_fps_start_is_seeded_per_sample():
    assert torch.equal(_draw(0, 123, 4), _draw(0, 123, 4))
    assert not torch.equal(_draw(0, 123, 4), _draw(1, 123, 4))
    assert not torch.equal(_draw(0, 123, 4), _draw(0, 124, 4))


# ------------------------------------------------------------------ tiny models


@ALL
def test_per_layer_counts(rt):
    """budget 6: 9 per unit after the vision stage, 3 per unit from the middle layer on (newlines kept as layout,
    not counted); a unit with fewer tokens kept whole."""
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    eng = rt.prune("apet", 6)
    with torch.no_grad():
        rt.model(**inputs)
    L = len(rt.model.model.language_model.layers)
    K = eng.method.llm_layers[0]
    for s, (sizes, newlines) in zip(eng.stats.samples, lay, strict=True):
        first = sum(min(9, n) for n in sizes) + newlines
        second = sum(min(3, min(9, n)) for n in sizes) + newlines
        assert s.visual_candidates == sum(sizes) + newlines
        assert s.visual_per_layer == [first] * K + [second] * (L - K)
    if rt.family == "video_llava":  # 8 frames of 17 ([CLS] kept + 8 / 2 patches)
        assert [s.visual_per_layer for s in eng.stats.samples] == [[72, 72, 24, 24]] * 3


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
def test_both_stages_are_apet_on_the_unit_features(rt):
    """Spy on the two stages: stage 1 == :func:`apet_units` on the unit's stage-1 features (select layer on
    LLaVA-1.5, projected on Video-LLaVA), its FPS from draw[u] % N; stage 2 == apet_units on the hidden states of
    the unit's current tokens (error order seats, draw[U + u] % m)."""
    m = get_method("apet", 6)
    seen = {"vision": [], "llm": []}
    sv, sl = m.select_vision, m.select_llm

    def spy_vision(sig):
        sel = sv(sig)
        seen["vision"].append((sig, sel))
        return sel

    def spy_llm(stage, sig):
        sel = sl(stage, sig)
        seen["llm"].append((sig, sig.hidden[sig.visual].clone(), sel))
        return sel

    m.select_vision, m.select_llm = spy_vision, spy_llm
    inputs = make_batch(rt)
    rt.prune(m)
    with torch.no_grad():
        rt.model(**inputs)
    for (sig, sel), (lsig, hid, lsel) in zip(seen["vision"], seen["llm"], strict=True):
        lay = sig.unit_layout(patch=True)
        U = lay.num_units
        draws = _draw(0, sig.key, 2 * U)
        x = sig.vision_features if rt.family == "llava" else sig.features
        for u in range(U):
            cand = lay.patches[u] if rt.family == "video_llava" else lay.tokens[u]
            out = 9 - (1 if rt.family == "video_llava" else 0)
            r = apet_units(x[cand][None], out, basis_count(10, out), draws[u:u + 1] % cand.numel(),
                           seed_slots=m._slots)
            assert set(cand[r["seeds"][0]].tolist()) <= set(sel.keep.tolist())
            assert set(cand[r["targets"][0]].tolist()) <= set(sel.targets.tolist())
        if rt.family == "llava":  # one unit of 9 tokens -> 3 (k = 2): every current token is a candidate
            r = apet_units(hid[None], 3, 2, draws[1:2] % 9, stage="llm")
            assert lsel.keep.tolist() == r["seeds"][0].tolist() and lsel.targets.tolist() == r["targets"][0].tolist()
            outputs = torch.cat([lsel.keep, lsel.targets])[lsel.order]
            places = torch.cat([r["slots"][0], r["targets"][0]])
            assert outputs.tolist() == torch.cat([r["seeds"][0], r["targets"][0]])[places.argsort()].tolist()


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """numerics="official": batch selections == each sample alone at both stages, cached == recompute. LLaVA-NeXT:
    the official double count (merge_seeds, outputs computed by the method) has no newline features: refused
    with the reason, and runs with merge_seeds=False."""
    if rt.family == "llava_next":
        inputs = make_batch(rt)
        rt.prune("apet", 6, numerics="official")
        with pytest.raises(ValueError, match="newline"):
            with torch.no_grad():
                rt.model(**inputs)
        eng = rt.prune("apet", 6, numerics="official", merge_seeds=False)
        with torch.no_grad():
            rt.model(**inputs)
        assert not all(s.vision_noop for s in eng.stats.samples)
        return
    check_reference_mode_in_engine(rt, "apet", 6, stage="vision")
    check_reference_mode_in_engine(rt, "apet", 6, stage=0)


@pytest.mark.parametrize("rt", ["qwen3-vl"], indirect=True)
def test_merge_seeds_refused_with_deepstack(rt):
    rt.prune("apet", 2, merge_seeds=True)  # 3 per image: the tiny images hold 4 to 8
    with pytest.raises(ValueError, match="DeepStack"):
        with torch.no_grad():
            rt.model(**make_batch(rt))
    check_generate_batch_equals_alone(rt, "apet", 2, numerics="official", merge_seeds=False)


# ------------------------------------------------------------------ fast path (captured prefill)


def test_fast_path_equals_the_eager_engine_without_host_reads():
    from fastpath_util import BACKEND, assert_same_as_eager, counting_fast_path, family_batch, inputs

    from llava.models import load

    assert get_method("apet", 6).capture_refusal() is None
    assert get_method("apet", 6, merge_seeds=True).capture_refusal() is None
    assert "official" in get_method("apet", 6, numerics="official").capture_refusal()
    for fam, opts in (("llava", {}), ("llava", {"merge_seeds": True, "llm_stage": False}),
                      ("llava_next", {"seed_slots": "own"}), ("video_llava", {"cls_token": "candidate"})):
        fast = load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND)
        eager = load(f"tiny:{fam}", seed=1)
        eng = fast.prune("apet", 6, **opts)
        eager.prune("apet", 6, **opts)
        eng.fast, syncs = counting_fast_path(eng)
        batch = inputs(fast, 0, n=3) if fam == "llava" else family_batch(fast, fam)
        assert_same_as_eager(fast, eager, eng, batch, 4)
        assert syncs == [0] and not all(s.vision_noop for s in eager.engine.stats.samples)

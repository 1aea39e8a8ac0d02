"""Downsample control: window means == F.avg_pool2d on the reshaped grid (exact in fp32), budgets and
strides, [CLS] / newline tokens, token counts and Qwen's own grids on the tiny families. Keep-all (budget and
stride 1), cache, batching (both spaces): tests/test_method_guarantees.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ALL_FAMILIES,
    greedy_no_cache,
    layout,
    llm_visual_rows,
    make_batch,
)

import baselines.downsample  # noqa: F401  (registers "downsample")
from baselines.downsample import Downsample, downsample, stride_for_budget, window_counts
from llava.method import Method
from llava.ops import merge_tokens
from llava.selection import Selection

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
#: Qwen: own test below (dynamic grids)
POOLED = [f for f in ALL_FAMILIES if f not in ("qwen2.5-vl", "qwen3-vl", "qwen3.5", "qwen2-vl")]


def outputs(x, sel):
    """The rows a selection produces from x (n, D), in output order (as the engine lays them out)."""
    parts = [x[sel.keep].float()]
    if sel.targets is not None:
        parts.append(merge_tokens(x, sel))
    out = torch.cat(parts)
    return out if sel.order is None else out[sel.order]


def pool_ref(x, rows, cols, sh, sw):
    """F.avg_pool2d over the rows x cols grid of x (rows*cols, D); border windows clipped (ceil_mode)."""
    g = x.T.reshape(1, x.shape[1], rows, cols)
    return F.avg_pool2d(g, (sh, sw), ceil_mode=True).reshape(x.shape[1], -1).T


# ------------------------------------------------------------------ pooling, exact


@pytest.mark.parametrize("rows,cols,st", [(24, 24, (2, 2)), (24, 24, (3, 3)), (24, 24, (4, 4)), (24, 24, (1, 3)),
                                          (4, 4, (2, 2)), (6, 4, (2, 2)), (5, 7, (2, 3)), (5, 5, (2, 2))])
def test_window_means_equal_avg_pool2d(rows, cols, st):
    n = rows * cols
    unit, patch = torch.zeros(n, dtype=torch.long), torch.arange(n)
    sel = downsample(unit, patch, [(rows, cols)], [st])
    # integers: every sum exact, so each mean is one correctly rounded division in both: bit-identical
    x = torch.randint(-100, 100, (n, 8), generator=torch.Generator().manual_seed(n)).float()
    assert torch.equal(outputs(x, sel), pool_ref(x, rows, cols, *st))
    y = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(outputs(y, sel), pool_ref(y, rows, cols, *st), rtol=0, atol=1e-6)
    assert sel.num_out == -(-rows // st[0]) * -(-cols // st[1]) and sel.rule == "mean" and sel.space == "vision"
    # targets: each window's top-left token, windows in raster order
    tl = [r * cols + c for r in range(0, rows, st[0]) for c in range(0, cols, st[1])]
    assert sel.targets.tolist() == tl and sel.keep.numel() == 0


def test_several_units_cls_and_newlines_pass_through():
    """Two 4x4 frames with a [CLS] each ([CLS] first, as Video-LLaVA), then a NeXT-like newline token."""
    unit = torch.tensor([0] * 17 + [1] * 17 + [-1])
    patch = torch.tensor([-1] + list(range(16)) + [-1] + list(range(16)) + [-1])
    x = torch.randint(-9, 9, (35, 3)).float()
    sel = downsample(unit, patch, [(4, 4)] * 2, [(2, 2)] * 2)
    out = outputs(x, sel)
    assert sel.num_out == 2 * (1 + 4) + 1
    frame = lambda a: torch.cat([x[a:a + 1], pool_ref(x[a + 1:a + 17], 4, 4, 2, 2)])  # noqa: E731
    assert torch.equal(out, torch.cat([frame(0), frame(17), x[34:]]))
    sel = downsample(unit, patch, [(4, 4)] * 2, [(2, 2), None], keep_newlines=False)  # frame 1 kept whole
    assert torch.equal(outputs(x, sel), torch.cat([frame(0), x[17:34]]))


def test_missing_patches_leave_smaller_windows():
    """A crop cut by unpadding (rows 0-2 of 4 present): windows of the present patches only."""
    patch = torch.arange(12)
    sel = downsample(torch.zeros(12, dtype=torch.long), patch, [(4, 4)], [(2, 2)])
    x = torch.randint(-9, 9, (12, 2)).float()
    full = torch.cat([x, torch.zeros(4, 2)])
    ref = pool_ref(full, 4, 4, 2, 2)
    ref[2:] = pool_ref(x[8:12], 1, 4, 1, 2)  # the last window row holds one patch row
    assert sel.targets.tolist() == [0, 2, 8, 10] and torch.equal(outputs(x, sel), ref)


@pytest.mark.parametrize("budget,options", [(4, {}), (1, {"space": "projected", "newlines": "drop"}),
                                            (None, {"stride": (1, 2)}), (16, {})])
def test_captured_selection_is_the_host_plan(budget, options):
    """The fast path's route: plan_vision computes the selection on host signals and the captured
    select_vision reads it back (sig.plan) with no host read; it equals the eager selection field for field,
    on a sample with a [CLS] frame, a crop cut by unpadding (empty windows: a planned count) and newlines."""
    from llava.signals import VisionSignals
    from llava.syncs import SyncCounter

    unit = torch.tensor([0] * 17 + [1] * 12 + [-1] * 2)
    patch = torch.tensor([-1] + list(range(16)) + list(range(12)) + [-1, -1])
    m = Downsample(budget, **options)

    def sig(**kw):
        return VisionSignals(features=torch.zeros(31, 4), vision_features=torch.zeros(31, 4), unit=unit,
                             patch=patch, unit_kind="crop", grid=(4, 4), text_embeds=torch.zeros(0, 4),
                             question_mask=torch.zeros(0, dtype=torch.bool), unit_grid=[(4, 4)] * 2, **kw)

    eager = m.select_vision(sig())
    plan = m.plan_vision(sig())
    with SyncCounter() as c:
        got = m.select_vision(sig(captured=True, plan={k: v.clone() for k, v in plan.items()}))
    assert c.total == 0, c.counts
    for name in ("keep", "targets", "assign", "order"):
        a, b = getattr(got, name), getattr(eager, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert (got.rule, got.space, got.num_out) == (eager.rule, eager.space, eager.num_out)


def test_stride_one_is_the_identity():
    unit, patch = torch.zeros(16, dtype=torch.long), torch.arange(16)
    sel = downsample(unit, patch, [(4, 4)], [(1, 1)])
    assert sel.is_identity(16)


def test_budget_to_stride():
    assert {b: stride_for_budget(b, 24, 24) for b in (144, 64, 36)} == {144: (2, 2), 64: (3, 3), 36: (4, 4)}
    assert stride_for_budget(4, 4, 4) == (2, 2) and stride_for_budget(1, 4, 4) == (4, 4)
    assert stride_for_budget(16, 24, 24) == (6, 6)  # s = 7 also gives 16 (clipped border): the smallest s
    assert window_counts(4, 4) == {16: 1, 4: 2, 1: 4}
    with pytest.raises(ValueError, match=r"budget 128 is not reachable .* 144 \(s=2\), 64 \(s=3\)"):
        stride_for_budget(128, 24, 24)
    with pytest.raises(ValueError, match=r"reachable budgets: 16 \(s=1\), 4 \(s=2\), 1 \(s=4\)"):
        stride_for_budget(3, 4, 4)


def test_options():
    m = Downsample(64)
    assert m.config() == {"method": "downsample", "budget": 64, "position_mode": "keep", "stride": None,
                          "space": "vision", "newlines": "keep"}
    assert not m.needs_vision_attention and m.vision_stage
    assert Downsample(stride=(1, 3)).strides([576], [(24, 24)]) == [(1, 3)]
    assert Downsample(64).strides([576, 40], [(24, 24)] * 2) == [(3, 3), None]
    for bad in (dict(), dict(budget=64, stride=2), dict(stride=0), dict(stride=(2, "x")), dict(budget=64, space="llm"),
                dict(budget=64, newlines="pooled")):
        with pytest.raises(ValueError):
            Downsample(**bad)


# ------------------------------------------------------------------ tiny models


class _Spy(Method):
    name = "downsample_spy"
    vision_stage = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append((sig.vision_features.clone(), sig.features.clone(), sig.unit.clone(), sig.patch.clone()))
        return Selection(keep=torch.arange(sig.num_tokens))


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
@pytest.mark.parametrize("space", ["vision", "projected"])
def test_llm_input_is_the_pooled_grid(rt, space):
    """Tiny LLaVA-1.5 (4x4 patches), budget 4 -> 2x2 windows: the LLM's visual rows are the projector
    of avg_pool2d(select-layer features) (``vision``) or avg_pool2d of the projected tokens."""
    inputs = make_batch(rt)
    spy = _Spy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.prune("downsample", 4, space=space)
    rows = llm_visual_rows(rt, inputs)
    proj = rt.model.model.multi_modal_projector
    for (vf, feats, _, _), got in zip(spy.seen, rows):
        with torch.no_grad():
            want = proj(pool_ref(vf, 4, 4, 2, 2)) if space == "vision" else pool_ref(feats, 4, 4, 2, 2)
        assert got.shape == (4, feats.shape[1])
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


def expected_tokens(unit, patch, budget=4, grid=4, s=2):
    """Per sample, by hand from the provenance: [CLS] and newline tokens pass; a unit with <= budget
    patches stays whole; otherwise one token per non-empty s x s window of its grid x grid patches."""
    n = int((patch < 0).sum())
    for u in range(int(unit.max()) + 1):
        p = patch[(unit == u) & (patch >= 0)]
        n += p.numel() if p.numel() <= budget else len(set(((p // grid) // s * grid + (p % grid) // s).tolist()))
    return n


@pytest.mark.parametrize("rt", POOLED, indirect=True)
def test_tokens_entering_llm(rt):
    """Budget 4 on the 4x4 grids: 4 pooled tokens per image / crop / frame (+ the frame's [CLS] on
    Video-LLaVA, + newline tokens on NeXT / OneVision); crops cut by unpadding keep their non-empty
    windows (<= 4 patches: kept whole)."""
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    spy = _Spy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    eng = rt.prune("downsample", 4)
    with torch.no_grad():
        rt.model(**inputs)
    L = len(rt.model.model.language_model.layers)
    for s, (sizes, newlines), (_, _, unit, patch) in zip(eng.stats.samples, lay, spy.seen):
        assert s.visual_candidates == sum(sizes) + newlines and not s.vision_noop
        assert s.visual_entering_llm == expected_tokens(unit, patch)
        cls = 8 if rt.family == "video_llava" else 0  # a [CLS] per frame passes unchanged
        assert s.visual_entering_llm <= sum(min(4, n - (cls > 0)) for n in sizes) + newlines + cls
        if rt.family == "video_llava":
            assert sizes == [17] * 8 and s.visual_entering_llm == 8 * 5
        if rt.family == "llava":
            assert sizes == [16] and s.visual_entering_llm == 4
        assert s.visual_per_layer == [s.visual_entering_llm] * L


def test_next_spatial_layout_is_exactly_budget_per_crop(runtimes):
    rt = runtimes["llava-next"]
    rt.processor.next_layout = "spatial"
    try:
        inputs = make_batch(rt)
        assert layout(rt, inputs) == [([16, 16, 16], 0)] * 3
        eng = rt.prune("downsample", 4)
        with torch.no_grad():
            rt.model(**inputs)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [12, 12, 12]
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"


@pytest.mark.parametrize("rt", ["qwen2.5-vl", "qwen3-vl"], indirect=True)
def test_qwen_pools_each_image_on_its_own_grid(rt):
    """Qwen2.5-VL: each image's merged grid from image_grid_thw; the budget picks the smallest square
    window whose count is <= budget (an exact count per image is generally unreachable)."""
    import math

    inputs = make_batch(rt)
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
    eng = rt.prune("downsample", 2)
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    want = []
    for r, c in grids:
        if r * c <= 2:
            want.append(r * c)
            continue
        s = min(s for s in range(1, max(r, c) + 1) if math.ceil(r / s) * math.ceil(c / s) <= 2)
        want.append(math.ceil(r / s) * math.ceil(c / s))
    assert [s.visual_entering_llm for s in eng.stats.samples] == want
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


def test_dynamic_grids_pool_when_the_signals_carry_unit_grids():
    """Qwen2.5-VL-like signals (grid (0, 0)): refused; with a per-unit ``unit_grid`` (rows, cols) each
    image is pooled on its own grid (2x3 and 3x2 merged tokens, budget 2 -> 2x2 windows, clipped)."""
    from llava.signals import VisionSignals

    unit = torch.tensor([0] * 6 + [1] * 6)
    patch = torch.cat([torch.arange(6), torch.arange(6)])
    x = torch.randint(-9, 9, (12, 4)).float()
    sig = VisionSignals(features=x, vision_features=x, unit=unit, patch=patch, unit_kind="image", grid=(0, 0),
                        text_embeds=torch.zeros(1, 4), question_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="dynamic patch grids"):
        Downsample(2).select_vision(sig)
    assert Downsample(6).select_vision(sig).is_identity(12)  # every image fits: no grid needed
    sig.unit_grid = [(2, 3), (3, 2)]
    sel = Downsample(2).select_vision(sig)
    want = torch.cat([pool_ref(x[:6], 2, 3, 2, 2), pool_ref(x[6:], 3, 2, 2, 2)])
    assert torch.equal(outputs(x, sel), want) and sel.targets.tolist() == [0, 2, 6, 10]
